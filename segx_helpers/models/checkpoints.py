"""Trained models on disk: one checkpoint file per model, saved and loaded safely, the *fingerprint*
every checkpoint stores of what it was trained on, and the check that a checkpoint fits what is asked
for now.

A checkpoint is one file holding the state dict plus everything needed to rebuild and use the
model (``meta``: architecture, task, class names, image size, normalisation, thresholds, training
configuration, metrics) and ``content_sha256``, a SHA-256 of the weights and the metadata that is
checked on every load (a damaged file is refused, never used). The resume state of an unfinished run
(``<checkpoint>.last.pt``) also holds ``training_state`` (optimiser, scheduler, epoch counter, random
state) and ``training_sha256``, its SHA-256, checked the same way. A file written before these checksums
existed loads with an :class:`UnverifiedCheckpointWarning`. It is loaded with
``torch.load(weights_only=True)``: no arbitrary pickles. Saving refuses to overwrite an existing file
unless asked. :func:`load_trained` gives a :class:`TrainedModel` (model, metadata, history).

The fingerprint holds the dataset name, class names in order, task, image size, channels, a hash of
the training split's ids, the model choices and the training settings such as epochs and
``max_batches_per_epoch``; a mismatch is a :class:`CheckpointError` naming each differing field and
how to retrain. :func:`split_tensors` prepares a split the way a checkpoint expects.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from segx_helpers.data.format import LoadedDataset
from segx_helpers.data.io import atomic_path
from segx_helpers.data.torch_dataset import Normalization, SegXDataset
from segx_helpers.models.networks import build_classifier, build_segmenter, pick_device

CHECKPOINT_FORMAT = "segx-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what the caller expects."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint (or its training state) carries no SHA-256 (written by an older segx_helpers), so damage
    to it cannot be detected."""


# ------------------------------------------------------------------------------ one file

def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, overwrite: bool = False,
                    training_state: dict | None = None) -> Path:
    """Write ``model``'s weights and ``meta`` (JSON-serialisable) to one file, atomically.

    Refuses to replace an existing file unless ``overwrite``.
    """
    path = Path(path)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta_json = json.dumps(meta, default=_jsonable)
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": state_dict, "meta_json": meta_json,
               "content_sha256": content_sha256(state_dict, meta_json)}
    if training_state is not None:
        payload["training_state"] = training_state
        payload["training_sha256"] = training_sha256(training_state)
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(payload, tmp)
    return path


