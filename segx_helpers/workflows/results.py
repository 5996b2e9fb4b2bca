"""Explanation results on disk: one folder per method with a manifest and per-(image, class) files.

::

    <folder>/manifest.csv        one row per (image, class): image_id, class, class_index, confidence,
                                 true_label, correct, outcome (TP/FP or correct/incorrect), every score,
                                 file paths
    <folder>/raw/<id>__<class>.npy       original map (H, W) float32
    <folder>/segx/<id>__<class>.npy      SegX map (H, W) float32
    <folder>/overlays/<id>__<class>.png  image + map heat + mask outline + top-p % outline

    <folder>/.segx_results.json  marker: written by save_results, with the list of files it wrote

Folders are written whole to a temporary name and renamed when complete. An existing folder is
replaced only if it holds our marker *and* nothing but the files that marker lists: a folder
made by someone else, or one where the user has added files, is refused, never deleted.
"""
from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from segx_helpers.explain.targets import Explanations
from segx_helpers.data.io import atomic_path, check_only_listed_files, check_safe_id, files_below
from segx_helpers.scores.analysis import AnalysisOptions, analyse
from segx_helpers.scores.segx import segx, top_percent

MANIFEST = "manifest.csv"
MARKER = ".segx_results.json"


@dataclass(frozen=True)
class SplitLabels:
    """The images an explanation's ``image_index`` refers to, and what is known of them: ``image_ids`` ``(N,)``,
    ``targets`` ``(N,)`` class indices (multiclass) or ``(N, C)`` 0/1 (multilabel), the ``task`` and the
    ``class_names``. :meth:`of` takes them from a split's tensors and the dataset's info."""

    image_ids: Sequence[str]
    targets: np.ndarray
    task: str
    class_names: Sequence[str]

    def __post_init__(self) -> None:
        if self.task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be 'multiclass' or 'multilabel', got {self.task!r}")
        if len(self.image_ids) != len(self.targets):
            raise ValueError(f"{len(self.image_ids)} image ids but {len(self.targets)} targets: give one per image")

    @classmethod
    def of(cls, tensors: dict, info) -> "SplitLabels":
        """From :func:`~segx_helpers.models.checkpoints.split_tensors` (``image_id``, ``target``) and a dataset's
        info (``task``, ``class_names``)."""
        return cls(tensors["image_id"], np.asarray(tensors["target"]), info.task, info.class_names)


def prediction_table(explanations: Explanations, labels: SplitLabels) -> pd.DataFrame:
    """One row per explained (image, class): confidence, true label and whether the prediction is right.

    Multilabel: a predicted class is a true positive (TP) if the image has that finding, else a false
    positive (FP). Multiclass: the prediction is correct if it is the image's class, else incorrect.
    """
    targets = np.asarray(labels.targets)
    rows = explanations.image_index
    classes = explanations.class_index
    if labels.task == "multiclass":
        true_label = (targets[rows] == classes).astype(int)
        outcome = np.where(true_label == 1, "correct", "incorrect")
    else:
        true_label = targets[rows, classes].astype(int)
        outcome = np.where(true_label == 1, "TP", "FP")
    return pd.DataFrame({"image_id": [labels.image_ids[i] for i in rows], "image_index": rows,
                         "class": [labels.class_names[c] for c in classes], "class_index": classes,
                         "confidence": explanations.confidence, "true_label": true_label, "correct": true_label == 1,
                         "outcome": outcome, "method": explanations.method})


