"""Ground truth for shortcut reliance, which only the synthetic sets have: did a prediction rely on the
spurious artefact? Answered causally with counterfactual twins (the same image rendered again with the
artefact flipped, see :mod:`segx_helpers.data.format`), by the artefact's distance from the lesion, and
with the shortcut's error taxonomy.

For a real dataset every function here says plainly that it has no twins. A real dataset may still carry
annotated artefact flags in its ``artefacts.csv`` (the ISIC 2018 trap sets do): the statistics on those
(artefact-label correlation per split, accuracy where each artefact agrees or disagrees with the label,
lesion-size strata, SegU by artefact presence within those strata) are in :mod:`segx_helpers.studies.artefacts`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision import tv_tensors

from segx_helpers.data.format import LoadedDataset, read_image
from segx_helpers.data.synthetic import artefact_masks, load_artefacts, shortcut_pairs, twin_path
from segx_helpers.data.torch_dataset import Normalization, make_transforms
from segx_helpers.explain.targets import predict
from segx_helpers.scores.decisions import decide
from segx_helpers.scores.selective import error_types, separation_table


def twin_images(data: LoadedDataset, image_ids: list[str], artefact: str, meta: dict) -> torch.Tensor:
    """The counterfactual twins of ``image_ids`` with ``artefact`` flipped, ``(N, C, H, W)``, prepared as
    the classifier described by ``meta`` (a checkpoint's metadata) expects its inputs."""
    norm = Normalization(**{k: tuple(v) for k, v in meta["normalization"].items()})
    transform = make_transforms(meta["image_size"], norm)
    out = []
    for image_id in image_ids:
        image = read_image(twin_path(data.root, image_id, artefact), channels=data.info.channels)
        out.append(transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))).as_subclass(torch.Tensor))
    return torch.stack(out) if out else torch.zeros((0, data.info.channels, meta["image_size"], meta["image_size"]))


def shortcut_driven(model: torch.nn.Module, meta: dict, data: LoadedDataset, table: pd.DataFrame,
                    batch_size: int = 64) -> np.ndarray:
    """For each prediction row of ``table`` (columns ``image_id`` and ``class``, e.g. from
    :func:`segx_helpers.workflows.results.prediction_table`): does it change when the shortcut artefact of that
    class is flipped in the image? ``(len(table),)`` bool.

    Multiclass: the predicted class of the twin (shortcut artefact flipped, decided with the checkpoint's cut-offs)
    is another class.
    Multilabel: the twin (the token tied to that finding flipped) falls below the finding's threshold.
    Classes without a shortcut artefact never count as shortcut-driven.
    """
    pairs = shortcut_pairs(data.info)
    if not pairs:
        raise ValueError(f"{data.root} has no shortcut artefacts with counterfactual twins (a real dataset?)")
    task = meta["task"]
    classes = list(meta["class_names"])
    thresholds = meta.get("thresholds")
    out = np.zeros(len(table), dtype=bool)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for class_name, artefact in pairs.items():
            rows = np.flatnonzero((table["class"] == class_name).to_numpy()) if task == "multilabel" else np.arange(len(table))
            if not len(rows):
                continue
            ids = table["image_id"].to_numpy()[rows]
            unique, inverse = np.unique(ids, return_inverse=True)
            probs = predict(model, twin_images(data, list(unique), artefact, meta), task, batch_size, device)[inverse]
            if task == "multiclass":
                predicted = np.array(classes)[decide(probs, task, thresholds)]
                out[rows] = predicted != table["class"].to_numpy()[rows]
            else:
                c = classes.index(class_name)
                out[rows] = decide(probs, task, thresholds)[:, c] == 0
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------- SegU by artefact distance

DISTANCE_EDGES_CELLS = (0.0, 0.25, 0.625, np.inf)
"""Default distance bins, in Grad-CAM cells (image size / feature-grid size): touching or nearly (< 1/4 cell),
near (< 5/8 cell), far (beyond). At 128 px with a 4 x 4 grid a cell is 32 px: 0-8, 8-20 and 20+ px."""


def artefact_distance(data: LoadedDataset, image_ids: Sequence[str], image_size: int) -> np.ndarray:
    """Gap between each image's shortcut artefact and the lesion's edge, in pixels at ``image_size`` (the
    classifier's input), ``(N,)`` float. Where the artefact is absent, the gap where its counterfactual twin has
    it. Synthetic sets only (``artefacts.csv`` with ``distance_px``, written by this package's generator)."""
    table = load_artefacts(data.root).set_index("image_id")
    if "distance_px" not in table:
        raise ValueError(f"{data.root / 'artefacts.csv'} has no distance_px column: it was generated by an older "
                         "version of this package (re-run notebook 01 to regenerate it)")
    generated = float((data.info.generator or {}).get("image_size") or image_size)
    return table.loc[list(image_ids), "distance_px"].to_numpy(dtype=float) * image_size / generated


