"""Ground truth for shortcut reliance, which only the synthetic sets have: did a prediction rely on the
spurious artefact? Answered causally with counterfactual twins (the same image rendered again with the
artefact flipped, see :mod:`segx_helpers.data.format`), plus the accuracy breakdown by whether the artefact
agrees with the label.

For a real dataset every function here says plainly that it has no twins. A real dataset may still carry
annotated artefact flags in its ``artefacts.csv`` (the ISIC 2018 trap sets do): the functions of the last
section (artefact-label correlation per split, accuracy where each artefact agrees or disagrees with the
label, lesion-size strata, SegU by artefact presence within those strata) work on any dataset with that
table, synthetic or real.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torchvision import tv_tensors

from segx_helpers.data.format import LoadedDataset, read_image, read_mask
from segx_helpers.data.synthetic import load_artefacts, phi_correlation, shortcut_pairs, twin_path
from segx_helpers.data.torch_dataset import Normalization, make_transforms
from segx_helpers.explain.api import predict
from segx_helpers.scores.segu import separation_table


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
    :func:`segx_helpers.tutorial.results.prediction_table`): does it change when the shortcut artefact of that
    class is flipped in the image? ``(len(table),)`` bool.

    Multiclass: the predicted class of the twin (shortcut artefact flipped) is another class.
    Multilabel: the twin (the token tied to that finding flipped) falls below the finding's threshold.
    Classes without a shortcut artefact never count as shortcut-driven.
    """
    pairs = shortcut_pairs(data.info)
    if not pairs:
        raise ValueError(f"{data.root} has no shortcut artefacts with counterfactual twins (a real dataset?)")
    task = meta["task"]
    classes = list(meta["class_names"])
    thresholds = np.asarray(meta.get("thresholds") or [0.5] * len(classes), dtype=float)
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
                predicted = np.array(classes)[probs.argmax(axis=1)]
                out[rows] = predicted != table["class"].to_numpy()[rows]
            else:
                c = classes.index(class_name)
                out[rows] = probs[:, c] < thresholds[c]
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


def shortcut_by_distance(table: pd.DataFrame, bins: DistanceBins,
                         scores: Sequence[str] = ("c_IoU", "c_AUITC", "confidence"), n_resamples: int = 1000,
                         seed: int = 0) -> pd.DataFrame:
    """Per artefact-distance bin: how well each certainty score flags shortcut-driven predictions, and the
    paper's Table 4 means (correct vs incorrect) inside the bin.

    ``table``: one row per prediction with ``distance_px`` (:func:`artefact_distance`), ``shortcut_driven``,
    ``correct`` and the ``scores`` columns. One row per bin: ``bin``, ``n``, ``n_shortcut_driven``,
    ``distance_px`` and ``distance_cells`` as ``[low, high]`` (the open last bin ends at the largest distance in
    it), then per score (lower-cased) ``<score>_auroc`` with ``_low`` / ``_high`` (95 % bootstrap CI of the AUROC
    of a *low* score for flagging shortcut-driven predictions: 0.5 is chance; NaN without both outcomes), and
    ``<score>_correct`` / ``<score>_incorrect``, the mean score of correct and of incorrect predictions.
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
                                       seed=seed).set_index("score")
        for score in scores:
            key = score.lower()
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
    :class:`~segx_helpers.tutorial.results.Results` whose rows are ``table``'s (``distance_px``,
    ``shortcut_driven``), in the same order."""
    codes = np.asarray(bins.assign(table["distance_px"].to_numpy()).codes)
    driven = table["shortcut_driven"].to_numpy(dtype=bool)
    far = results.select(driven & (codes == len(bins.labels) - 1)).sort("c_IoU").head(n)
    near = results.select(driven & (codes == 0)).sort("c_IoU", ascending=False).head(n)
    return {"far from": far, "next to": near}


