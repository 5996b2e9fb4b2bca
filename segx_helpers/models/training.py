"""Training: one loop for segmenters and classifiers (:func:`fit`), losses, and prediction.

:func:`fit` writes its checkpoints with :mod:`segx_helpers.models.checkpoints` (the best epoch's model, and
the latest epoch's state for ``resume``: weights, optimiser, scheduler, history and every random-number state
the next epoch draws from, :func:`random_state`, so that a resumed run repeats an uninterrupted one).
"""
from __future__ import annotations

import json
import math
import random
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

from segx_helpers.models.checkpoints import CheckpointError, last_checkpoint_path, read_checkpoint, save_checkpoint
from segx_helpers.models.networks import (CpuTraining, contiguous_narrow_norms, cpu_supports_bf16,
                                          has_grouped_convolutions, pick_device, prepare_for_cpu_training)

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


class InexactResumeWarning(UserWarning):
    """A resumed run cannot repeat the uninterrupted one exactly (its resume state lacks the random state, or the
    loader's worker processes hold random state that cannot be saved)."""


def random_state(loader=None) -> dict:
    """Every random-number state a training epoch draws from, as plain tensors and numbers (what a checkpoint
    loaded with ``weights_only=True`` may hold): torch's (``"torch"``; ``"cuda"``, one per device once CUDA is
    in use), NumPy's global generator, Python's ``random`` and ``loader``'s own generator (``"loader"``: the
    shuffling order and the worker seeds of :func:`make_loader`'s loaders; None for a loader without one).
    :func:`restore_random_state` puts it back."""
    numpy_state = np.random.get_state(legacy=False)
    python_state = random.getstate()
    generator = getattr(loader, "generator", None)
    return {"torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized()
            else [],
            "numpy": {"bit_generator": numpy_state["bit_generator"],
                      "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                      "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                      "gauss": float(numpy_state["gauss"])},
            "python": [python_state[0], list(python_state[1]), python_state[2]],
            "loader": generator.get_state() if generator is not None else None}


def restore_random_state(state: dict, loader=None) -> None:
    """Put back a :func:`random_state` (``loader``'s generator too, when both have one)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator = getattr(loader, "generator", None)
    if generator is not None and state["loader"] is not None:
        generator.set_state(state["loader"])


# ------------------------------------------------------------------------------ losses

class DiceBCELoss(nn.Module):
    """Dice + BCE on logits ``(N, 1, H, W)`` against masks in {0, 1} (smp's binary Dice loss)."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp  # lazy: slow to import, and only segmenters need it

        self.dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, masks) + self.bce_weight * self.bce(logits, masks)


def classification_loss(task: str, class_weights: np.ndarray | None = None, label_smoothing: float = 0.0) -> nn.Module:
    """Cross-entropy on logits (multiclass) or BCE-with-logits (multilabel), optionally class-weighted and with
    label smoothing (multiclass: PyTorch's ``label_smoothing``; multilabel: targets pulled towards 0.5 by
    ``label_smoothing / 2``).

    For multilabel, ``class_weights`` act as ``pos_weight`` (weight of positives per class).
    """
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    if task == "multiclass":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=float(label_smoothing))
    if task == "multilabel":
        loss = nn.BCEWithLogitsLoss(pos_weight=weight)
        return SmoothedBCE(loss, label_smoothing) if label_smoothing else loss
    raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")