@dataclass(frozen=True)
class DistanceBins:
    """Bins of artefact distance, with edges in Grad-CAM cells (``cell_px`` pixels: image size / the target
    layer's grid size, see :func:`segx_helpers.models.networks.feature_grid`) and the last bin open."""

    cell_px: float
    edges_cells: tuple[float, ...] = DISTANCE_EDGES_CELLS

    def __post_init__(self) -> None:
        edges = np.asarray(self.edges_cells, dtype=float)
        if len(edges) < 2 or np.any(np.diff(edges) <= 0) or not self.cell_px > 0:
            raise ValueError(f"edges_cells must increase (got {list(self.edges_cells)}) and cell_px be positive "
                             f"(got {self.cell_px})")

    @property
    def labels(self) -> list[str]:
        """One label per bin, e.g. ``"8-20 px (0.25-0.62 cell)"`` and ``"20+ px (0.62+ cell)"``."""
        out = []
        for low, high in zip(self.edges_cells[:-1], self.edges_cells[1:]):
            span = f"{low * self.cell_px:g}-{high * self.cell_px:g} px ({low:.2g}-{high:.2g} cell)"
            out.append(span if np.isfinite(high) else f"{low * self.cell_px:g}+ px ({low:.2g}+ cell)")
        return out

    def assign(self, distance_px: np.ndarray) -> pd.Categorical:
        """The bin of each distance ``(N,)`` in pixels, as an ordered categorical (NaN stays missing)."""
        distance_px = np.asarray(distance_px, dtype=float)
        codes = np.searchsorted(np.asarray(self.edges_cells) * self.cell_px, distance_px, side="right") - 1
        codes = np.where(np.isfinite(distance_px) & (codes >= 0) & (codes < len(self.labels)), codes, -1)
        return pd.Categorical.from_codes(codes, categories=self.labels, ordered=True)


def score_key(score: str) -> str:
    """A certainty column's name as a key of :func:`shortcut_by_distance`'s rows: ``"c_IoU"`` -> ``"c_iou"``,
    ``"predicted class"`` -> ``"predicted_class"``."""
    return score.lower().replace(" ", "_")


def shortcut_by_distance(table: pd.DataFrame, bins: DistanceBins,
                         scores: Sequence[str] = ("c_IoU", "c_AUITC", "confidence"), n_resamples: int = 1000,
                         seed: int = 0) -> pd.DataFrame:
    """Per artefact-distance bin: how well each certainty score flags shortcut-driven predictions, and the
    paper's Table 4 means (correct vs incorrect) inside the bin.

    ``table``: one row per prediction with ``distance_px`` (:func:`artefact_distance`), ``shortcut_driven``,
    ``correct`` and the ``scores`` columns. One row per bin: ``bin``, ``n``, ``n_shortcut_driven``,
    ``distance_px`` and ``distance_cells`` as ``[low, high]`` (the open last bin ends at the largest distance in
    it), then per score (its :func:`score_key`, e.g. ``c_iou``, ``predicted_class``) ``<key>_auroc`` with ``_low`` /
    ``_high`` (95 % bootstrap CI of the AUROC of a *low* score for flagging shortcut-driven predictions: 0.5 is
    chance; NaN without both outcomes), and ``<key>_correct`` / ``<key>_incorrect``, the mean score of correct and
    of incorrect predictions.
    """
    assigned = bins.assign(table["distance_px"].to_numpy())
    rows = []
    for code, label in enumerate(bins.labels):
        part = table[np.asarray(assigned.codes) == code]
        low, high = bins.edges_cells[code] * bins.cell_px, bins.edges_cells[code + 1] * bins.cell_px
        if not np.isfinite(high):
            high = float(np.ceil(part["distance_px"].max())) if len(part) else float("nan")
        driven = part["shortcut_driven"].to_numpy(dtype=bool)
        correct = part["correct"].to_numpy(dtype=bool)
        row = {"bin": label, "n": len(part), "n_shortcut_driven": int(driven.sum()), "distance_px": [low, high],
               "distance_cells": [low / bins.cell_px, high / bins.cell_px]}
        flagged = None
        if 0 < driven.sum() < len(part):
            flagged = separation_table(part.assign(correct=~driven), list(scores), n_resamples=n_resamples,
                                       seed=seed).set_index("certainty")
        for score in scores:
            key = score_key(score)
            for stat in ("auroc", "auroc_low", "auroc_high"):
                row[f"{key}_{stat}"] = float(flagged.loc[score, stat]) if flagged is not None else float("nan")
            row[f"{key}_correct"] = float(part[score][correct].mean()) if correct.any() else float("nan")
            row[f"{key}_incorrect"] = float(part[score][~correct].mean()) if (~correct).any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)