def prediction_rows(result: dict, class_names: list[str]) -> pd.DataFrame:
    """The decisions of :func:`segx_helpers.tutorial.training_recipes.evaluate_classifier` as prediction rows
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
    from PIL import Image

    from segx_helpers.data.synthetic import artefact_masks

    pairs = shortcut_pairs(data.info)
    if not pairs or not (data.root / "artefacts").is_dir():
        return None
    masks = artefact_masks(data.root, list(image_ids), sorted(set(pairs.values())))
    if masks.shape[1:] == (size, size):
        return masks
    return np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in masks])


def error_taxonomy(data: LoadedDataset, table: pd.DataFrame, targets: np.ndarray) -> np.ndarray:
    """:func:`segx_helpers.scores.segu.error_types` of each prediction row of ``table`` (``image_id``, ``class``,
    ``correct``, ``image_index``) for a multiclass dataset with one shortcut class and its artefact
    (synthetic-derm: melanoma and ink); ``targets`` ``(N,)`` are the split's class indices. For any other
    dataset (multi-label, real data without a planted shortcut) every error is ``"other error"``."""
    from segx_helpers.scores.segu import error_types

    generator = data.info.generator or {}
    correct = table["correct"].to_numpy(dtype=bool)
    if data.info.task != "multiclass" or "shortcut_class" not in generator:
        return np.where(correct, "correct", "other error").astype(object)
    artefacts = load_artefacts(data.root).set_index("image_id")[generator["shortcut_artefact"]]
    present = artefacts.loc[table["image_id"]].to_numpy(dtype=bool)
    true_class = np.asarray(data.info.class_names)[np.asarray(targets)[table["image_index"].to_numpy()]]
    return error_types(correct, table["class"].to_numpy(), true_class, present, generator["shortcut_class"])


def shortcut_breakdown(result: dict, artefacts: pd.DataFrame, shortcut: dict[str, str] | Sequence[str],
                       class_names: list[str]) -> pd.DataFrame:
    """Accuracy (and AUROC) where an artefact agrees vs disagrees with the label, per (class, artefact).

    ``result``: from :func:`segx_helpers.tutorial.training_recipes.evaluate_classifier` (``image_id``, ``targets``,
    ``pred``, and ``probs`` for the AUROC column); ``shortcut`` maps a class name to the artefact column
    correlated with it (e.g. ``{"melanoma": "ink"}``), or is a list of artefact columns, each paired with
    the positive class (the last class of a two-class task, e.g. ``malignant``; see
    :func:`positive_class`). "agrees" means artefact present exactly when the class is present. The AUROC
    is that class's probability against its presence within the rows (NaN where one outcome is missing).
    """
    pairs = list(shortcut.items()) if isinstance(shortcut, dict) else [(positive_class(class_names), c) for c in shortcut]
    table = artefacts.set_index("image_id").loc[result["image_id"]]
    targets = np.asarray(result["targets"])
    pred = np.asarray(result["pred"])
    probs = np.asarray(result["probs"]) if "probs" in result else None
    rows = []
    for class_name, column in pairs:
        c = class_names.index(class_name)
        truth = targets == c if targets.ndim == 1 else targets[:, c] > 0.5
        decided = pred == c if pred.ndim == 1 else pred[:, c] > 0
        correct = (pred == targets) if targets.ndim == 1 else (decided == truth)
        agrees = table[column].to_numpy(dtype=bool) == truth
        for name, rows_mask in (("agrees", agrees), ("disagrees", ~agrees)):
            auroc = float("nan")
            if probs is not None and 0 < truth[rows_mask].sum() < rows_mask.sum():
                from sklearn.metrics import roc_auc_score
                auroc = float(roc_auc_score(truth[rows_mask], probs[rows_mask, c]))
            rows.append({"class": class_name, "artefact": column, "artefact vs label": name, "images": int(rows_mask.sum()),
                         "accuracy": float(correct[rows_mask].mean()) if rows_mask.any() else float("nan"),
                         "auroc": auroc})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------- annotated artefacts, any dataset

def positive_class(class_names: Sequence[str]) -> str:
    """The class artefacts are compared with: the second of two classes (``malignant`` in
    ``["benign", "malignant"]``); more classes need an explicit choice."""
    if len(class_names) != 2:
        raise ValueError(f"{len(class_names)} classes {list(class_names)}: name the class to compare artefacts with")
    return class_names[1]


def artefact_columns(root: str | Path) -> list[str]:
    """The artefact columns of a dataset's optional ``artefacts.csv`` (empty when it has none)."""
    path = Path(root) / "artefacts.csv"
    if not path.is_file():
        return []
    return [c for c in pd.read_csv(path, nrows=0).columns if c != "image_id"]