def content_sha256(state_dict: dict[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's name, dtype, shape and bytes (in key order),
    then the metadata text. Stored by :func:`save_checkpoint`, checked by :func:`read_checkpoint`."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}\t{tensor.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    digest.update(meta_json.encode())
    return digest.hexdigest()


def training_sha256(training_state: dict) -> str:
    """SHA-256 of a resume state (what :func:`~segx_helpers.models.training.fit` saves in ``.last.pt``): every
    value in it, nested dicts (in key order), lists, tensors (dtype, shape and bytes), numbers and text, each
    with its type. Stored by :func:`save_checkpoint`, checked by :func:`read_checkpoint`."""
    digest = hashlib.sha256()
    _digest_value(digest, training_state)
    return digest.hexdigest()


def _digest_value(digest, value) -> None:
    """Feed ``value`` to ``digest`` unambiguously (type, length and order included)."""
    if isinstance(value, dict):
        digest.update(f"dict {len(value)}\n".encode())
        for key in sorted(value, key=repr):
            digest.update(f"{key!r}:".encode())
            _digest_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}\n".encode())
        for item in value:
            _digest_value(digest, item)
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"{type(value).__name__} {value!r}\n".encode())
    else:
        raise TypeError(f"a training state cannot hold a {type(value).__name__} ({value!r:.80})")


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely (``weights_only=True``); returns state_dict, meta and training_state."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} not found.")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"Checkpoint {path} is corrupt or not a segx_helpers checkpoint "
                              f"({_load_failure(err)}).") from err
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file.")
    state_dict = raw.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} is damaged: its state_dict is missing or not a dict of tensors.")
    try:
        meta = json.loads(raw["meta_json"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged: its meta_json is missing or not valid JSON ({type(err).__name__}: {err}).") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is damaged: its meta_json holds a {type(meta).__name__}, not an object.")
    _verify(path, raw, state_dict)
    return {"state_dict": state_dict, "meta": meta, "training_state": raw.get("training_state")}


def _verify(path: Path, raw: dict, state_dict: dict) -> None:
    """Check the SHA-256 of the weights and metadata and, in a resume state, of the training state; a file
    written before a checksum existed gives an :class:`UnverifiedCheckpointWarning` instead."""
    stored = raw.get("content_sha256")
    if stored is None:
        warnings.warn(f"{path} has no SHA-256 of its contents (written by an older segx_helpers): it is loaded "
                      "unverified, so damage to it would go unnoticed. Save it again (or retrain) to add one.",
                      UnverifiedCheckpointWarning, stacklevel=3)
    elif stored != content_sha256(state_dict, raw["meta_json"]):
        raise CheckpointError(f"{path} is damaged: its weights or metadata do not match the SHA-256 stored when it "
                              "was saved (a bit flip, a partial copy or an edit). Restore it from a copy or train again.")
    state = raw.get("training_state")
    if state is None:
        return
    stored = raw.get("training_sha256")
    if stored is None:
        warnings.warn(f"{path} holds a training state without its SHA-256 (written by an older segx_helpers): "
                      "resuming from it is unverified.", UnverifiedCheckpointWarning, stacklevel=3)
        return
    try:
        actual = training_sha256(state)
    except TypeError as err:
        raise CheckpointError(f"{path} is damaged: its training state holds something a resume state never holds "
                              f"({err}).") from err
    if stored != actual:
        raise CheckpointError(f"{path} is damaged: its training state (optimiser, scheduler, epoch counter or random "
                              "state) does not match the SHA-256 stored when it was saved (a bit flip, a partial copy "
                              "or an edit), so the run cannot be resumed from it. Train again with overwrite (segx "
                              "train --overwrite).")


def _load_failure(err: Exception) -> str:
    """One line saying why ``torch.load`` failed, without torch's advice to unpickle the file."""
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        return ("torch cannot read it as tensors and plain data: it is damaged, not a checkpoint, or holds Python "
                "objects, which are never unpickled here")
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def load_checkpoint(path: str | Path, expected_kind: str | None = None, device: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model described by a checkpoint and load its weights; returns ``(model, meta)`` in eval mode.

    ``expected_kind`` ("classifier" or "segmenter") guards against passing the wrong file.
    """
    raw = read_checkpoint(path)
    meta = raw["meta"]
    kind = meta.get("kind")
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"{path} holds a {kind!r}, not a {expected_kind!r}.")
    needed = {"classifier": ("arch", "class_names", "in_channels"),
              "segmenter": ("encoder", "in_channels", "decoder_channels")}.get(kind)
    if needed is None:
        raise CheckpointError(f"{path}: unknown model kind {kind!r} in its metadata.")
    missing = [key for key in needed if key not in meta]
    if missing:
        raise CheckpointError(f"{path} is damaged: its metadata lacks {missing} (needed to rebuild the {kind}).")
    try:
        if kind == "classifier":
            model = build_classifier(meta["arch"], num_classes=len(meta["class_names"]), in_channels=meta["in_channels"])
        else:
            model = build_segmenter(meta["encoder"], encoder_weights=None, in_channels=meta["in_channels"],
                                    arch=meta.get("arch", "Unet"), decoder_channels=tuple(meta["decoder_channels"]))
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} has metadata that cannot rebuild its {kind} ({type(err).__name__}: {err}).") from err
    try:
        model.load_state_dict(raw["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match the architecture in its metadata: {str(err)[:500]}") from err
    return model.to(pick_device(device)).eval(), meta


def last_checkpoint_path(checkpoint: str | Path) -> Path:
    """Where :func:`~segx_helpers.models.training.fit` keeps the latest epoch's state for ``resume``:
    ``<checkpoint>.last.pt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".last.pt")


# ------------------------------------------------------------------------------ a trained model and its fingerprint


@dataclass
class TrainedModel:
    """A model ready to use, its checkpoint metadata and (when it was just trained) its history."""

    model: nn.Module
    meta: dict
    history: pd.DataFrame


def load_trained(checkpoint: str | Path, kind: str, expected: dict | None = None, how_to_retrain: str = "") -> TrainedModel:
    """Load a checkpoint written by :func:`~segx_helpers.workflows.training_recipes.train_segmenter` /
    ``train_classifier`` (``kind`` "segmenter" or "classifier").

    With ``expected`` (a fingerprint, or some of its fields) the checkpoint must have been trained
    on exactly that, and to the end, else :class:`CheckpointError` names every differing field and
    ends with ``how_to_retrain``.
    """
    model, meta = load_checkpoint(checkpoint, expected_kind=kind)
    if expected is not None:
        check_fingerprint(Path(checkpoint), meta, expected, how_to_retrain)
    return TrainedModel(model, meta, pd.DataFrame(meta.get("history", [])))


def training_fingerprint(data: LoadedDataset, image_size: int, config, **choices) -> dict:
    """What a model is trained on, as stored in its checkpoint (``meta["fingerprint"]``): dataset name,
    class names in order, task, image size, channels, SHA-256 of the sorted training ids, for a generated
    dataset its generator's parameters (``dataset_generator``: shortcut strength, artefact, image size, ...), the
    training settings (epochs, max_batches_per_epoch, lr, weight decay, patience, monitor, seed) and ``choices``
    (architecture, weights, batch size, normalisation).

    ``config`` is a :class:`~segx_helpers.models.training.TrainConfig`, read as a dataclass (every field but
    ``device``, ``amp``, ``cpu_bf16`` and ``cpu_fast_kernels``), so this module needs no import of the training
    loop, which imports it."""
    train_ids = sorted(str(i) for i in data.split("train")["image_id"])
    generator = getattr(data.info, "generator", None) or {}
    settings = {k: v for k, v in asdict(config).items() if k not in ("device", "amp", "cpu_bf16", "cpu_fast_kernels")}
    fingerprint = {"dataset": data.info.name, "class_names": list(data.info.class_names), "task": data.info.task,
                   "image_size": int(image_size), "channels": int(data.info.channels),
                   "train_ids_sha256": hashlib.sha256("\n".join(train_ids).encode()).hexdigest(),
                   **({"dataset_generator": generator} if generator else {}), **settings, **choices}
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