def save_results(folder: str | Path, table: pd.DataFrame, maps: np.ndarray, segx_maps: np.ndarray,
                 images: np.ndarray, masks: np.ndarray, p: float = 5.0, overwrite: bool = True) -> Path:
    """Write a results folder (see module docstring). ``images`` ``(N, H, W, C)`` in [0, 1] and ``masks``
    ``(N, H, W)`` are indexed by ``table.image_index``; ``maps``/``segx_maps`` align with ``table`` rows.

    An existing ``folder`` is replaced (``overwrite=True``) only if save_results wrote it and it holds
    nothing else (see the module docstring); otherwise ``FileExistsError``."""
    folder = Path(folder)
    if len(table) != len(maps) or len(maps) != len(segx_maps):
        raise ValueError(f"table ({len(table)}), maps ({len(maps)}) and segx_maps ({len(segx_maps)}) must align")
    if folder.exists() and overwrite:
        _check_replaceable(folder)
    tops = top_percent(segx_maps, p) if len(segx_maps) else np.zeros_like(segx_maps, dtype=bool)
    manifest = table.copy()
    with atomic_path(folder, overwrite=overwrite) as tmp:
        for sub in ("raw", "segx", "overlays"):
            (tmp / sub).mkdir(parents=True)
        names = []
        for k, row in enumerate(table.to_dict("records")):
            name = f"{check_safe_id(row['image_id'])}__{check_safe_id(row['class'], 'class name')}"
            np.save(tmp / "raw" / f"{name}.npy", maps[k].astype(np.float32))
            np.save(tmp / "segx" / f"{name}.npy", segx_maps[k].astype(np.float32))
            picture = overlay(images[row['image_index']], segx_maps[k], masks[row['image_index']] >= 0.5, tops[k])
            Image.fromarray(picture).save(tmp / "overlays" / f"{name}.png")
            names.append(name)
        manifest["raw_map"] = [f"raw/{n}.npy" for n in names]
        manifest["segx_map"] = [f"segx/{n}.npy" for n in names]
        manifest["overlay"] = [f"overlays/{n}.png" for n in names]
        manifest.to_csv(tmp / MANIFEST, index=False)
        written = sorted(files_below(tmp, MARKER))
        (tmp / MARKER).write_text(json.dumps({"written_by": "segx_helpers.workflows.results.save_results", "files": written},
                                             indent=1) + "\n")
    return folder


def _check_replaceable(folder: Path) -> None:
    """Refuse (``FileExistsError``) to replace ``folder`` unless it holds only what save_results wrote there."""
    marker = folder / MARKER
    refuse = f"refusing to replace {folder}; choose another folder, or move your files out / remove it yourself"
    if not folder.is_dir() or not marker.is_file():
        raise FileExistsError(f"{folder} exists and was not written here (it has no {MARKER} marker from save_results): {refuse}.")
    check_only_listed_files(folder, MARKER, refuse)


@dataclass
class Results:
    """One method's explanations with their rows, aligned: ``table`` has one row per map (image id,
    class, confidence, correct, every SegU and localisation score), ``maps`` ``(M, H, W)`` the original
    explanations and ``segx_maps`` ``(M, H, W)`` the SegX maps, row ``k`` of each belonging together.

    Select with :meth:`select`, :meth:`sort` and :meth:`head`; the maps follow the rows, so nobody
    computes an index offset.
    """

    table: pd.DataFrame
    maps: np.ndarray
    segx_maps: np.ndarray

    def __post_init__(self) -> None:
        self.table = self.table.reset_index(drop=True)
        if not len(self.table) == len(self.maps) == len(self.segx_maps):
            raise ValueError(f"table ({len(self.table)}), maps ({len(self.maps)}) and segx_maps "
                             f"({len(self.segx_maps)}) must have one row per map")

    def __len__(self) -> int:
        return len(self.table)

    def select(self, rows) -> "Results":
        """The rows given by a boolean mask ``(M,)`` or positions, maps included."""
        rows = np.asarray(rows)
        positions = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        return Results(self.table.iloc[positions], self.maps[positions], self.segx_maps[positions])

    def sort(self, by: str, ascending: bool = True) -> "Results":
        """All rows ordered by a column (stable), maps included."""
        return self.select(np.argsort(self.table[by].to_numpy(), kind="stable")[:: 1 if ascending else -1])

    def head(self, n: int) -> "Results":
        return self.select(np.arange(min(n, len(self))))

    def matching(self, table: pd.DataFrame) -> "Results":
        """The rows explaining the same (image_id, class) pairs as ``table``'s rows, in its order
        (e.g. another method's maps for the predictions chosen in this one). Raises ``KeyError`` for a
        pair this method did not explain."""
        lookup = {pair: k for k, pair in enumerate(zip(self.table["image_id"], self.table["class"]))}
        wanted = list(zip(table["image_id"], table["class"]))
        missing = [pair for pair in wanted if pair not in lookup]
        if missing:
            raise KeyError(f"not explained here: {missing[:3]}")
        return self.select(np.array([lookup[pair] for pair in wanted], dtype=np.int64))

    def save(self, folder: str | Path, images: np.ndarray, masks: np.ndarray, p: float = 5.0) -> Path:
        """:func:`save_results` for these rows and maps."""
        return save_results(folder, self.table, self.maps, self.segx_maps, images, masks, p=p)


