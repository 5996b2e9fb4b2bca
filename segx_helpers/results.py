"""Explanation results on disk: one folder per method with a manifest and per-(image, class) files.

::

    <folder>/manifest.csv        one row per (image, class): image_id, class, class_index, score,
                                 true_label, correct, outcome (TP/FP or correct/wrong), file paths
    <folder>/raw/<id>__<class>.npy       original map (H, W) float32
    <folder>/segx/<id>__<class>.npy      SegX map (H, W) float32
    <folder>/overlays/<id>__<class>.png  image + map heat + mask outline + top-p % outline

Folders are written whole to a temporary name and renamed when complete, and an existing
folder is replaced only if it holds a manifest written here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from .explain import Explanations
from .io import atomic_path, check_safe_id
from .segx import top_percent
from .viz import overlay

MANIFEST = "manifest.csv"


def prediction_table(explanations: Explanations, image_ids: Sequence[str], targets: np.ndarray, task: str,
                     class_names: Sequence[str]) -> pd.DataFrame:
    """One row per explained (image, class): score, true label and whether the prediction is right.

    Multilabel: a predicted class is a true positive (TP) if the image has that finding, else a false
    positive (FP). Multiclass: the prediction is correct if it is the image's class.
    """
    targets = np.asarray(targets)
    rows = explanations.image_index
    classes = explanations.class_index
    if task == "multiclass":
        true_label = (targets[rows] == classes).astype(int)
        outcome = np.where(true_label == 1, "correct", "wrong")
    else:
        true_label = targets[rows, classes].astype(int)
        outcome = np.where(true_label == 1, "TP", "FP")
    return pd.DataFrame({"image_id": [image_ids[i] for i in rows], "image_index": rows,
                         "class": [class_names[c] for c in classes], "class_index": classes,
                         "score": explanations.scores, "true_label": true_label, "correct": true_label == 1,
                         "outcome": outcome, "method": explanations.method})


def save_results(folder: str | Path, table: pd.DataFrame, maps: np.ndarray, segx_maps: np.ndarray,
                 images: np.ndarray, masks: np.ndarray, p: float = 5.0, overwrite: bool = True) -> Path:
    """Write a results folder (see module docstring). ``images`` ``(N, H, W, C)`` in [0, 1] and ``masks``
    ``(N, H, W)`` are indexed by ``table.image_index``; ``maps``/``segx_maps`` align with ``table`` rows."""
    folder = Path(folder)
    if len(table) != len(maps) or len(maps) != len(segx_maps):
        raise ValueError(f"table ({len(table)}), maps ({len(maps)}) and segx_maps ({len(segx_maps)}) must align")
    if folder.exists() and not (folder / MANIFEST).is_file():
        raise FileExistsError(f"{folder} exists and holds no {MANIFEST}: it was not written here, refusing to replace it")
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
    return folder


def load_results(folder: str | Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Read a results folder: ``(manifest, maps (M, H, W), segx_maps (M, H, W))``."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder / MANIFEST} not found: run notebook 04_segx_maps first")
    manifest = pd.read_csv(folder / MANIFEST, dtype={"image_id": str})
    maps = np.stack([np.load(folder / p) for p in manifest["raw_map"]]) if len(manifest) else np.zeros((0, 1, 1))
    segx_maps = np.stack([np.load(folder / p) for p in manifest["segx_map"]]) if len(manifest) else np.zeros((0, 1, 1))
    return manifest, maps, segx_maps


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
