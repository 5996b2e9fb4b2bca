"""Trained models on disk: a checkpoint loaded with its metadata (:class:`TrainedModel`), the
*fingerprint* every checkpoint stores of what it was trained on, and the check that a checkpoint
fits what is asked for now.

The fingerprint holds the dataset name, class names in order, task, image size, channels, a hash of
the training split's ids, the model choices and the training settings such as epochs and
``max_batches_per_epoch``; a mismatch is a :class:`~segx_helpers.models.training.CheckpointError` naming each
differing field and how to retrain. :func:`split_tensors` prepares a split the way a checkpoint expects.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from segx_helpers.data.format import LoadedDataset
from segx_helpers.data.torch_dataset import Normalization, SegXDataset
from segx_helpers.models.training import CheckpointError, TrainConfig, load_checkpoint


@dataclass
class TrainedModel:
    """A model ready to use, its checkpoint metadata and (when it was just trained) its history."""

    model: nn.Module
    meta: dict
    history: pd.DataFrame


def load_trained(checkpoint: str | Path, kind: str, expected: dict | None = None, how_to_retrain: str = "") -> TrainedModel:
    """Load a checkpoint written by :func:`~segx_helpers.tutorial.training_recipes.train_segmenter` /
    ``train_classifier`` (``kind`` "segmenter" or "classifier").

    With ``expected`` (a fingerprint, or some of its fields) the checkpoint must have been trained
    on exactly that, and to the end, else :class:`CheckpointError` names every differing field and
    ends with ``how_to_retrain``.
    """
    model, meta = load_checkpoint(checkpoint, expected_kind=kind)
    if expected is not None:
        check_fingerprint(Path(checkpoint), meta, expected, how_to_retrain)
    return TrainedModel(model, meta, pd.DataFrame(meta.get("history", [])))


def training_fingerprint(data: LoadedDataset, image_size: int, config: TrainConfig, **choices) -> dict:
    """What a model is trained on, as stored in its checkpoint (``meta["fingerprint"]``): dataset name,
    class names in order, task, image size, channels, SHA-256 of the sorted training ids, the training
    settings (epochs, max_batches_per_epoch, lr, weight decay, patience, monitor, seed) and ``choices``
    (architecture, weights, batch size, normalisation)."""
    train_ids = sorted(str(i) for i in data.split("train")["image_id"])
    settings = {k: v for k, v in asdict(config).items() if k not in ("device", "amp", "cpu_bf16")}
    fingerprint = {"dataset": data.info.name, "class_names": list(data.info.class_names), "task": data.info.task,
                   "image_size": int(image_size), "channels": int(data.info.channels),
                   "train_ids_sha256": hashlib.sha256("\n".join(train_ids).encode()).hexdigest(),
                   **settings, **choices}
    return json.loads(json.dumps(fingerprint, default=_plain))


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return asdict(value) if dataclasses.is_dataclass(value) else str(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_fingerprint(path: Path, meta: dict, expected: dict, how_to_retrain: str, require_finished: bool = True) -> None:
    """Raise :class:`CheckpointError` unless ``meta``'s fingerprint holds ``expected`` (and, with
    ``require_finished``, the run finished); the message names each differing field, then ``how_to_retrain``."""
    stored = meta.get("fingerprint")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} has no training fingerprint (written by an older segx_helpers), so it cannot be "
                              f"checked against this dataset and these settings. {how_to_retrain}")
    missing = object()
    differ = [f"{key}: checkpoint {_short(stored.get(key, '(absent)'))}, now {_short(value)}"
              for key, value in expected.items() if stored.get(key, missing) != value]
    if differ:
        raise CheckpointError(f"{path} was trained on something else than what is asked for now ("
                              + "; ".join(differ) + f"). {how_to_retrain}")
    if require_finished:
        require_finished_run(path, meta, how_to_retrain)


def require_finished_run(path: Path, meta: dict, how_to: str) -> None:
    """Raise :class:`CheckpointError` when ``meta`` says its training run did not finish (``finished`` False)."""
    if meta.get("finished") is False:
        raise CheckpointError(f"{path} holds an unfinished training run (interrupted?). {how_to}")


def split_tensors(data: LoadedDataset, split: str, meta: dict) -> dict:
    """One split as tensors prepared the way a checkpoint expects (its image size and normalisation)."""
    norm = Normalization(**{k: tuple(v) for k, v in meta["normalization"].items()})
    return SegXDataset(data, split, meta["image_size"], norm).tensors()
