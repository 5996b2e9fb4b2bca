"""torch.distributed plumbing for ``segx audit`` and ``segx train``: nothing home-made, only torchrun's
environment, ``torch.distributed`` collectives and ``DistributedDataParallel``.

Launch any entry point with torchrun, e.g. ``torchrun --nproc_per_node 4 -m segx_helpers audit ...``
(one node) or, on every node of a multi-node job,
``torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id JOB -m segx_helpers ...``.
torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``;
:func:`setup` reads them, picks the backend (``nccl`` when the device is CUDA, ``gloo`` otherwise) and
binds each process to ``cuda:LOCAL_RANK``. Without those variables everything runs in one process
and every collective below is a no-op, so the same code path serves 1 and N processes.

Training under DDP (:func:`ddp_fit`) reuses :func:`segx_helpers.models.training.fit` unchanged:

* the model is wrapped in :class:`StateDictDDP`, a ``DistributedDataParallel`` whose ``state_dict`` /
  ``load_state_dict`` are the inner model's, so checkpoints have the plain keys ``load_checkpoint``
  expects (no ``module.`` prefix);
* the loader uses a :class:`DistributedSampler` that advances its epoch by itself each time ``fit``
  iterates it (``fit`` does not call ``set_epoch``), with the *global* batch split evenly over ranks.
  The same sampler is used with one process, so a run on ``N`` processes sees the same global
  batches as a run on one (same seed, same global batch size) and averages the same gradients;
* the logged training loss is the global batch's (:class:`GlobalMeanLoss`), the gradients each
  rank's own, averaged by DDP;
* ``validate`` runs on rank 0 (on the bare model) and its result is broadcast, so every rank takes
  the same best-epoch and early-stopping decisions; checkpoints are written by rank 0 only, with every
  rank's random state, so that a run killed in any epoch resumes (the same torchrun command with
  ``--resume``, the same number of processes) to the weights of an uninterrupted run;
* :func:`sync_batchnorm` (``segx train --sync-bn``) converts BatchNorm layers to ``SyncBatchNorm`` (CUDA only), so
  batch statistics are those of the global batch. Without it each rank normalises with its own
  share of the batch, the usual DDP behaviour, and the result differs slightly from one process.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from segx_helpers.data.format import LoadedDataset, load_dataset
from segx_helpers.data.torch_dataset import Normalization, SegXDataset
from segx_helpers.models.checkpoints import check_fingerprint, last_checkpoint_path, read_checkpoint
from segx_helpers.models.networks import (
    RANDOM,
    build_classifier,
    build_segmenter,
    classifier_normalization,
    pick_device,
    prepare_for_cpu_training,
)
from segx_helpers.models.training import CheckpointPlan, TrainConfig, cpu_setting, fit, make_loader, set_seed
from segx_helpers.workflows.training_recipes import (ClassifierSpec, Recipe, SegmenterSpec, classifier_fingerprint,
                                                    classifier_recipe, classifier_selection, finish_training,
                                                    segmenter_fingerprint, segmenter_recipe)


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size``, its ``device`` and the backend in use
    (``None`` when not distributed)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None, timeout_minutes: float = 60.0) -> Context:
    """Join the process group torchrun prepared (when there is one) and pick this process's device.

    ``device``: ``None`` (CUDA when available, else CPU; under torchrun ``cuda:LOCAL_RANK``), ``"cpu"``
    or ``"cuda"``. The backend follows the device: ``nccl`` for CUDA, ``gloo`` for CPU.
    ``timeout_minutes`` bounds every collective, including the barrier where finished ranks wait
    for the others: make it longer than one shard (audit) or one epoch (training) takes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank if world_size > 1 else 0)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size <= 1:
        return Context(0, 1, 0, chosen, None)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                             **({"device_id": chosen} if chosen.type == "cuda" else {}))
    return Context(rank, world_size, local_rank, chosen, backend)