def artefact_table(data: LoadedDataset) -> pd.DataFrame:
    """``artefacts.csv`` joined with each image's split and label columns (one row per image, table order)."""
    path = data.root / "artefacts.csv"
    if not path.is_file():
        raise ValueError(f"{data.root} has no artefacts.csv: no artefact flags were recorded for this dataset")
    flags = pd.read_csv(path, dtype={"image_id": str})
    labels = data.table.drop(columns=["image_path", "mask_path"], errors="ignore")
    return labels.merge(flags, on="image_id", how="left", validate="one_to_one")


def artefact_label_correlation(data: LoadedDataset, columns: Sequence[str] | None = None,
                               class_name: str | None = None) -> pd.DataFrame:
    """Phi correlation of each artefact flag with one class, per split: the shortcut a split offers.

    ``columns``: artefacts to report (default every column of ``artefacts.csv``); ``class_name``: the
    class (default :func:`positive_class`). Columns: split, artefact, class, phi, prevalence (share of the
    split's images with the artefact), with class (images with the artefact and the class), images.
    A positive phi in train and a negative one in test is a trap: a model that learnt the artefact fails.
    """
    table = artefact_table(data)
    columns = list(columns or artefact_columns(data.root))
    class_name = class_name or positive_class(data.info.class_names)
    has_class = _has_class(table, data, class_name)
    rows = []
    for split in ("train", "val", "test"):
        in_split = (table["split"] == split).to_numpy()
        for column in columns:
            flag = table[column].to_numpy(dtype=bool)
            rows.append({"split": split, "artefact": column, "class": class_name,
                         "phi": phi_correlation(flag[in_split], has_class[in_split]),
                         "prevalence": float(flag[in_split].mean()) if in_split.any() else float("nan"),
                         "with class": int((flag & has_class)[in_split].sum()), "images": int(in_split.sum())})
    return pd.DataFrame(rows)


def _has_class(table: pd.DataFrame, data: LoadedDataset, class_name: str) -> np.ndarray:
    if data.info.task == "multiclass":
        return (table["label"] == class_name).to_numpy()
    return table[class_name].to_numpy() == 1


def lesion_areas(data: LoadedDataset, image_ids: Sequence[str] | None = None) -> pd.Series:
    """Share of each image covered by its ground-truth mask (the lesion size), indexed by image id; NaN
    for an image without a mask. Default: every image of the dataset."""
    table = data.table.set_index("image_id")
    ids = list(table.index if image_ids is None else image_ids)
    areas = [float(read_mask(path).mean()) if isinstance(path, str) else float("nan")
             for path in table.loc[ids, "mask_path"]]
    return pd.Series(areas, index=pd.Index(ids, name="image_id"), name="lesion area")


def lesion_size_auroc(data: LoadedDataset, class_name: str | None = None,
                      areas: pd.Series | None = None) -> pd.DataFrame:
    """Per split: AUROC of the ground-truth lesion area alone as a score for ``class_name`` (default
    :func:`positive_class`), and the median area with and without the class. Far from 0.5 means lesion
    size is itself a shortcut a classifier can use; a change between splits means the split moved it."""
    from sklearn.metrics import roc_auc_score

    class_name = class_name or positive_class(data.info.class_names)
    areas = lesion_areas(data) if areas is None else areas
    table = data.table.assign(area=areas.reindex(data.table["image_id"]).to_numpy())
    table["has_class"] = _has_class(table, data, class_name)
    rows = []
    for split in ("train", "val", "test"):
        part = table[(table["split"] == split) & table["area"].notna()]
        y = part["has_class"].to_numpy()
        rows.append({"split": split, "class": class_name, "images": len(part),
                     "AUROC of lesion area": float(roc_auc_score(y, part["area"])) if 0 < y.sum() < len(y) else float("nan"),
                     f"median area, {class_name}": float(part.loc[y, "area"].median()),
                     f"median area, not {class_name}": float(part.loc[~y, "area"].median())})
    return pd.DataFrame(rows)


def size_strata(areas: pd.Series, n_strata: int = 3) -> pd.Series:
    """Lesion-size strata of equal counts (quantiles of ``areas``), labelled ``small``/``medium``/``large``
    for three (``size 1`` .. ``size n`` otherwise) with the area range in the label."""
    names = ["small", "medium", "large"] if n_strata == 3 else [f"size {k + 1}" for k in range(n_strata)]
    codes, edges = pd.qcut(areas.rank(method="first"), n_strata, labels=False, retbins=True)
    out = pd.Series(index=areas.index, dtype=object, name="size stratum")
    for k in range(n_strata):
        members = codes == k
        if members.any():
            low, high = areas[members].min(), areas[members].max()
            out[members] = f"{names[k]} ({low:.0%}-{high:.0%})"
    return out


