"""Ground truth for shortcut reliance, which only the synthetic sets have: did a prediction rely on the
spurious artefact? Answered causally with counterfactual twins (the same image rendered again with the
artefact flipped, see :mod:`segx_helpers.data.format`), plus the accuracy breakdown by whether the artefact
agrees with the label.

For a real dataset every function here says plainly that it has no twins.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torchvision import tv_tensors

from .data.format import LoadedDataset, read_image
from .data.synthetic import shortcut_pairs, twin_path
from .data.torch_dataset import Normalization, make_transforms
from .explain import _predict


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
    :func:`segx_helpers.results.prediction_table`): does it change when the shortcut artefact of that
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
            probs = _predict(model, twin_images(data, list(unique), artefact, meta), task, batch_size, device)[inverse]
            if task == "multiclass":
                predicted = np.array(classes)[probs.argmax(axis=1)]
                out[rows] = predicted != table["class"].to_numpy()[rows]
            else:
                c = classes.index(class_name)
                out[rows] = probs[:, c] < thresholds[c]
    finally:
        model.train(was_training)
    return out


def prediction_rows(result: dict, class_names: list[str]) -> pd.DataFrame:
    """The decisions of :func:`segx_helpers.pipeline.evaluate_classifier` as prediction rows (``image_id``,
    ``class``): one per image (multiclass) or one per predicted finding (multilabel)."""
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

    from .data.synthetic import artefact_masks

    pairs = shortcut_pairs(data.info)
    if not pairs or not (data.root / "artefacts").is_dir():
        return None
    masks = artefact_masks(data.root, list(image_ids), sorted(set(pairs.values())))
    if masks.shape[1:] == (size, size):
        return masks
    return np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in masks])


def shortcut_breakdown(result: dict, artefacts: pd.DataFrame, shortcut: dict[str, str], class_names: list[str]) -> pd.DataFrame:
    """Accuracy where the spurious artefact agrees vs disagrees with the label, per shortcut class.

    ``result``: from :func:`segx_helpers.pipeline.evaluate_classifier` (``image_id``, ``targets``,
    ``pred``); ``shortcut`` maps a class name to the artefact column correlated with it (e.g.
    ``{"melanoma": "ink"}``); "agrees" means artefact present exactly when the class is present.
    """
    table = artefacts.set_index("image_id").loc[result["image_id"]]
    targets = np.asarray(result["targets"])
    pred = np.asarray(result["pred"])
    rows = []
    for class_name, column in shortcut.items():
        c = class_names.index(class_name)
        truth = targets == c if targets.ndim == 1 else targets[:, c] > 0.5
        decided = pred == c if pred.ndim == 1 else pred[:, c] > 0
        correct = (pred == targets) if targets.ndim == 1 else (decided == truth)
        agrees = table[column].to_numpy(dtype=bool) == truth
        for name, rows_mask in (("agrees", agrees), ("disagrees", ~agrees)):
            rows.append({"class": class_name, "artefact": column, "artefact vs label": name, "images": int(rows_mask.sum()),
                         "accuracy": float(correct[rows_mask].mean()) if rows_mask.any() else float("nan")})
    return pd.DataFrame(rows)