def cleanup(ctx: Context, failed: bool = False) -> None:
    """Leave the process group, after a final barrier unless this rank ``failed`` (then it leaves at
    once; torchrun stops the other ranks when one exits with an error)."""
    if ctx.distributed and torch.distributed.is_initialized():
        if not failed:
            barrier(ctx)
        torch.distributed.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        if ctx.backend == "nccl":
            torch.distributed.barrier(device_ids=[ctx.device.index])
        else:
            torch.distributed.barrier()


def broadcast(ctx: Context, value: Any = None) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not ctx.distributed:
        return value
    box = [value if ctx.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def run_on_main(ctx: Context, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and return its result on every rank; an exception on rank 0 is re-raised
    on every rank (as a ``RuntimeError`` naming it) instead of leaving the others waiting."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - passed on to every rank
            error = err
    if not ctx.distributed:
        if error is not None:
            raise error
        return result
    shared = broadcast(ctx, (result, None if error is None else (type(error).__name__, str(error))))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise RuntimeError(f"rank 0 failed: {shared[1][0]}: {shared[1][1]}")
    return shared[0]


# ------------------------------------------------------------------------------ training

class StateDictDDP(nn.parallel.DistributedDataParallel):
    """``DistributedDataParallel`` whose state dict is the wrapped model's (plain keys), so that
    :func:`segx_helpers.models.training.fit` saves and restores checkpoints exactly as without DDP."""

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


class GlobalMeanLoss(nn.Module):
    """The loss whose *value* is the mean over ranks (one scalar all-reduce per step) and whose
    *gradient* is this rank's own: DDP then averages the gradients. ``fit`` logs the value, so the
    logged training loss is the global batch's, as with one process, and a non-finite loss on any
    rank stops every rank (no rank is left waiting in a collective)."""

    def __init__(self, loss_fn: nn.Module, ctx: Context) -> None:
        super().__init__()
        self.loss_fn, self.ctx = loss_fn, ctx

    def forward(self, *args, **kwargs) -> torch.Tensor:
        loss = self.loss_fn(*args, **kwargs)
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        mean /= self.ctx.world_size
        return loss + (mean - loss.detach())


class EpochDistributedSampler(DistributedSampler):
    """A :class:`DistributedSampler` that calls ``set_epoch`` itself: the ``k``-th iteration uses
    epoch ``k``, so each epoch is shuffled differently (and identically on every rank)."""

    def __iter__(self):
        self.set_epoch(getattr(self, "_iterations", 0))
        self._iterations = getattr(self, "_iterations", 0) + 1
        return super().__iter__()

    def start_at(self, epoch: int) -> None:
        """Make the next iteration use ``epoch`` (a resumed run continues the shuffling order)."""
        self._iterations = int(epoch)


def distributed_loader(dataset, global_batch_size: int, ctx: Context, shuffle: bool = True, seed: int = 0,
                       num_workers: int = 0) -> DataLoader:
    """A loader giving this rank its share (``global_batch_size / world_size`` per step) of the global
    batches; with one process the same sampler gives the same global batches. The last incomplete
    global batch is dropped so every step averages equally sized shares (as one process would)."""
    if global_batch_size % ctx.world_size:
        raise ValueError(f"the global batch size {global_batch_size} must be divisible by the number of processes "
                         f"({ctx.world_size})")
    sampler = EpochDistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                                      drop_last=True)
    return DataLoader(dataset, batch_size=global_batch_size // ctx.world_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, persistent_workers=num_workers > 0)


def ddp_fit(model: nn.Module, loss_fn: nn.Module, train_loader: DataLoader, validate: Callable[[nn.Module], dict],
            config, ctx: Context, checkpoint: CheckpointPlan = CheckpointPlan(), target_key: str = "target"):
    """:func:`segx_helpers.models.training.fit` on every rank with the model under DDP (see the module
    docstring). ``train_loader`` should come from :func:`distributed_loader`. Returns fit's
    ``History``; ``model`` (the bare model, not the wrapper) ends holding the best weights on every
    rank. With one process this is plain ``fit`` with the same loader. ``checkpoint.resume``: every rank continues
    from ``<checkpoint.path>.last.pt`` as rank 0 reads it (fit's ``resume``). For SyncBatchNorm, convert the model
    first (:func:`sync_batchnorm`)."""
    config = dataclasses.replace(config, device=str(ctx.device))
    if not ctx.distributed:
        return fit(model, loss_fn, train_loader, validate, config, checkpoint=checkpoint, target_key=target_key)
    model.to(ctx.device)
    # the memory format fit trains in, before DDP lays out its gradient buckets: changed afterwards, the first
    # step's convolution gradients would be copied through buckets of the old strides (scrambled)
    prepare_for_cpu_training(model, cpu_setting(config, ctx.device, model))
    wrapped = StateDictDDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def shared_validate(_wrapped: nn.Module) -> dict:
        return run_on_main(ctx, lambda: validate(model))

    if not ctx.is_main:
        os.environ["TQDM_DISABLE"] = "1"
    history = fit(wrapped, GlobalMeanLoss(loss_fn, ctx), train_loader, shared_validate, config, checkpoint=checkpoint,
                  target_key=target_key)
    barrier(ctx)
    return history


def sync_batchnorm(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` with its BatchNorm layers as ``SyncBatchNorm`` for DDP on CUDA (statistics over every rank's
    share of the batch); a ``ValueError`` on a CPU, where PyTorch's SyncBatchNorm does not run; ``model``
    itself when not distributed."""
    if not ctx.distributed:
        return model
    if ctx.device.type != "cuda":
        raise ValueError("sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@dataclass(frozen=True)
class TrainSpec:
    """What ``segx train`` trains, all of it recorded in the checkpoint's fingerprint: a ``kind``
    ("classifier" or "segmenter") at ``image_size`` (at least 32 px; a multiple of 32 for the segmenter's
    U-Net), ``epochs``, ``batch_size`` the *global* batch (split over the processes), ``lr`` (default 1e-3
    for a classifier, 3e-3 for a segmenter), ``arch`` the classifier's architecture, ``encoder`` the
    segmenter's, ``max_batches_per_epoch`` and ``seed``. A ``ValueError`` names a bad kind or size."""

    kind: str
    image_size: int = 128
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None
    arch: str = "resnet18"
    encoder: str = "resnet18"
    max_batches_per_epoch: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("classifier", "segmenter"):
            raise ValueError(f"kind must be 'classifier' or 'segmenter', got {self.kind!r}")
        if self.image_size < 32:
            raise ValueError(f"--image-size must be at least 32 pixels, got {self.image_size}")
        if self.kind == "segmenter" and self.image_size % 32:
            raise ValueError(f"image_size must be divisible by 32 for a U-Net, got {self.image_size}")

    def train_config(self, data: LoadedDataset) -> TrainConfig:
        """The loop's configuration: the classifier's monitor chosen for ``data``'s validation split
        (:func:`~segx_helpers.workflows.training_recipes.classifier_selection`), the segmenter's validation Dice."""
        monitor = "auto" if self.kind == "classifier" else "val_dice"
        config = TrainConfig(epochs=self.epochs, lr=self.lr or (1e-3 if self.kind == "classifier" else 3e-3),
                             monitor=monitor, seed=self.seed, max_batches_per_epoch=self.max_batches_per_epoch)
        return classifier_selection(config, data) if self.kind == "classifier" else config


@dataclass(frozen=True)
class Processes:
    """How ``segx train`` runs on each process: ``device`` (see :func:`setup`), ``num_workers`` of each
    loader, ``sync_batchnorm`` (see :func:`ddp_fit`; recorded in the fingerprint) and ``timeout_minutes``
    for every collective (see :func:`setup`)."""

    device: str | None = None
    num_workers: int = 0
    sync_batchnorm: bool = False
    timeout_minutes: float = 60.0


@dataclass
class _Splits:
    """The training and validation splits of a ``segx train`` run, with their loaders (the training
    loader is this rank's share of the global batches, :func:`distributed_loader`)."""

    norm: Normalization
    train_set: SegXDataset
    val_set: SegXDataset
    loader: DataLoader
    val_loader: DataLoader


def train(data_dir: str | Path, checkpoint: str | Path, spec: TrainSpec, processes: Processes = Processes(), *,
          overwrite: bool = False, resume: bool = False) -> dict | None:
    """``segx train``: train a classifier or a segmenter (``spec``) on a dataset folder, on 1..N processes.

    The same recipe as :func:`segx_helpers.workflows.training_recipes.train_classifier` / ``train_segmenter`` (losses,
    validation metric, stored thresholds, training fingerprint, checkpoint metadata), with
    ``spec.batch_size`` the *global* batch (split over ranks) and :func:`ddp_fit` as the loop. Rank 0 writes
    the checkpoint and gets ``{"checkpoint", "metrics", "epochs", "world_size"}``; the others return None. An
    existing checkpoint is refused unless ``overwrite``, or ``resume`` and it holds an unfinished run of the
    same settings (its ``<checkpoint>.last.pt`` holds the latest epoch; the same number of processes: a torchrun
    run is resumed with the same torchrun command and ``--resume``). A batch size that
    leaves no full batch in the training split is refused before training. When training finishes,
    ``<checkpoint>.last.pt`` is removed. E.g. ``train("data/tiny", "c.pt", TrainSpec("classifier", epochs=2))``.
    """
    checkpoint = Path(checkpoint)
    _check_checkpoint(checkpoint, overwrite, resume)
    ctx = setup(processes.device, processes.timeout_minutes)
    try:
        data = load_dataset(data_dir, check_files=False)
        config = spec.train_config(data)
        splits = _splits(data, data_dir, spec, processes, ctx)
        set_seed(spec.seed)
        model, recipe = _model_and_recipe(data, spec, config, splits, processes, ctx)
        if resume:
            check = functools.partial(resumable_epochs, checkpoint, recipe.meta["fingerprint"])
            splits.loader.sampler.start_at(run_on_main(ctx, check))
        if processes.sync_batchnorm:
            model = sync_batchnorm(model, ctx)
        plan = CheckpointPlan(path=checkpoint, meta=recipe.meta, overwrite=overwrite, resume=resume)
        history = ddp_fit(model, recipe.loss, splits.loader, recipe.validate, config, ctx, plan, recipe.target_key)
        result = run_on_main(ctx, lambda: _finish(recipe, model, history, config, checkpoint, ctx))
    except BaseException:
        cleanup(ctx, failed=True)
        raise
    cleanup(ctx)
    return result if ctx.is_main else None


def _check_checkpoint(checkpoint: Path, overwrite: bool, resume: bool) -> None:
    """Refuse ``overwrite`` with ``resume``, and an existing checkpoint without either."""
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other: resume an interrupted run, or train again")
    if checkpoint.exists() and not (overwrite or resume):
        raise FileExistsError(f"{checkpoint} exists; pass --overwrite to replace it (or choose another path); "
                              "--resume continues an interrupted run")


def _splits(data: LoadedDataset, data_dir: str | Path, spec: TrainSpec, processes: Processes, ctx: Context) -> _Splits:
    """The splits at ``spec.image_size`` with the channels' default normalisation, and their loaders; a
    ``ValueError`` when the training split holds no full global batch."""
    norm = (classifier_normalization(spec.arch, data.info.channels) if spec.kind == "classifier"
            else Normalization.for_channels(data.info.channels))
    train_set = SegXDataset(data, "train", spec.image_size, norm, train=True)
    val_set = SegXDataset(data, "val", spec.image_size, norm)
    loader = distributed_loader(train_set, spec.batch_size, ctx, shuffle=True, seed=spec.seed,
                                num_workers=processes.num_workers)
    if len(loader) == 0:
        raise ValueError(f"the training split of {data_dir} has {len(train_set)} images, fewer than --batch-size "
                         f"{spec.batch_size}: no full batch can be taken (the last incomplete batch is dropped), so "
                         f"nothing would be trained. Pass --batch-size {len(train_set)} or less.")
    return _Splits(norm, train_set, val_set, loader, make_loader(val_set, 64, shuffle=False))


def _model_and_recipe(data: LoadedDataset, spec: TrainSpec, config: TrainConfig, splits: _Splits,
                      processes: Processes, ctx: Context) -> tuple[nn.Module, Recipe]:
    """The untrained model of ``spec.kind`` and its recipe, whose ``meta`` holds the training fingerprint
    (with the global batch size, the normalisation, the number of processes and ``sync_batchnorm``)."""
    common = dict(world_size=ctx.world_size, sync_batchnorm=processes.sync_batchnorm)
    if spec.kind == "classifier":
        classifier = ClassifierSpec(arch=spec.arch, image_size=spec.image_size, batch_size=spec.batch_size,
                                    normalization=splits.norm).resolved(data)
        fingerprint = classifier_fingerprint(data, classifier, config, RANDOM, **common)
        model = build_classifier(spec.arch, num_classes=data.info.num_classes, in_channels=data.info.channels)
        return model, classifier_recipe(
            data, classifier, RANDOM, splits.val_loader, fingerprint, device=str(ctx.device)
        )
    segmenter = SegmenterSpec(encoder=spec.encoder, image_size=spec.image_size, batch_size=spec.batch_size,
                              normalization=splits.norm).resolved(data)
    fingerprint = segmenter_fingerprint(data, segmenter, config, RANDOM, **common)
    model = build_segmenter(spec.encoder, encoder_weights=None, in_channels=data.info.channels,
                            decoder_channels=segmenter.decoder_channels)
    return model, segmenter_recipe(data, segmenter, RANDOM, splits.val_set, splits.val_loader, fingerprint,
                                   device=str(ctx.device))


def _finish(recipe: Recipe, model: nn.Module, history, config: TrainConfig, checkpoint: Path, ctx: Context) -> dict:
    """Rank 0's end of a run: thresholds, metadata and the finished checkpoint
    (:func:`~segx_helpers.workflows.training_recipes.finish_training`), and what :func:`train` returns."""
    meta = finish_training(recipe, model, history, config, checkpoint)
    return {"checkpoint": str(checkpoint), "metrics": meta["metrics"], "epochs": len(history.records),
            "world_size": ctx.world_size}


def resumable_epochs(checkpoint: str | Path, fingerprint: dict) -> int:
    """The number of epochs an interrupted ``segx train`` run finished, after checking that it can be
    resumed with ``fingerprint``: ``<checkpoint>.last.pt`` exists, holds the same fingerprint (the same number
    of processes included), and the checkpoint (when there is one) is unfinished. Raises ``ValueError`` saying
    what to do otherwise: each message names a command that works, never one that is refused in turn."""
    checkpoint = Path(checkpoint)
    if checkpoint.exists() and read_checkpoint(checkpoint)["meta"].get("finished") is not False:
        raise ValueError(f"{checkpoint} holds a finished training run: nothing to resume (pass --overwrite to "
                         "train again)")
    last = last_checkpoint_path(checkpoint)
    if not last.exists():
        how = (f"pass --overwrite instead of --resume to train again from the start (the unfinished {checkpoint} is "
               "replaced)" if checkpoint.exists() else "run the same command without --resume to train from the start")
        raise ValueError(f"nothing to resume: {last} (the state of the latest finished epoch) does not exist, as "
                         f"when a run stops in its first epoch; {how}")
    raw = read_checkpoint(last)
    stored = raw["meta"].get("fingerprint") or {}
    before, now = stored.get("world_size"), fingerprint.get("world_size")
    if before is not None and before != now:
        raise ValueError(f"{last} is the state of a run on {before} processes, and this one runs on {now}: resume it "
                         f"with {before} processes, e.g. torchrun --nproc_per_node {before} -m segx_helpers train ... "
                         "--resume (the same arguments; on several nodes, the same total), or train again with "
                         "--overwrite")
    check_fingerprint(last, raw["meta"], fingerprint, "Resume with the settings of the interrupted run, or train "
                      "again with --overwrite.", require_finished=False)
    return int(raw["training_state"]["epoch"]) + 1
