"""Training: one loop for segmenters and classifiers, losses, prediction, and checkpoints.

A checkpoint is one file holding the state dict plus everything needed to rebuild and use the
model (``meta``: architecture, task, class names, image size, normalisation, thresholds, training
configuration, metrics) and ``content_sha256``, a SHA-256 of the weights and the metadata that is
checked on every load (a damaged file is refused, never used). It is loaded with
``torch.load(weights_only=True)``: no arbitrary pickles. Saving refuses to overwrite an existing file
unless asked.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from segx_helpers.data.io import atomic_path
from segx_helpers.models.networks import (CpuTraining, build_classifier, build_segmenter, cpu_supports_bf16, pick_device,
                     prepare_for_cpu_training)

CHECKPOINT_FORMAT = "segx-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what the caller expects."""


class NonFiniteScoreWarning(RuntimeWarning):
    """A validation score was NaN or infinite: that epoch cannot be the best one."""


# ------------------------------------------------------------------------------ reproducibility

def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels (exact repeats on CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


# ------------------------------------------------------------------------------ losses

class DiceBCELoss(nn.Module):
    """Dice + BCE on logits ``(N, 1, H, W)`` against masks in {0, 1} (smp's binary Dice loss)."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp  # lazy: about 1 s to import, and only segmenters need it

        self.dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, masks) + self.bce_weight * self.bce(logits, masks)


def classification_loss(task: str, class_weights: np.ndarray | None = None) -> nn.Module:
    """Cross-entropy on logits (multiclass) or BCE-with-logits (multilabel), optionally class-weighted.

    For multilabel, ``class_weights`` act as ``pos_weight`` (weight of positives per class).
    """
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    if task == "multiclass":
        return nn.CrossEntropyLoss(weight=weight)
    if task == "multilabel":
        return nn.BCEWithLogitsLoss(pos_weight=weight)
    raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")


def balanced_class_weights(targets: np.ndarray, task: str) -> np.ndarray:
    """Inverse-frequency weights: ``N / (C * count_c)`` (multiclass) or ``negatives / positives`` (multilabel)."""
    targets = np.asarray(targets)
    if task == "multiclass":
        counts = np.bincount(targets, minlength=int(targets.max()) + 1).astype(float)
        return len(targets) / (len(counts) * np.maximum(counts, 1))
    positives = targets.sum(axis=0).astype(float)
    return (len(targets) - positives) / np.maximum(positives, 1)


# ------------------------------------------------------------------------------ the loop

@dataclass
class TrainConfig:
    """How to train, and how :func:`fit` chooses the epoch it keeps.

    ``monitor`` names a key of the validation dict; higher is better, except for a key ending in
    ``_loss`` (e.g. ``"val_loss"``), which is minimised. ``min_epochs``: the first epochs are trained but
    never kept, and early stopping waits for them (an epoch of a model trained from scratch can win on
    a small validation split by noise alone); it counts from 1 and is capped at ``epochs``. 0 or 1: every
    epoch is a candidate. ``patience``: stop after this many candidate epochs without improvement.
    ``amp``: on a GPU float16 autocast with a gradient scaler, on a CPU the channels_last memory format;
    ``amp=False`` trains plain float32. ``cpu_bf16`` (opt-in, with ``amp``): bfloat16 autocast on a CPU that
    computes bfloat16 natively (:func:`segx_helpers.models.networks.cpu_supports_bf16`), about 2x the images/s of the
    tutorial's U-Net and ResNet-18 at 128 px (``make benchmark-training``); the notebooks' run modes turn it on
    (:class:`segx_helpers.tutorial.settings.RunSettings`). Neither setting enters the checkpoint fingerprint.
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5
    monitor: str = "val_score"
    min_epochs: int = 0
    seed: int = 0
    device: str | None = None
    amp: bool = True
    max_batches_per_epoch: int | None = None
    cpu_bf16: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.epochs, Integral) or isinstance(self.epochs, bool) or self.epochs < 1:
            problems.append(f"epochs must be a positive int, got {self.epochs!r}")
        if not (isinstance(self.lr, Real) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, Real) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.patience, Integral) or self.patience < 0:
            problems.append(f"patience must be an int >= 0, got {self.patience!r}")
        if not isinstance(self.min_epochs, Integral) or isinstance(self.min_epochs, bool) or self.min_epochs < 0:
            problems.append(f"min_epochs must be an int >= 0, got {self.min_epochs!r}")
        if not isinstance(self.monitor, str) or not self.monitor:
            problems.append(f"monitor must name a key of the validation dict (e.g. 'val_auroc'), got {self.monitor!r}")
        if self.max_batches_per_epoch is not None and (not isinstance(self.max_batches_per_epoch, Integral)
                                                        or self.max_batches_per_epoch < 1):
            problems.append(f"max_batches_per_epoch must be None or a positive int, got {self.max_batches_per_epoch!r}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    @property
    def minimises(self) -> bool:
        """Whether the monitored value is a loss (lower is better)."""
        return self.monitor.endswith("_loss")

    @property
    def first_candidate(self) -> int:
        """The first epoch (counting from 1) that :func:`fit` may keep: ``min_epochs`` capped at ``epochs``."""
        return max(1, min(self.min_epochs, self.epochs))

    def selection_rule(self) -> str:
        """The model-selection rule in one sentence, as :func:`fit` prints it."""
        direction = "lowest" if self.minimises else "highest"
        start = f" from epoch {self.first_candidate} on" if self.first_candidate > 1 else ""
        return (f"model selection: keeps the epoch with the {direction} {self.monitor}{start} "
                f"(of {self.epochs}); stops early after {self.patience} epochs without improvement")


@dataclass
class History:
    """One record per epoch: train loss, validation values, seconds; plus the best epoch."""

    records: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_value: float = -math.inf

    def frame(self):
        return pd.DataFrame(self.records)


def fit(model: nn.Module, loss_fn: nn.Module, train_loader: DataLoader, validate: Callable[[nn.Module], dict],
        config: TrainConfig, target_key: str = "target", checkpoint_path: str | Path | None = None,
        meta: dict | None = None, overwrite: bool = False, resume: bool = False,
        batch_loss: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> History:
    """Train ``model`` with AdamW, keeping the weights of the best validation epoch.

    ``validate(model)`` returns a dict with ``config.monitor`` (higher is better; lower for a key ending
    in ``_loss``) plus anything to log. Only epochs from ``config.min_epochs`` on can be kept; training
    stops early after ``patience`` epochs without improvement on the best of those (so never before
    ``min_epochs``). The rule is printed before the first epoch (:meth:`TrainConfig.selection_rule`).
    With ``checkpoint_path`` the best model is saved there (with ``meta``) and the latest
    epoch to ``<path>.last.pt`` for ``resume``. An existing checkpoint is an error unless
    ``overwrite`` or ``resume``. The model ends in eval mode holding the best weights.

    A NaN (or infinite) validation score never counts as an improvement and gives a
    :class:`NonFiniteScoreWarning`. If *no* epoch has a finite score, the last epoch's weights are
    kept (and saved), ``best_epoch`` is that epoch, ``best_value`` is NaN, and a warning says so: a
    trained model is never silently replaced by the initial weights.

    ``batch_loss(model, batch) -> loss`` replaces ``loss_fn(model(images), targets)`` when given: it gets
    the whole batch dict with its tensors on the device (e.g. ``batch["mask"]`` for a loss that uses the
    clinical mask, see :mod:`segx_helpers.studies.mask_training`); ``loss_fn`` is then unused.
    """
    set_seed(config.seed)
    device = pick_device(config.device)
    model.to(device)
    on_cpu = config.amp and device.type == "cpu"
    cpu = CpuTraining(channels_last=on_cpu, bf16=on_cpu and config.cpu_bf16 and cpu_supports_bf16())
    prepare_for_cpu_training(model, cpu)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history = History(best_value=math.inf if config.minimises else -math.inf)
    start_epoch = 0
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    last_path = last_checkpoint_path(path) if path is not None else None
    if path is not None and path.exists() and not (overwrite or resume):
        raise FileExistsError(f"Checkpoint {path} already exists; pass overwrite=True to retrain, or resume=True to continue.")
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume and last_path is not None and last_path.exists():
        raw = read_checkpoint(last_path)
        model.load_state_dict(raw["state_dict"])
        state = raw["training_state"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = History(records=json.loads(state["history"]), best_epoch=int(state["best_epoch"]),
                          best_value=float(state["best_value"]))
        best_state = read_checkpoint(path)["state_dict"] if path.exists() else best_state
        start_epoch = int(state["epoch"]) + 1
        torch.manual_seed(config.seed + start_epoch)

    print(config.selection_rule())
    for epoch in range(start_epoch, config.epochs):
        if epoch - history.best_epoch > config.patience and history.best_epoch >= 0:
            break
        started = time.perf_counter()
        model.train()
        losses = []
        batches = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                       total=_n_batches(train_loader, config.max_batches_per_epoch))
        for step, batch in enumerate(batches):
            if config.max_batches_per_epoch is not None and step >= config.max_batches_per_epoch:
                break
            images = batch["image"].to(device)
            targets = batch[target_key].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=use_amp), cpu.autocast():
                if batch_loss is not None:
                    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    loss = batch_loss(model, {**on_device, "image": images, target_key: targets})
                else:
                    loss = loss_fn(model(images), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Training loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate.")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            batches.set_postfix(loss=f"{np.mean(losses):.4f}")
        if not losses:
            raise ValueError(f"epoch {epoch + 1} took no training step: the loader gave no batch (is the batch size "
                             "larger than the training split, with drop_last?); nothing was trained or saved.")
        scheduler.step()
        model.eval()
        values = validate(model)
        if config.monitor not in values:
            raise KeyError(f"validate() returned {sorted(values)}, which lacks the monitored key {config.monitor!r}")
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **{k: float(v) for k, v in values.items()},
                  "seconds": time.perf_counter() - started}
        history.records.append(record)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        score = float(values[config.monitor])
        if not math.isfinite(score):
            warnings.warn(f"Validation {config.monitor} is {score} (not finite) at epoch {epoch + 1}, so this epoch cannot "
                          "be the best one (AUROC is undefined when the validation split lacks a class).",
                          NonFiniteScoreWarning, stacklevel=2)
        elif epoch + 1 >= config.first_candidate and (score < history.best_value if config.minimises
                                                     else score > history.best_value):
            history.best_value, history.best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if path is not None:
                save_checkpoint(path, model, {**(meta or {}), "history": history.records,
                                              "train_config": asdict(config)}, overwrite=True)
        if last_path is not None:
            save_checkpoint(last_path, model, meta or {}, overwrite=True, training_state={
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "history": json.dumps(history.records), "best_epoch": history.best_epoch,
                "best_value": history.best_value})
    if history.best_epoch < 0 and history.records:
        # No epoch had a finite score: keep the last epoch's (trained) weights rather than the initial ones.
        history.best_epoch, history.best_value = len(history.records) - 1, math.nan
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        warnings.warn(f"no epoch had a finite validation {config.monitor} ({history.records[-1].get(config.monitor)}); "
                      f"keeping the last epoch's weights (epoch {len(history.records)}) instead of a best epoch. Check "
                      "the validation split (does it hold every class?) or monitor another metric.",
                      NonFiniteScoreWarning, stacklevel=2)
        if path is not None:
            save_checkpoint(path, model, {**(meta or {}), "history": history.records, "train_config": asdict(config)},
                            overwrite=True)
    model.load_state_dict(best_state)
    model.eval()
    return history


def last_checkpoint_path(checkpoint: str | Path) -> Path:
    """Where :func:`fit` keeps the latest epoch's state for ``resume``: ``<checkpoint>.last.pt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".last.pt")


def _n_batches(loader: DataLoader, cap: int | None) -> int:
    return len(loader) if cap is None else min(len(loader), cap)


# ------------------------------------------------------------------------------ prediction

@torch.no_grad()
def predict_classifier(model: nn.Module, loader: DataLoader, task: str, device: str | None = None) -> dict:
    """Class probabilities ``(N, C)`` (softmax or sigmoid), the ``logits`` they come from, targets and ids
    for a whole loader."""
    device = pick_device(device)
    model.to(device).eval()
    probs, logit_batches, targets, ids = [], [], [], []
    for batch in loader:
        logits = model(batch["image"].to(device)).float()
        if task == "multiclass" and logits.ndim == 2 and logits.shape[1] == 1:
            raise ValueError("The model has one output, but task='multiclass' takes a softmax over the outputs, which "
                             "is always 1.0 for one output: use task='multilabel' (a sigmoid per output) or give the "
                             "model one output per class.")
        probs.append((logits.softmax(1) if task == "multiclass" else logits.sigmoid()).cpu().numpy())
        logit_batches.append(logits.cpu().numpy())
        targets.append(batch["target"].numpy())
        ids += list(batch["image_id"])
    return {"probs": np.concatenate(probs), "logits": np.concatenate(logit_batches), "targets": np.concatenate(targets),
            "image_id": ids}


@torch.no_grad()
def predict_masks(model: nn.Module, images: torch.Tensor | DataLoader, device: str | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """Foreground probabilities ``(N, H, W)`` from a segmenter, for a tensor ``(N, C, H, W)`` or a loader."""
    device = pick_device(device)
    model.to(device).eval()
    batches = images if isinstance(images, DataLoader) else torch.split(torch.as_tensor(images), batch_size)
    out = []
    for batch in batches:
        x = batch["image"] if isinstance(batch, dict) else batch
        out.append(model(x.to(device)).float().sigmoid()[:, 0].cpu().numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------ checkpoints

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
    stored = raw.get("content_sha256")  # absent in checkpoints written before it was introduced
    if stored is not None and stored != content_sha256(state_dict, raw["meta_json"]):
        raise CheckpointError(f"{path} is damaged: its weights or metadata do not match the SHA-256 stored when it "
                              "was saved (a bit flip, a partial copy or an edit). Restore it from a copy or train again.")
    return {"state_dict": state_dict, "meta": meta, "training_state": raw.get("training_state")}


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