def shortcut_rate_by_distance(predictions: dict[str, pd.DataFrame], distance_px: pd.Series,
                              bins: DistanceBins) -> pd.DataFrame:
    """The share of shortcut-driven predictions per artefact-distance bin, for each model.

    ``predictions``: model name -> prediction rows with ``image_id`` and ``shortcut_driven`` (e.g.
    :class:`~segx_helpers.studies.mask_training.FixComparison`'s ``predictions``); ``distance_px``: each image's
    :func:`artefact_distance`, indexed by image id. Columns: model, bin, n, shortcut-driven, rate."""
    rows = []
    for model, table in predictions.items():
        assigned = bins.assign(distance_px.reindex(table["image_id"]).to_numpy())
        driven = table["shortcut_driven"].to_numpy(dtype=bool)
        for code, label in enumerate(bins.labels):
            inside = np.asarray(assigned.codes) == code
            rows.append({"model": model, "bin": label, "n": int(inside.sum()), "shortcut-driven": int(driven[inside].sum()),
                         "rate": float(driven[inside].mean()) if inside.any() else float("nan")})
    return pd.DataFrame(rows)

def examples_by_distance(results, table: pd.DataFrame, bins: DistanceBins, n: int = 4) -> dict:
    """Shortcut-driven predictions to look at, from either end of the distance bins: ``"far from"`` the lesion
    (the farthest bin, lowest ``c_IoU`` first: the map sits on the patch) and ``"next to"`` it (the nearest bin,
    highest ``c_IoU`` first: the map sits on the lesion the patch touches), ``n`` of each. ``results``: a
    :class:`~segx_helpers.workflows.results.Results` whose rows are ``table``'s (``distance_px``,
    ``shortcut_driven``), in the same order."""
    codes = np.asarray(bins.assign(table["distance_px"].to_numpy()).codes)
    driven = table["shortcut_driven"].to_numpy(dtype=bool)
    far = results.select(driven & (codes == len(bins.labels) - 1)).sort("c_IoU").head(n)
    near = results.select(driven & (codes == 0)).sort("c_IoU", ascending=False).head(n)
    return {"far from": far, "next to": near}


def prediction_rows(result: dict, class_names: list[str]) -> pd.DataFrame:
    """The decisions of :func:`segx_helpers.workflows.training_recipes.evaluate_classifier` as prediction rows
    (``image_id``, ``class``): one per image (multiclass) or one per predicted finding (multilabel)."""
    pred = np.asarray(result["pred"])
    ids = np.asarray(result["image_id"])
    if pred.ndim == 1:
        return pd.DataFrame({"image_id": ids, "class": np.array(class_names)[pred]})
    rows, cols = np.nonzero(pred)
    return pd.DataFrame({"image_id": ids[rows], "class": np.array(class_names)[cols]})


def shortcut_artefact_masks(data: LoadedDataset, image_ids: list[str], size: int) -> np.ndarray | None:
    """Where the shortcut artefacts (those correlated with a class) are, bool ``(N, size, size)``, resized
    (nearest) to the classifier's input size; None for a dataset without artefact maps (real data)."""
    pairs = shortcut_pairs(data.info)
    if not pairs or not (data.root / "artefacts").is_dir():
        return None
    masks = artefact_masks(data.root, list(image_ids), sorted(set(pairs.values())))
    if masks.shape[1:] == (size, size):
        return masks
    return np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in masks])


def error_taxonomy(data: LoadedDataset, table: pd.DataFrame, targets: np.ndarray) -> np.ndarray:
    """:func:`segx_helpers.scores.selective.error_types` of each prediction row of ``table`` (``image_id``, ``class``,
    ``correct``, ``image_index``) for a multiclass dataset with one shortcut class and its artefact
    (synthetic-derm: melanoma and ink); ``targets`` ``(N,)`` are the split's class indices. For any other
    dataset (multi-label, real data without a planted shortcut) every error is ``"other error"``."""
    generator = data.info.generator or {}
    correct = table["correct"].to_numpy(dtype=bool)
    if data.info.task != "multiclass" or "shortcut_class" not in generator:
        return np.where(correct, "correct", "other error").astype(object)
    artefacts = load_artefacts(data.root).set_index("image_id")[generator["shortcut_artefact"]]
    present = artefacts.loc[table["image_id"]].to_numpy(dtype=bool)
    true_class = np.asarray(data.info.class_names)[np.asarray(targets)[table["image_index"].to_numpy()]]
    return error_types(correct, table["class"].to_numpy(), true_class, present, generator["shortcut_class"])