def score_by_artefact(scores: pd.DataFrame, artefacts: pd.DataFrame, columns: Sequence[str], score: str = "c_IoU",
                      strata: pd.Series | None = None) -> pd.DataFrame:
    """Does ``score`` differ between predictions on images with and without each artefact, within strata?

    ``scores``: one row per prediction with ``image_id`` and ``score`` (e.g. SegU's ``c_IoU``, or a
    localisation column); ``artefacts``: ``image_id`` + 0/1 columns; ``strata``: a label per image id
    (e.g. :func:`size_strata` of :func:`lesion_areas`), default one stratum. Per artefact and stratum:
    images with / without, mean score with / without, their difference, and the AUROC of the score for
    "artefact absent" (0.5: no difference; above: lower scores where the artefact is). The ``all strata``
    row pools the strata with weights n_with * n_without / n (a size-adjusted difference), so a difference
    that only comes from lesion size (small lesions leave more of a map outside them) disappears there.
    """
    from sklearn.metrics import roc_auc_score

    flags = artefacts.set_index("image_id")
    frame = scores[["image_id", score]].dropna().copy()
    frame["stratum"] = "all images" if strata is None else strata.reindex(frame["image_id"]).to_numpy()
    frame = frame[frame["stratum"].notna()]
    rows = []
    for column in columns:
        present = flags[column].reindex(frame["image_id"]).to_numpy(dtype=float) > 0.5
        pooled, weights = [], []
        for stratum in sorted(frame["stratum"].unique(), key=str):
            inside = (frame["stratum"] == stratum).to_numpy()
            with_, without = frame[score].to_numpy()[inside & present], frame[score].to_numpy()[inside & ~present]
            difference = float(with_.mean() - without.mean()) if len(with_) and len(without) else float("nan")
            auroc = float("nan")
            if len(with_) and len(without):
                values = np.concatenate([with_, without])
                auroc = float(roc_auc_score(np.r_[np.zeros(len(with_)), np.ones(len(without))], values))
                weight = len(with_) * len(without) / (len(with_) + len(without))
                pooled.append(difference)
                weights.append(weight)
            rows.append({"artefact": column, "stratum": stratum, "with": len(with_), "without": len(without),
                         "mean with": float(with_.mean()) if len(with_) else float("nan"),
                         "mean without": float(without.mean()) if len(without) else float("nan"),
                         "difference": difference, "AUROC (absent vs present)": auroc})
        if strata is not None:
            rows.append({"artefact": column, "stratum": "all strata (size-adjusted)",
                         "with": int(present.sum()), "without": int((~present).sum()),
                         "mean with": float(frame[score][present].mean()) if present.any() else float("nan"),
                         "mean without": float(frame[score][~present].mean()) if (~present).any() else float("nan"),
                         "difference": float(np.average(pooled, weights=weights)) if weights else float("nan"),
                         "AUROC (absent vs present)": float("nan")})
    return pd.DataFrame(rows)


def scores_by_artefact(data: LoadedDataset, table: pd.DataFrame, scores: Sequence[str],
                       image_ids: Sequence[str]) -> pd.DataFrame | None:
    """:func:`score_by_artefact` for several ``scores`` columns of a prediction table, within lesion-size strata
    (:func:`size_strata` of the ground-truth :func:`lesion_areas` of ``image_ids``, the split's images), stacked
    with a ``score`` column. ``None`` for a dataset without annotated artefacts (no ``artefacts.csv`` columns) or a
    synthetic one with counterfactual twins, whose ground truth is the twins."""
    columns = artefact_columns(data.root)
    if not columns or shortcut_pairs(data.info):
        return None
    strata = size_strata(lesion_areas(data, list(image_ids)))
    return pd.concat([score_by_artefact(table, artefact_table(data), columns, score=s, strata=strata).assign(score=s)
                      for s in scores], ignore_index=True)


def pooled_differences(by_artefact: pd.DataFrame) -> pd.DataFrame:
    """The size-adjusted difference (with the artefact minus without) of each score, pooled over the strata: one
    row per artefact, one column per score, from :func:`scores_by_artefact`."""
    pooled = by_artefact[by_artefact["stratum"].str.startswith("all strata")]
    return pooled.pivot(index="artefact", columns="score", values="difference")