class SmoothedBCE(nn.Module):
    """BCE-with-logits on targets moved towards 0.5 by ``smoothing / 2`` (1 -> 1 - smoothing / 2)."""

    def __init__(self, loss: nn.BCEWithLogitsLoss, smoothing: float) -> None:
        super().__init__()
        self.loss, self.smoothing = loss, float(smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, targets * (1 - self.smoothing) + self.smoothing / 2)


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
    ``selection_window``: the monitored value is averaged over the last this-many epochs before epochs are
    compared (1: each epoch's own value), so that one lucky epoch on a small validation split does not win;
    the epoch kept is the last of the best window, and no epoch before the first full window is a candidate. ``warmup_epochs``: the learning rate rises linearly over the
    first epochs (from ``lr / (warmup_epochs + 1)``) before the cosine decay over the rest; 0: cosine from the
    start.
    ``amp``: on a GPU float16 autocast with a gradient scaler, on a CPU the channels_last memory format;
    ``amp=False`` trains plain float32. ``cpu_bf16`` (opt-in, with ``amp``): bfloat16 autocast on a CPU that
    computes bfloat16 natively (:func:`segx_helpers.models.networks.cpu_supports_bf16`), more images/s for the
    tutorial's U-Net and ResNet-18 (``make benchmark-training``; docs/NOTES.md); the notebooks' run modes turn it on
    (:class:`segx_helpers.workflows.settings.RunSettings`). ``cpu_fast_kernels`` (opt-in, with ``amp``, on a CPU):
    :class:`~segx_helpers.models.networks.CpuTraining`'s ``fast_kernels`` (batch norms of a width that is not a
    multiple of 16 on contiguous inputs, AdamW's fused step): faster, but results change by rounding, so the
    notebooks leave it off to keep every published number reproducible. None of these settings enters the
    checkpoint fingerprint.
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
    cpu_fast_kernels: bool = False
    warmup_epochs: int = 0
    selection_window: int = 1

    def __post_init__(self) -> None:
        problems = []
        if (
            not isinstance(self.warmup_epochs, Integral)
            or isinstance(self.warmup_epochs, bool)
            or self.warmup_epochs < 0
        ):
            problems.append(f"warmup_epochs must be an int >= 0, got {self.warmup_epochs!r}")
        elif isinstance(self.epochs, Integral) and self.warmup_epochs >= self.epochs:
            problems.append(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs})")
        if (not isinstance(self.selection_window, Integral) or isinstance(self.selection_window, bool)
                or self.selection_window < 1):
            problems.append(f"selection_window must be an int >= 1, got {self.selection_window!r}")
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
        value = (f"{self.monitor} averaged over {self.selection_window} epochs" if self.selection_window > 1
                 else self.monitor)
        return (f"model selection: keeps the epoch with the {direction} {value}{start} "
                f"(of {self.epochs}); stops early after {self.patience} epochs without improvement")

    def schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule, stepped once per epoch: cosine over ``epochs``, or a linear warm-up over
        ``warmup_epochs`` then cosine over the rest."""
        if not self.warmup_epochs:
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.epochs, 1))
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (self.warmup_epochs + 1),
                                                   total_iters=self.warmup_epochs)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs - self.warmup_epochs)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[self.warmup_epochs])


@dataclass
class History:
    """One record per epoch: train loss, validation values, seconds; plus the best epoch."""

    records: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_value: float = -math.inf

    def frame(self):
        return pd.DataFrame(self.records)


@dataclass(frozen=True)
class CheckpointPlan:
    """Where and how :func:`fit` writes checkpoints: the best model at ``path`` with ``meta`` (``None``: nothing is
    written), the latest epoch's state at ``<path>.last.pt``; an existing checkpoint is refused unless
    ``overwrite`` (train again) or ``resume`` (continue an interrupted run)."""

    path: str | Path | None = None
    meta: dict | None = None
    overwrite: bool = False
    resume: bool = False


def fit(model: nn.Module, loss_fn: nn.Module, train_loader: DataLoader, validate: Callable[[nn.Module], dict],
        config: TrainConfig, checkpoint: CheckpointPlan = CheckpointPlan(), target_key: str = "target",
        batch_loss: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> History:
    """Train ``model`` with AdamW, keeping the weights of the best validation epoch.

    ``validate(model)`` returns a dict with ``config.monitor`` (higher is better; lower for a key ending
    in ``_loss``) plus anything to log. Only epochs from ``config.min_epochs`` on can be kept; training
    stops early after ``patience`` epochs without improvement on the best of those (so never before
    ``min_epochs``). The rule is printed before the first epoch (:meth:`TrainConfig.selection_rule`).
    With ``checkpoint`` (:class:`CheckpointPlan`) the best model is saved at its ``path`` (with its ``meta``) and
    the latest epoch to ``<path>.last.pt`` for ``resume``. An existing checkpoint is an error unless
    ``overwrite`` or ``resume``. The model ends in eval mode holding the best weights.

    ``resume`` continues from ``<path>.last.pt`` when it exists (else trains from the start): the weights,
    optimiser, scheduler, history and the random state of every process (:func:`random_state`, with
    ``train_loader``'s generator) as the last finished epoch left them, so the resumed run gives the same
    weights as an uninterrupted one. Not with worker processes (``num_workers > 0``): their random state
    (the augmentation's) lives in those processes and cannot be saved, so the augmentations after resuming
    differ (an :class:`InexactResumeWarning` says so). Under ``torch.distributed`` pass the same
    ``checkpoint.path`` on every rank: rank 0 writes (with every rank's random state) and reads, and every
    rank resumes from what it read.

    A NaN (or infinite) validation score never counts as an improvement and gives a
    :class:`NonFiniteScoreWarning`. If *no* epoch has a finite score, the last epoch's weights are
    kept (and saved), ``best_epoch`` is that epoch, ``best_value`` is NaN, and a warning says so: a
    trained model is never silently replaced by the initial weights.

    ``batch_loss(model, batch) -> loss`` replaces ``loss_fn(model(images), targets)`` when given: it gets
    the whole batch dict with its tensors on the device (e.g. ``batch["mask"]`` for a loss that uses the
    clinical mask, see :mod:`segx_helpers.studies.mask_training`); ``loss_fn`` is then unused.
    """
    run = _start(model, config)
    saving = _Saving.at(checkpoint)
    run.best_state = _copy_state(model)
    if checkpoint.resume:
        _resume(run, saving, train_loader)
    loss = _Loss(loss_fn, batch_loss, target_key)
    print(config.selection_rule())
    try:
        for epoch in range(run.start_epoch, config.epochs):
            if _out_of_patience(run.history, epoch, config):
                break
            started = time.perf_counter()
            losses = _train_one_epoch(run, train_loader, epoch, loss)
            run.scheduler.step()
            score = _validate_and_record(run, validate, epoch, losses, started)
            if _improves(run, score, epoch):
                _keep_best(run, score, epoch, saving)
            saving.save_last(run, epoch, train_loader)
    finally:
        for hook in run.norm_hooks:  # the model leaves fit as it came, but for its weights and memory format
            hook.remove()
    if run.history.best_epoch < 0 and run.history.records:
        _keep_last_epoch(run, saving)
    model.load_state_dict(run.best_state)
    model.eval()
    return run.history


@dataclass
class _Run:
    """One call of :func:`fit`: the model, how it is stepped, and what is carried from epoch to epoch
    (``history``, the best epoch's weights ``best_state``, the first epoch still to train)."""

    model: nn.Module
    config: TrainConfig
    device: torch.device
    cpu: CpuTraining
    use_amp: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    history: History
    norm_hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)  # contiguous_narrow_norms
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch: int = 0


@dataclass
class _Loss:
    """How :func:`fit` gets one batch's loss: ``loss_fn(model(images), batch[target_key])``, or
    ``batch_loss(model, batch)`` with the whole batch on the device when given."""

    loss_fn: nn.Module
    batch_loss: Callable[[nn.Module, dict], torch.Tensor] | None
    target_key: str

    def inputs(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's images and targets on ``device``."""
        return batch["image"].to(device), batch[self.target_key].to(device)

    def __call__(self, model: nn.Module, batch: dict, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.batch_loss is None:
            return self.loss_fn(model(images), targets)
        on_device = {k: v.to(images.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return self.batch_loss(model, {**on_device, "image": images, self.target_key: targets})


@dataclass
class _Saving:
    """Where :func:`fit` writes: the best model at ``path`` (with ``meta``), the latest epoch's state at
    ``last_path`` (:func:`~segx_helpers.models.checkpoints.last_checkpoint_path`); both None without a path.
    Under ``torch.distributed`` this process is ``rank`` of ``world_size``: only rank 0 reads and writes
    files, the others take part in gathering the random states and receive what rank 0 read."""

    path: Path | None
    last_path: Path | None
    meta: dict
    rank: int = 0
    world_size: int = 1

    @classmethod
    def at(cls, plan: CheckpointPlan) -> "_Saving":
        """Refuses (``FileExistsError``) an existing checkpoint unless ``plan.overwrite`` or ``plan.resume``."""
        path = Path(plan.path) if plan.path is not None else None
        meta = plan.meta
        if path is not None and path.exists() and not (plan.overwrite or plan.resume):
            raise FileExistsError(f"Checkpoint {path} already exists; pass overwrite=True to retrain, or resume=True "
                                  "to continue.")
        rank, world_size = _process_group()
        return cls(path, last_checkpoint_path(path) if path is not None else None, meta or {}, rank, world_size)

    def save_best(self, run: _Run) -> None:
        """The model as it is now, with ``meta``, its history so far and the training configuration."""
        if self.path is not None and self.rank == 0:
            save_checkpoint(self.path, run.model, {**self.meta, "history": run.history.records,
                                                   "train_config": asdict(run.config)}, overwrite=True)

    def save_last(self, run: _Run, epoch: int, loader) -> None:
        """The model after ``epoch`` (counting from 0) with what ``resume`` needs: optimiser, scheduler, gradient
        scaler, history and each process's :func:`random_state` (``random_states[rank]``)."""
        if self.last_path is None:
            return
        states = _gather(random_state(loader), self.world_size)
        if self.rank == 0:
            save_checkpoint(self.last_path, run.model, self.meta, overwrite=True, training_state={
                "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(), "epoch": epoch, "history": json.dumps(run.history.records),
                "best_epoch": run.history.best_epoch, "best_value": run.history.best_value, "random_states": states})

    def read_last(self) -> tuple[dict, dict | None] | None:
        """The resume state at ``last_path`` and the best weights at ``path`` (None when not written yet), read by
        rank 0 and shared with every rank; None when there is nothing to resume. A damaged file is a
        :class:`~segx_helpers.models.checkpoints.CheckpointError` on every rank."""
        found, error = None, None
        if self.rank == 0 and self.last_path is not None and self.last_path.exists():
            try:
                found = (read_checkpoint(self.last_path),
                         read_checkpoint(self.path)["state_dict"] if self.path.exists() else None)
            except CheckpointError as err:
                error = err
        shared, message = _from_rank_0((found, None if error is None else str(error)), self.world_size)
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointError(message)
        return shared


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` in the ``torch.distributed`` process group; ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(value, world_size: int) -> list:
    """Every rank's ``value``, in rank order (``[value]`` in one process)."""
    if world_size == 1:
        return [value]
    values = [None] * world_size
    torch.distributed.all_gather_object(values, value)
    return values


def _from_rank_0(value, world_size: int):
    """Rank 0's ``value`` on every rank (``value`` itself in one process)."""
    if world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _start(model: nn.Module, config: TrainConfig) -> _Run:
    """Seed, move ``model`` to its device (in the CPU's memory format), and make the optimiser (AdamW),
    the cosine schedule and the gradient scaler (float16 autocast on a GPU with ``config.amp``)."""
    set_seed(config.seed)
    device = pick_device(config.device)
    model.to(device)
    cpu = cpu_setting(config, device, model)
    prepare_for_cpu_training(model, cpu)
    norm_hooks = contiguous_narrow_norms(model) if cpu.fast_kernels else []
    optimizer = make_optimizer(model, config.lr, config.weight_decay, cpu)
    scheduler = config.schedule(optimizer)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history = History(best_value=math.inf if config.minimises else -math.inf)
    return _Run(model, config, device, cpu, use_amp, optimizer, scheduler, scaler, history, norm_hooks)


def cpu_setting(config: TrainConfig, device: torch.device, model: nn.Module) -> CpuTraining:
    """How :func:`fit` trains ``model`` on ``device`` with ``config``: on a CPU with ``config.amp``, channels_last (with
    bfloat16 autocast and the fast kernels where ``config`` asks for them; never bfloat16 for a model with grouped
    convolutions, :func:`~segx_helpers.models.networks.has_grouped_convolutions`); plain float32 otherwise."""
    on_cpu = config.amp and device.type == "cpu"
    return CpuTraining(channels_last=on_cpu, bf16=on_cpu and config.cpu_bf16 and cpu_supports_bf16()
                       and not has_grouped_convolutions(model),
                       fast_kernels=on_cpu and config.cpu_fast_kernels)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, cpu: CpuTraining = CpuTraining()) -> torch.optim.AdamW:
    """The optimiser :func:`fit` trains with: AdamW, with its fused CPU step when ``cpu.fast_kernels`` (else
    PyTorch's default, ``fused=None``)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=True if cpu.fast_kernels else None)


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _resume(run: _Run, saving: _Saving, loader) -> None:
    """Continue an interrupted run from ``saving.last_path`` (nothing to do without one): its weights, optimiser,
    scheduler, gradient scaler and history, the best weights from ``saving.path`` (when written), and this
    process's random state at the end of the last finished epoch (``loader``'s generator included)."""
    found = saving.read_last()
    if found is None:
        return
    raw, best = found
    run.model.load_state_dict(raw["state_dict"])
    state = raw["training_state"]
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.history = History(records=json.loads(state["history"]), best_epoch=int(state["best_epoch"]),
                          best_value=float(state["best_value"]))
    run.best_state = best if best is not None else run.best_state
    run.start_epoch = int(state["epoch"]) + 1
    _restore_process_state(state.get("random_states"), saving, loader, run.config.seed + run.start_epoch)


def _restore_process_state(states: list | None, saving: _Saving, loader, fallback_seed: int) -> None:
    """Put back this rank's saved random state; a resume state of another number of processes is a
    :class:`~segx_helpers.models.checkpoints.CheckpointError`, one without a random state (an older
    segx_helpers) is seeded with ``fallback_seed`` and an :class:`InexactResumeWarning`."""
    if states is None:
        warnings.warn(f"{saving.last_path} holds no random state (written by an older segx_helpers): the resumed run "
                      "draws other augmentations and batches than an uninterrupted one would.", InexactResumeWarning,
                      stacklevel=4)
        torch.manual_seed(fallback_seed)
        return
    if len(states) != saving.world_size:
        raise CheckpointError(f"{saving.last_path} was saved by a run on {len(states)} process(es), and this one runs "
                              f"on {saving.world_size}: resume it with {len(states)} (torchrun --nproc_per_node "
                              f"{len(states)} on one node), or train again.")
    restore_random_state(states[saving.rank], loader)
    if getattr(loader, "num_workers", 0):
        warnings.warn(f"resuming with {loader.num_workers} loader worker process(es): their random state (the "
                      "augmentation's) cannot be saved, so the resumed run's augmentations differ from an "
                      "uninterrupted run's (use num_workers=0 for an exact repeat).", InexactResumeWarning,
                      stacklevel=4)


def _out_of_patience(history: History, epoch: int, config: TrainConfig) -> bool:
    """Whether more than ``config.patience`` epochs passed since the best one (early stopping)."""
    return epoch - history.best_epoch > config.patience and history.best_epoch >= 0


def _train_one_epoch(run: _Run, train_loader: DataLoader, epoch: int, loss: _Loss) -> list[float]:
    """One pass over ``train_loader`` (at most ``max_batches_per_epoch`` batches) in train mode; the loss
    of each step. ``ValueError`` when the loader gave no batch."""
    config = run.config
    run.model.train()
    losses = []
    batches = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   total=_n_batches(train_loader, config.max_batches_per_epoch))
    for step, batch in enumerate(batches):
        if config.max_batches_per_epoch is not None and step >= config.max_batches_per_epoch:
            break
        losses.append(_train_step(run, batch, epoch, loss))
        batches.set_postfix(loss=f"{np.mean(losses):.4f}")
    if not losses:
        raise ValueError(f"epoch {epoch + 1} took no training step: the loader gave no batch (is the batch size "
                         "larger than the training split, with drop_last?); nothing was trained or saved.")
    return losses


def _train_step(run: _Run, batch: dict, epoch: int, loss: _Loss) -> float:
    """One optimiser step on ``batch`` (under autocast where configured); the loss. A non-finite loss is a
    ``FloatingPointError``."""
    images, targets = loss.inputs(batch, run.device)
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=run.device.type, enabled=run.use_amp), run.cpu.autocast():
        value = loss(run.model, batch, images, targets)
    if not torch.isfinite(value):
        raise FloatingPointError(f"Training loss became {value.item()} at epoch {epoch + 1}; lower the learning rate.")
    run.scaler.scale(value).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return value.item()


def _validate_and_record(run: _Run, validate: Callable[[nn.Module], dict], epoch: int, losses: list[float],
                         started: float) -> float | None:
    """``validate`` the model in eval mode, append the epoch's record to the history and print it; the
    monitored score, averaged over the selection window (``None`` until the window is full)."""
    config = run.config
    run.model.eval()
    values = validate(run.model)
    if config.monitor not in values:
        raise KeyError(f"validate() returned {sorted(values)}, which lacks the monitored key {config.monitor!r}")
    record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **{k: float(v) for k, v in values.items()},
              "seconds": time.perf_counter() - started}
    run.history.records.append(record)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    return smoothed_score(run.history.records, config.monitor, min(config.selection_window, config.epochs))


def smoothed_score(records: list[dict], monitor: str, window: int) -> float | None:
    """The mean of ``monitor`` over the last ``window`` epoch records; ``None`` while fewer than ``window`` epochs
    have been validated (no epoch is compared before its window is full); NaN when one of them is not finite."""
    if len(records) < window:
        return None
    values = [float(r[monitor]) for r in records[-window:]]
    return float(np.mean(values)) if all(math.isfinite(v) for v in values) else math.nan


def _improves(run: _Run, score: float | None, epoch: int) -> bool:
    """Whether ``epoch`` is a candidate and ``score`` beats the best so far; a non-finite score never
    does and gives a :class:`NonFiniteScoreWarning` (at :func:`fit`'s caller)."""
    config, best = run.config, run.history.best_value
    if score is None:  # the selection window is not full yet
        return False
    if not math.isfinite(score):
        warnings.warn(f"Validation {config.monitor} is {score} (not finite) at epoch {epoch + 1}, so this epoch cannot "
                      "be the best one (AUROC is undefined when the validation split lacks a class).",
                      NonFiniteScoreWarning, stacklevel=3)
        return False
    return epoch + 1 >= config.first_candidate and (score < best if config.minimises else score > best)


def _keep_best(run: _Run, score: float, epoch: int, saving: _Saving) -> None:
    """Make ``epoch`` the best one: remember its score and weights, and save the checkpoint."""
    run.history.best_value, run.history.best_epoch = score, epoch
    run.best_state = _copy_state(run.model)
    saving.save_best(run)


def _keep_last_epoch(run: _Run, saving: _Saving) -> None:
    """No epoch had a finite score: keep (and save) the last epoch's trained weights rather than the
    initial ones, with ``best_value`` NaN and a :class:`NonFiniteScoreWarning` (at :func:`fit`'s caller)."""
    history, monitor = run.history, run.config.monitor
    history.best_epoch, history.best_value = len(history.records) - 1, math.nan
    run.best_state = _copy_state(run.model)
    warnings.warn(f"no epoch had a finite validation {monitor} ({history.records[-1].get(monitor)}); "
                  f"keeping the last epoch's weights (epoch {len(history.records)}) instead of a best epoch. Check "
                  "the validation split (does it hold every class?) or monitor another metric.",
                  NonFiniteScoreWarning, stacklevel=3)
    saving.save_best(run)


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