def rows_for_images(results: Results, image_ids: Sequence[str]) -> Results:
    """The first row of each image of ``image_ids``, in that order, maps included (e.g. every model's map of the
    same test images). Raises ``KeyError`` for an image without a row."""
    first = {}
    for k, image_id in enumerate(results.table["image_id"]):
        first.setdefault(image_id, k)
    missing = [i for i in image_ids if i not in first]
    if missing:
        raise KeyError(f"no prediction row for: {missing[:3]}")
    return results.select(np.array([first[i] for i in image_ids], dtype=np.int64))


def explanation_results(explanations: Explanations, labels: SplitLabels, predicted_masks: np.ndarray,
                        true_masks: np.ndarray | None = None, has_true_mask: np.ndarray | None = None,
                        artefact_masks: np.ndarray | None = None, *, order: str = "mask-then-top",
                        options: AnalysisOptions | None = None) -> Results:
    """Explanations of one method, scored: the prediction rows (:func:`prediction_table`), every SegU and
    localisation score from :func:`segx_helpers.scores.analysis.analyse` (the one analysis path; the masks and
    ``options`` as it takes them), the maps and their SegX maps in the given ``order``. ``predicted_masks`` /
    ``true_masks`` are boolean ``(N, H, W)`` per image (binarise once with
    :func:`segx_helpers.scores.analysis.binarise_masks`)."""
    options = options if options is not None else AnalysisOptions()
    scores = analyse(explanations.maps, predicted_masks, true_masks, explanations.image_index, has_true_mask,
                     artefact_masks, options=options)
    table = pd.concat([prediction_table(explanations, labels), scores], axis=1)
    masks = np.asarray(predicted_masks)[explanations.image_index]
    aligned = segx(explanations.maps, masks, order=order, p=options.p) if len(masks) else explanations.maps.copy()
    return Results(table, explanations.maps, aligned)


def load_results(folder: str | Path) -> Results:
    """Read a results folder written by :func:`save_results` (or :meth:`Results.save`)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder / MANIFEST} not found: run notebook 04_segx_maps first")
    manifest = pd.read_csv(folder / MANIFEST, dtype={"image_id": str})
    maps = np.stack([np.load(folder / p) for p in manifest["raw_map"]]) if len(manifest) else np.zeros((0, 1, 1))
    segx_maps = np.stack([np.load(folder / p) for p in manifest["segx_map"]]) if len(manifest) else np.zeros((0, 1, 1))
    return Results(manifest, maps, segx_maps)


def save_split_arrays(path: str | Path, **arrays: np.ndarray) -> Path:
    """Save named arrays (e.g. a split's predicted and true masks) to one ``.npz`` file, atomically."""
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return path


def load_split_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Read arrays saved by :func:`save_split_arrays`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run notebook 04_segx_maps first")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None, top: np.ndarray | None = None,
            alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``: ``image`` (``(H, W[, C])`` in [0, 1]) blended with ``heat`` as a jet
    heat map (scaled to its 99th percentile, so a few extreme SHAP pixels do not wash it out), with
    the mask outlined in cyan and the top-p % region outlined in white."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    positive = heat[heat > 0]
    peak = float(np.percentile(positive, 99)) if positive.size else 0.0
    coloured = colormaps["jet"](np.clip(heat / peak, 0, 1) if peak > 0 else heat)[..., :3]
    out = (1 - alpha) * image + alpha * coloured
    for region, colour in ((mask, (0.0, 0.9, 1.0)), (top, (1.0, 1.0, 1.0))):
        if region is not None and region.any():
            edge = region & ~ndimage.binary_erosion(region)
            out[edge] = colour
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
