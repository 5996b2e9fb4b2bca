"""Train the classifier *with* the clinical-interest mask, so that it stops using what lies outside it.

SegX hides where a model looked and SegU flags it; neither changes the model. The mask they use is exactly
the supervision needed to change it. Two fixes, both tested:

- **Explanation penalty** ("Right for the Right Reasons", Ross et al. 2017): the task loss plus
  ``λ`` times the squared input gradients of the log-probabilities *outside* the mask,
  :func:`rrr_penalty`. It needs a double backward (the penalty is itself a gradient), so a step costs
  about three ordinary ones; :func:`check_double_backward` says clearly when a model cannot do it.
- **Background intervention** (data side, no extra backward): with probability ``q`` per training image,
  the region outside the mask is replaced by another training image's pixels (``fill="shuffle"``) or by
  noise (``fill="noise"``), so nothing outside the mask can predict the label,
  :class:`BackgroundIntervention` (a ``collate_fn``).
- **Region intervention** (notebook 08, the same idea restricted to a region found in the data, not to the
  mask): with probability ``q`` per training image, the pixels of its own artefact region and of another training
  image's are replaced by that other image's, so the artefact moves between images whatever their labels,
  :func:`swap_regions` and :class:`RegionIntervention`; the regions come from
  :func:`segx_helpers.studies.reveal.concept_regions`, with no artefact label.

Which mask: the training split's ground-truth masks by default; a segmenter's predicted masks as an option
(what a user has who lacks masks for every training image). Images without a mask are left alone (no penalty,
no swap). Strengths are chosen on the *validation* split with :func:`selection_table`, never on the test split;
:func:`compare_fixes` then measures every model on the test split with the package's one analysis path.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, default_collate
from torchvision import tv_tensors

from segx_helpers.models.checkpoints import TrainedModel, load_trained, save_checkpoint, split_tensors, training_fingerprint
from segx_helpers.data.format import LoadedDataset
from segx_helpers.data.torch_dataset import Normalization, SegXDataset
from segx_helpers.scores.metrics import bootstrap_ci, macro_auroc, select_decision_thresholds
from segx_helpers.models.networks import build_classifier
from segx_helpers.models.training import (
    CheckpointPlan,
    TrainConfig,
    classification_loss,
    fit,
    make_loader,
    predict_classifier,
    set_seed,
)
from segx_helpers.workflows.training_recipes import evaluate_classifier
from segx_helpers.data.synthetic import load_artefacts, shortcut_pairs
from segx_helpers.models.masks import mask_probabilities
from segx_helpers.explain.api import RunOptions
from segx_helpers.scores.analysis import AnalysisOptions, binarise_masks
from segx_helpers.studies.shortcut import prediction_rows, shortcut_artefact_masks, shortcut_driven
from segx_helpers.workflows.explanation_recipes import explain_predictions
from segx_helpers.workflows.results import SplitLabels, explanation_results

FIXES = ("rrr", "background", "region")
FILLS = ("shuffle", "noise")


class DoubleBackwardError(RuntimeError):
    """The model cannot be differentiated twice, which the explanation penalty needs."""


# ------------------------------------------------------------------------------ the explanation penalty

def log_probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Log-probabilities ``(N, C)``: log-softmax (multiclass) or log-sigmoid per finding (multilabel)."""
    if task == "multiclass":
        return torch.log_softmax(logits, dim=1)
    if task == "multilabel":
        return nn.functional.logsigmoid(logits)
    raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")


def _outside(masks: torch.Tensor, images: torch.Tensor, has_mask=None) -> torch.Tensor:
    """1 outside the mask, 0 inside, ``(N, 1, H, W)``; all 0 for images without a mask (nothing to penalise)."""
    masks = torch.as_tensor(masks, device=images.device, dtype=images.dtype)
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    outside = 1.0 - (masks > 0.5).to(images.dtype)
    if has_mask is not None:
        known = (has_mask.to(images.device).bool() if isinstance(has_mask, torch.Tensor)
                 else torch.as_tensor(np.asarray(has_mask, dtype=bool), device=images.device))
        outside = outside * known[:, None, None, None].to(images.dtype)
    return outside


def rrr_penalty(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, task: str,
                has_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ross et al.'s explanation penalty and the logits of the same forward pass.

    ``penalty = mean over images of sum over channels and pixels outside the mask of
    (d sum_c log p_c / d x)^2``, with ``log p`` from :func:`log_probabilities`. The input gradient is
    built with ``create_graph=True``, so ``penalty.backward()`` reaches the parameters (double backward).
    ``masks`` ``(N, 1, H, W)`` or ``(N, H, W)``, 1 inside the clinical region; ``has_mask`` ``(N,)``:
    images without a mask contribute 0. Raises :class:`DoubleBackwardError` when the model cannot do it.
    """
    images = images.detach().clone().requires_grad_(True)
    logits = model(images)
    try:
        (grads,) = torch.autograd.grad(log_probabilities(logits.float(), task).sum(), images, create_graph=True)
    except RuntimeError as err:
        raise DoubleBackwardError(_double_backward_message(model, err)) from err
    if not grads.requires_grad and any(p.requires_grad for p in model.parameters()):
        raise DoubleBackwardError(_double_backward_message(model, "the input gradient does not depend on the parameters"))
    outside = _outside(masks, images, has_mask)
    penalty = (outside * grads).pow(2).sum(dim=(1, 2, 3)).mean()
    return penalty, logits


def _double_backward_message(model: nn.Module, err) -> str:
    return (f"The explanation penalty (RRR) differentiates the input gradient again (double backward), and "
            f"{type(model).__name__} does not support it ({err}). Typical causes: a custom autograd Function "
            "marked @once_differentiable, an operation without a second derivative, or a forward that detaches "
            "the input. Use method='background' (the background intervention needs no double backward) or "
            "replace the offending layer.")


def check_double_backward(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, task: str) -> None:
    """Run the penalty once on a few images and backpropagate it to the parameters; raise
    :class:`DoubleBackwardError` with a clear message when the model cannot (before hours of training do)."""
    was_training = model.training
    model.train()
    try:
        penalty, _ = rrr_penalty(model, images, masks, task)
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            grads = torch.autograd.grad(penalty, params, allow_unused=True)
        except RuntimeError as err:
            raise DoubleBackwardError(_double_backward_message(model, err)) from err
        if params and all(g is None for g in grads):
            raise DoubleBackwardError(_double_backward_message(
                model, "the penalty's gradient reaches none of its parameters, so training could not lower it"))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


@dataclass
class RRRLoss:
    """``batch_loss(model, batch)`` for :func:`segx_helpers.models.training.fit`: task loss + ``lam`` × :func:`rrr_penalty`.

    By default one forward pass serves both. ``penalty_images=k`` computes the penalty on the first ``k``
    images of each (shuffled) batch only, with a second forward pass: a step then costs about
    ``1 + 2k/N`` ordinary ones instead of 3 (quick mode uses it). ``log`` keeps ``(task loss, penalty)`` per step."""

    task_loss: nn.Module
    task: str
    lam: float
    penalty_images: int | None = None
    log: list = field(default_factory=list)

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        images, masks, has_mask = batch["image"], batch["mask"], batch.get("has_mask")
        k = self.penalty_images
        if k is None or k >= len(images):
            penalty, logits = rrr_penalty(model, images, masks, self.task, has_mask)
        else:  # the task loss on the whole batch, the (3x dearer) penalty on its first k images
            logits = model(images)
            penalty, _ = rrr_penalty(model, images[:k], masks[:k], self.task, None if has_mask is None else has_mask[:k])
        task_loss = self.task_loss(logits.float(), batch["target"])
        self.log.append((float(task_loss.detach()), float(penalty.detach())))
        return task_loss + self.lam * penalty


# ------------------------------------------------------------------------------ the background intervention

def swap_background(images: torch.Tensor, masks: torch.Tensor, q: float, generator: torch.Generator | None = None,
                    fill: str = "shuffle", has_mask=None) -> torch.Tensor:
    """A copy of ``images`` ``(N, C, H, W)`` where, for each image with probability ``q``, every pixel
    outside its mask is replaced: by the same pixel of *another* image of the batch (``"shuffle"``, a random
    cyclic order, so no image gets its own background; with one image, noise) or by i.i.d. standard normal
    noise in the normalised space (``"noise"``). Pixels inside the mask, the masks and the labels are
    untouched; images without a mask (``has_mask`` False) are left as they are."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    n = images.shape[0]
    outside = _outside(masks, images, has_mask).bool()
    chosen = torch.rand(n, generator=generator) < q
    if fill == "shuffle" and n > 1:
        order = torch.randperm(n, generator=generator)
        donor = torch.empty(n, dtype=torch.long)
        donor[order] = order.roll(-1)
        source = images[donor]
    else:
        source = torch.randn(images.shape, generator=generator).to(images.dtype)
    replace = outside & chosen[:, None, None, None].to(outside.device)
    return torch.where(replace, source.to(images.device), images)


class BackgroundIntervention:
    """A ``collate_fn``: the default collation, then :func:`swap_background` on the batch's images (seeded,
    so a run repeats exactly with ``num_workers=0``). ``swapped`` counts the images changed so far."""

    def __init__(self, q: float, fill: str = "shuffle", seed: int = 0) -> None:
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
        self.q, self.fill = float(q), fill
        self.generator = torch.Generator().manual_seed(seed)
        self.swapped = 0

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        before = batch["image"]
        batch["image"] = swap_background(before, batch["mask"], self.q, self.generator, self.fill, batch["has_mask"])
        self.swapped += int((batch["image"] != before).flatten(1).any(dim=1).sum())
        return batch


# ------------------------------------------------------------------------------ the region intervention (notebook 08)

def swap_regions(images: torch.Tensor, regions: torch.Tensor, q: float, generator: torch.Generator | None = None,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of ``images`` ``(N, C, H, W)`` where, for each image with probability ``q``, the pixels inside its own
    region or inside the region of a donor (another image of the batch, in a random cyclic order) take the donor's
    values: the donor's artefact moves in and the image's own moves out, so whether an image shows the artefact no
    longer depends on its label. ``regions`` ``(N, 1, H, W)`` or ``(N, H, W)``, 1 where the artefact is;
    ``keep`` (same shape): pixels never replaced (e.g. the lesion). A batch of one image is returned unchanged."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    n = images.shape[0]
    regions = _as_pixel_masks(regions, images)
    if n < 2:
        return images.clone()
    order = torch.randperm(n, generator=generator)
    donor = torch.empty(n, dtype=torch.long)
    donor[order] = order.roll(-1)
    chosen = (torch.rand(n, generator=generator) < q).to(images.device)[:, None, None, None]
    replace = (regions | regions[donor.to(regions.device)]) & chosen
    if keep is not None:
        replace = replace & ~_as_pixel_masks(keep, images)
    return torch.where(replace, images[donor.to(images.device)], images)


def _as_pixel_masks(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``masks`` as bool ``(N, 1, H, W)`` on ``images``' device; ``ValueError`` when they do not match ``images``."""
    masks = torch.as_tensor(masks, device=images.device)
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    return masks.float() > 0.5


class RegionIntervention:
    """A ``collate_fn``: the default collation, then :func:`swap_regions` on the batch's images with the batch's
    ``region`` (:class:`RegionDataset`), never touching the lesion (``mask`` of the images that have one); seeded.
    ``swapped`` counts the images changed so far."""

    def __init__(self, q: float, seed: int = 0) -> None:
        self.q = float(q)
        self.generator = torch.Generator().manual_seed(seed)
        self.swapped = 0

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        before = batch["image"]
        lesion = batch["mask"] * torch.as_tensor(batch["has_mask"], dtype=batch["mask"].dtype)[:, None, None, None]
        batch["image"] = swap_regions(before, batch["region"], self.q, self.generator, keep=lesion)
        self.swapped += int((batch["image"] != before).flatten(1).any(dim=1).sum())
        return batch


# ------------------------------------------------------------------------------ which mask

class MaskSourceDataset(SegXDataset):
    """A :class:`SegXDataset` whose masks come from ``masks`` (image id -> bool ``(H, W)``, e.g. a segmenter's
    predictions) instead of the files; they go through the same augmentation as the image."""

    def __init__(self, data: LoadedDataset, split: str, image_size: int, normalization: Normalization | None = None,
                 train: bool = False, masks: dict | None = None) -> None:
        super().__init__(data, split, image_size, normalization, train=train)
        self.masks = masks or {}

    def _load(self, i: int):
        image, mask = super()._load(i)
        image_id = self.rows.iloc[i]["image_id"]
        if image_id not in self.masks:
            return image, mask
        source = np.asarray(self.masks[image_id], dtype=bool)
        if source.shape != image.shape[:2]:
            source = np.asarray(Image.fromarray(source).resize(image.shape[1::-1], Image.NEAREST))
        return image, source


class RegionDataset(MaskSourceDataset):
    """A :class:`MaskSourceDataset` whose items also carry ``region`` ``(1, H, W)`` in {0, 1}: ``regions[image_id]``
    (bool ``(H, W)``, any size: resized nearest; an image without one gets none), transformed with the image and
    its mask (the same flips and rotation)."""

    def __init__(self, data: LoadedDataset, split: str, image_size: int, normalization: Normalization | None = None,
                 train: bool = False, masks: dict | None = None, regions: dict | None = None) -> None:
        super().__init__(data, split, image_size, normalization, train=train, masks=masks)
        self.regions = regions or {}

    def __getitem__(self, i: int) -> dict:
        image, mask = self._load(i)
        has_mask = mask is not None
        mask_array = mask if has_mask else np.zeros(image.shape[:2], dtype=bool)
        image_id = self.rows.iloc[i]["image_id"]
        region = np.asarray(self.regions.get(image_id, np.zeros(image.shape[:2], dtype=bool)), dtype=bool)
        if region.shape != image.shape[:2]:
            region = np.asarray(Image.fromarray(region).resize(image.shape[1::-1], Image.NEAREST))
        image_t, mask_t, region_t = self.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
                                                   tv_tensors.Mask(torch.from_numpy(mask_array.astype(np.uint8))[None]),
                                                   tv_tensors.Mask(torch.from_numpy(region.astype(np.uint8))[None]))
        target = torch.as_tensor(self.targets[i], dtype=torch.int64 if self.data.info.task == "multiclass" else torch.float32)
        return {"image": image_t.as_subclass(torch.Tensor), "mask": (mask_t.as_subclass(torch.Tensor) > 0.5).float(),
                "region": (region_t.as_subclass(torch.Tensor) > 0.5).float(), "target": target, "has_mask": has_mask,
                "image_id": image_id}


def predicted_training_masks(segmenter: TrainedModel, data: LoadedDataset, split: str = "train") -> dict:
    """A segmenter's binary masks for one split, image id -> bool ``(H, W)`` at its own input size (the
    mask source for a user without ground-truth masks for every training image)."""
    prob = mask_probabilities(segmenter, data, split, segmenter.meta["image_size"])
    binary = np.asarray(binarise_masks(prob, segmenter.meta["threshold"]))
    return dict(zip(data.split(split)["image_id"], binary))


# ------------------------------------------------------------------------------ training recipe

@dataclass(frozen=True)
class MaskFix:
    """Which fix :func:`train_with_mask` applies, how strongly, and with which masks.

    ``method``: ``"rrr"`` (``strength`` = λ of :class:`RRRLoss`, ``penalty_images`` as there),
    ``"background"`` (``strength`` = q of :class:`BackgroundIntervention`, ``fill`` as there), ``"region"``
    (``strength`` = q of :class:`RegionIntervention`, with ``regions``: image id -> bool ``(H, W)``, where each
    training image's artefact is; ``region_name`` names them in the checkpoint) or ``"none"``
    (the control: the same training without a fix). ``masks`` (image id -> bool ``(H, W)``) replaces the
    training split's ground-truth masks (e.g. :func:`predicted_training_masks`); ``mask_name`` names the
    source in the checkpoint. A ``ValueError`` names a bad method or strength.
    """

    method: str
    strength: float
    fill: str = "shuffle"
    penalty_images: int | None = None
    masks: dict | None = None
    mask_name: str = "ground truth"
    regions: dict | None = None
    region_name: str = ""

    def __post_init__(self) -> None:
        if self.method not in FIXES + ("none",):
            raise ValueError(f"method must be one of {FIXES}, got {self.method!r}")
        if not (isinstance(self.strength, (int, float)) and math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength!r}")
        if self.method in ("background", "region") and self.strength > 1:
            raise ValueError(f"the {self.method} intervention's strength is a probability q in [0, 1], got {self.strength}")
        if self.method == "region" and not self.regions:
            raise ValueError("method='region' needs regions= (image id -> bool (H, W), e.g. reveal.concept_regions)")

    def record(self, init: TrainedModel | None) -> dict:
        """The fix as the checkpoint stores it (``meta["fix"]``, part of the fingerprint), with a SHA-256 of
        the fingerprint of the classifier it started from (``init``, None from scratch)."""
        return {"method": self.method, "strength": float(self.strength),
                "fill": self.fill if self.method == "background" else None, "masks": self.mask_name,
                "penalty_images": self.penalty_images if self.method == "rrr" else None,
                "init": None if init is None else hashlib.sha256(
                    json.dumps(init.meta.get("fingerprint"), sort_keys=True).encode()).hexdigest(),
                **({"regions": self.region_name, "regions_sha256": regions_digest(self.regions)}
                   if self.method == "region" else {})}


def regions_digest(regions: dict) -> str:
    """SHA-256 of ``regions`` (image id -> bool ``(H, W)``): the ids in order, each region's shape and bits."""
    digest = hashlib.sha256()
    for image_id in sorted(regions):
        region = np.asarray(regions[image_id], dtype=bool)
        digest.update(f"{image_id}:{region.shape}".encode())
        digest.update(np.packbits(region).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class NewClassifier:
    """The classifier :func:`train_with_mask` builds from scratch: ``arch``, input ``image_size`` and
    ``normalization`` (default :meth:`Normalization.for_channels`). A run starting from a trained classifier
    (``init``) keeps that one's instead."""

    arch: str = "resnet18"
    image_size: int = 128
    normalization: Normalization | None = None

    def resolve(self, init: TrainedModel | None, channels: int) -> tuple[str, int, Normalization]:
        """``(arch, image_size, normalization)`` of the model to train: ``init``'s when given, else these."""
        arch, image_size, normalization = self.arch, self.image_size, self.normalization
        if init is not None:
            arch, image_size = init.meta["arch"], init.meta["image_size"]
            normalization = Normalization(**{k: tuple(v) for k, v in init.meta["normalization"].items()})
        return arch, image_size, normalization or Normalization.for_channels(channels)


def train_with_mask(data: LoadedDataset, checkpoint: str | Path, fix: MaskFix, *, config: TrainConfig | None = None,
                    batch_size: int = 32, init: TrainedModel | None = None,
                    classifier: NewClassifier = NewClassifier(), retrain: bool = False) -> TrainedModel:
    """Train (or load) a classifier like :func:`segx_helpers.workflows.training_recipes.train_classifier`, with
    ``fix``, a :class:`MaskFix` that uses the clinical mask, e.g.
    ``train_with_mask(data, "rrr.pt", MaskFix("rrr", 10.0), config=config, init=baseline)``.

    Same architecture, loop, validation (best epoch by validation macro AUROC) and thresholds as the
    baseline, so "same budget" means the same ``config`` (default: lr 1e-3, monitor ``val_auroc``) and
    ``batch_size``. ``init``: start from that trained classifier's weights (fine-tune it with the fix; its
    architecture and normalisation are kept) instead of from scratch as ``classifier`` says. An existing
    checkpoint is reused only when everything, fix and starting point included, matches (else a
    :class:`~segx_helpers.models.checkpoints.CheckpointError`); ``retrain`` trains again.
    """
    checkpoint = Path(checkpoint)
    config = config or TrainConfig(lr=1e-3, monitor="val_auroc")
    arch, image_size, norm = classifier.resolve(init, data.info.channels)
    record = fix.record(init)
    fingerprint = training_fingerprint(data, image_size, config, kind="classifier", arch=arch, init="random",
                                       class_weighting=False, batch_size=batch_size, normalization=asdict(norm),
                                       fix=record)
    if checkpoint.exists() and not retrain:
        return load_trained(checkpoint, "classifier", fingerprint,
                            f"To train again pass retrain=True (RETRAIN = True in the notebook), or delete {checkpoint}.")
    task = data.info.task
    splits = _FixSplits.of(data, fix, image_size, norm, batch_size, config.seed)
    task_loss = classification_loss(task)
    model = _model_to_train(data, fix, arch, init, config.seed, splits.train_set)
    batch_loss = RRRLoss(task_loss, task, float(fix.strength), fix.penalty_images) if fix.method == "rrr" else None
    meta = {
        "kind": "classifier",
        "arch": arch,
        "task": task,
        "class_names": data.info.class_names,
        "in_channels": data.info.channels,
        "image_size": image_size,
        "normalization": asdict(norm),
        "dataset": data.info.name,
        "init": "random",
        "pretrained": False,
        "thresholds": None,
        "fingerprint": fingerprint,
        "fix": record,
        "finished": False,
    }
    started = time.perf_counter()
    history = fit(
        model,
        task_loss,
        splits.train_loader,
        splits.validate,
        config,
        checkpoint=CheckpointPlan(path=checkpoint, meta=meta, overwrite=retrain),
        batch_loss=batch_loss,
    )
    meta["train_seconds"] = time.perf_counter() - started
    _finish_meta(meta, model, history, splits, batch_loss, config)
    save_checkpoint(checkpoint, model, meta, overwrite=True)
    return TrainedModel(model, meta, history.frame())


@dataclass
class _FixSplits:
    """The splits of one :func:`train_with_mask` run: the training split with the fix's masks and its
    loader (seeded shuffling; the background intervention as its ``collate_fn``), and the validation loader.
    ``validate(model)`` is the loop's validation (``val_auroc``); it keeps its last predictions in ``last``."""

    task: str
    train_set: MaskSourceDataset
    train_loader: DataLoader
    val_loader: DataLoader
    intervention: BackgroundIntervention | RegionIntervention | None
    last: dict | None = None

    @classmethod
    def of(cls, data: LoadedDataset, fix: MaskFix, image_size: int, norm: Normalization, batch_size: int,
           seed: int) -> "_FixSplits":
        """A ``ValueError`` when the training split has no masks and ``fix`` brings none."""
        if data.table.loc[data.table["split"] == "train", "mask_path"].isna().all() and not fix.masks:
            raise ValueError(f"{data.root} has no masks for its training split: pass masks= (e.g. predicted_training_masks)")
        if fix.method == "region":
            train_set = RegionDataset(data, "train", image_size, norm, train=True, masks=fix.masks, regions=fix.regions)
            intervention = RegionIntervention(fix.strength, seed=seed)
        else:
            train_set = MaskSourceDataset(data, "train", image_size, norm, train=True, masks=fix.masks)
            intervention = BackgroundIntervention(fix.strength, fix.fill, seed=seed) if fix.method == "background" else None
        val_set = SegXDataset(data, "val", image_size, norm)
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                                  collate_fn=intervention)
        return cls(data.info.task, train_set, train_loader, make_loader(val_set, 64, shuffle=False), intervention)

    def validate(self, model: nn.Module) -> dict:
        self.last = result = predict_classifier(model, self.val_loader, self.task)
        return {"val_auroc": macro_auroc(result["targets"], result["probs"])}


def _starting_model(data: LoadedDataset, arch: str, init: TrainedModel | None, seed: int) -> nn.Module:
    """A fresh ``arch`` classifier for ``data`` built after seeding, holding ``init``'s weights when given."""
    set_seed(seed)
    model = build_classifier(arch, num_classes=data.info.num_classes, in_channels=data.info.channels)
    if init is not None:
        model.load_state_dict(init.model.state_dict())
    return model


def _model_to_train(data: LoadedDataset, fix: MaskFix, arch: str, init: TrainedModel | None, seed: int,
                    train_set: MaskSourceDataset) -> nn.Module:
    """The model to train (:func:`_starting_model`); for RRR it is first checked for the double backward on
    two training images (:func:`check_double_backward`), then built again, untouched."""
    model = _starting_model(data, arch, init, seed)
    if fix.method != "rrr":
        return model
    probe = default_collate([train_set[i] for i in range(min(2, len(train_set)))])
    check_double_backward(model, probe["image"], probe["mask"], data.info.task)
    return _starting_model(data, arch, init, seed)


def _finish_meta(meta: dict, model: nn.Module, history, splits: _FixSplits, batch_loss: RRRLoss | None,
                 config: TrainConfig) -> None:
    """After the loop, into ``meta``: the decision cut-offs chosen on validation and the validation AUROC of the best epoch
    (its predictions reused when it was the last epoch validated), the last epoch's mean penalty (RRR), the
    images swapped (background), the history and the configuration, ``finished``."""
    best_was_last = history.best_epoch == len(history.records) - 1 and splits.last is not None
    val = splits.last if best_was_last else predict_classifier(model, splits.val_loader, splits.task)
    meta["thresholds"] = select_decision_thresholds(val["targets"], val["probs"], splits.task).tolist()
    meta["metrics"] = {"val_auroc": macro_auroc(val["targets"], val["probs"])}
    if batch_loss is not None and batch_loss.log:
        meta["metrics"]["last_epoch_penalty"] = float(np.mean([p for _, p in batch_loss.log[-len(splits.train_loader):]]))
    if splits.intervention is not None:
        meta["metrics"]["images_swapped"] = splits.intervention.swapped
    meta["history"] = history.records
    meta["train_config"] = asdict(config)
    meta["finished"] = True


def training_seconds(trained: TrainedModel) -> float:
    """Seconds the model's training epochs took (from its history; validation included)."""
    history = trained.meta.get("history") or []
    return float(sum(r.get("seconds", 0.0) for r in history))


# ------------------------------------------------------------------------------ choosing λ and q on validation

def selection_table(candidates: dict[str, TrainedModel], data: LoadedDataset, split: str = "val",
                    method: str = "gradcam", p: float = 5.0) -> pd.DataFrame:
    """Score candidate models on the validation split (never the test split) and pick one.

    Per candidate: the validation task loss (cross-entropy or BCE), macro AUROC, and the **share of the
    Grad-CAM attribution outside the ground-truth mask** (1 − ``SegU mass`` from the one analysis path,
    with the true masks as the reference). The validation split keeps the training split's shortcut, so its
    loss alone rewards the shortcut; the outside share is what the fix is for. ``criterion = loss + outside
    share`` (both on comparable scales, lower is better); ``chosen`` marks the lowest.
    """
    rows = []
    for name, trained in candidates.items():
        tensors = split_tensors(data, split, trained.meta)
        true_masks = tensors["mask"][:, 0].numpy() > 0.5
        loader = make_loader(SegXDataset(data, split, trained.meta["image_size"],
                                         Normalization(**trained.meta["normalization"])), 64, shuffle=False)
        result = predict_classifier(trained.model, loader, trained.meta["task"])
        probs = torch.as_tensor(result["probs"], dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
        targets = torch.as_tensor(result["targets"])
        if trained.meta["task"] == "multiclass":
            loss = float(nn.functional.nll_loss(probs.log(), targets.long()))
        else:
            loss = float(nn.functional.binary_cross_entropy(probs, targets.double()))
        e = explain_predictions(trained, tensors["image"], method, run=RunOptions(progress=False))
        labels = SplitLabels(tensors["image_id"], tensors["target"].numpy(), trained.meta["task"], trained.meta["class_names"])
        scored = explanation_results(e, labels, true_masks, options=AnalysisOptions(p=p, localisation=False))
        outside = float(1.0 - scored.table["SegU mass"].mean())
        fix = trained.meta.get("fix") or {"method": "none", "strength": 0.0}
        rows.append({"model": name, "method": fix["method"], "strength": fix["strength"], "val loss": loss,
                     "val AUROC": macro_auroc(result["targets"], result["probs"]),
                     "val attribution outside mask": outside, "criterion": loss + outside})
    table = pd.DataFrame(rows)
    table["chosen"] = False
    if len(table):
        table.loc[table["criterion"].idxmin(), "chosen"] = True
    return table


# ------------------------------------------------------------------------------ comparing on the test split

@dataclass
class FixComparison:
    """Every model measured on the test split: ``metrics`` (model, metric, value, ci_low, ci_high),
    ``results`` (model -> :class:`~segx_helpers.workflows.results.Results` of the explanation method),
    ``predictions`` (model -> prediction rows with ``shortcut_driven``), ``breakdown`` (accuracy where the
    artefact agrees vs disagrees, per model), ``evaluations`` (model -> :func:`evaluate_classifier` output)."""

    metrics: pd.DataFrame
    results: dict
    predictions: dict
    breakdown: pd.DataFrame
    evaluations: dict

    def wide(self, digits: int = 3) -> pd.DataFrame:
        """One row per model, one column per metric, each cell ``value [low, high]`` (:func:`wide_metrics`)."""
        return wide_metrics(self.metrics, digits)

    def value(self, model: str, metric: str, what: str = "value") -> float:
        row = self.metrics[(self.metrics["model"] == model) & (self.metrics["metric"] == metric)]
        return float(row[what].iloc[0]) if len(row) else float("nan")


def wide_metrics(metrics: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``metrics`` (model, metric, value, ci_low, ci_high) as one row per model and one column per metric, in the order
    they first appear, each cell ``value [low, high]``."""
    cells = metrics.assign(text=[f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                                 for v, lo, hi in metrics[["value", "ci_low", "ci_high"]].to_numpy()])
    return cells.pivot(index="model", columns="metric", values="text").loc[list(dict.fromkeys(metrics["model"]))][
        list(dict.fromkeys(metrics["metric"]))]


def _mean_ci(values, groups, n_resamples: int, seed: int) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    return bootstrap_ci(lambda v: float(np.mean(v)), values, n_resamples=n_resamples, seed=seed, groups=groups)


def agreement_rows(evaluation: dict, data: LoadedDataset, class_names: list[str]) -> pd.DataFrame:
    """One row per (test image, shortcut class): ``image_id``, ``class``, ``correct`` (the decision for that
    class is right; multiclass: the prediction is right), ``agrees`` (the artefact is present exactly when
    the class is). Empty for a dataset without shortcut artefacts."""
    pairs = shortcut_pairs(data.info)
    if not pairs:
        return pd.DataFrame(columns=["image_id", "class", "correct", "agrees"])
    artefacts = load_artefacts(data.root).set_index("image_id").loc[evaluation["image_id"]]
    targets, pred = np.asarray(evaluation["targets"]), np.asarray(evaluation["pred"])
    frames = []
    for class_name, column in pairs.items():
        c = class_names.index(class_name)
        truth = targets == c if targets.ndim == 1 else targets[:, c] > 0.5
        correct = pred == targets if targets.ndim == 1 else (pred[:, c] > 0) == truth
        frames.append(pd.DataFrame({"image_id": evaluation["image_id"], "class": class_name, "correct": correct,
                                    "agrees": artefacts[column].to_numpy(dtype=bool) == truth}))
    return pd.concat(frames, ignore_index=True)


def agreement_gap(rows: pd.DataFrame) -> float:
    """Accuracy where the artefact agrees with the label minus where it disagrees (pooled over shortcut classes)."""
    agrees = rows["agrees"].to_numpy(bool)
    correct = rows["correct"].to_numpy(float)
    if agrees.all() or not agrees.any():
        return float("nan")
    return float(correct[agrees].mean() - correct[~agrees].mean())


def compare_fixes(models: dict[str, TrainedModel], data: LoadedDataset, predicted_masks: np.ndarray,
                  method: str = "gradcam", n_resamples: int = 1000, seed: int = 0, p: float = 5.0) -> FixComparison:
    """Measure each model on the test split, with 95 % bootstrap CIs over test images: accuracy (multilabel:
    per-finding decision accuracy), macro AUROC, accuracy where the shortcut artefact agrees / disagrees with
    the label and their gap, the shortcut-driven rate (counterfactual twins), and, from the one analysis path
    (:func:`segx_helpers.workflows.results.explanation_results` with ``method``'s maps): attribution mass on the
    artefact, SegU ``c_IoU`` and ``c_AUITC`` (against ``predicted_masks``, the segmenter's binary test masks),
    and localisation against the true lesion (original and SegX ``IoU@p``)."""
    has_twins = bool(shortcut_pairs(data.info))
    rows, results, predictions, breakdowns, evaluations = [], {}, {}, [], {}

    def add(model, metric, value_low_high):
        rows.append({"model": model, "metric": metric, "value": value_low_high[0], "ci_low": value_low_high[1],
                     "ci_high": value_low_high[2]})

    for name, trained in models.items():
        meta = trained.meta
        class_names = list(meta["class_names"])
        evaluation = evaluate_classifier(trained, data, "test", n_resamples=n_resamples, seed=seed)
        evaluations[name] = evaluation
        summary = evaluation["summary"].set_index("metric")
        targets, pred = np.asarray(evaluation["targets"]), np.asarray(evaluation["pred"])
        if meta["task"] == "multiclass":
            add(name, "accuracy", tuple(summary.loc["accuracy", ["value", "ci_low", "ci_high"]]))
        else:
            add(name, "accuracy", _mean_ci((pred == targets).mean(axis=1), None, n_resamples, seed))
        add(name, "macro AUROC", tuple(summary.loc["macro AUROC", ["value", "ci_low", "ci_high"]]))
        agree = agreement_rows(evaluation, data, class_names)
        if len(agree):
            groups = agree["image_id"].to_numpy()
            for label, keep in (("accuracy, artefact agrees", agree["agrees"]), ("accuracy, artefact disagrees", ~agree["agrees"])):
                add(name, label, _mean_ci(agree.loc[keep, "correct"], groups[keep.to_numpy()], n_resamples, seed))
            add(name, "agree − disagree gap", bootstrap_ci(
                lambda c, a: agreement_gap(pd.DataFrame({"correct": c, "agrees": a})), agree["correct"].to_numpy(),
                agree["agrees"].to_numpy(), n_resamples=n_resamples, seed=seed, groups=groups))
            breakdowns.append(agree.assign(model=name))
        table = prediction_rows(evaluation, class_names)
        if has_twins:
            table["shortcut_driven"] = shortcut_driven(trained.model, meta, data, table)
            add(name, "shortcut-driven rate", _mean_ci(table["shortcut_driven"], table["image_id"].to_numpy(),
                                                       n_resamples, seed))
        predictions[name] = table
        tensors = split_tensors(data, "test", meta)
        true_masks = tensors["mask"][:, 0].numpy() > 0.5
        artefacts = shortcut_artefact_masks(data, tensors["image_id"], meta["image_size"])
        e = explain_predictions(trained, tensors["image"], method, run=RunOptions(progress=False))
        labels = SplitLabels(tensors["image_id"], tensors["target"].numpy(), meta["task"], class_names)
        res = explanation_results(e, labels, predicted_masks, true_masks, tensors["has_mask"], artefacts,
                                  options=AnalysisOptions(p=p))
        results[name] = res
        ids = res.table["image_id"].to_numpy()
        columns = (["artefact mass"] if artefacts is not None else []) + ["c_IoU", "c_AUITC", f"original IoU@{p:g}%",
                                                                           f"SegX mask-then-top IoU@{p:g}%"]
        for column in columns:
            keep = res.table[column].notna().to_numpy()
            add(name, column, _mean_ci(res.table.loc[keep, column], ids[keep], n_resamples, seed))
    breakdown = pd.concat(breakdowns, ignore_index=True) if breakdowns else pd.DataFrame()
    return FixComparison(pd.DataFrame(rows), results, predictions, breakdown, evaluations)


def fix_summary(comparison: FixComparison, names: dict[str, str] | None = None) -> dict:
    """The ``"fix"`` entry of ``outputs/summary.json``: per model (keys renamed by ``names``, e.g.
    ``{"RRR (λ=10)": "rrr"}``) ``accuracy``, ``auroc``, ``shortcut_driven_rate``, ``artefact_mass``,
    ``segu_c_iou_mean``, each with a ``<key>_ci`` pair, plus the agree/disagree ``accuracy_gap``."""
    keys = {"accuracy": "accuracy", "auroc": "macro AUROC", "shortcut_driven_rate": "shortcut-driven rate",
            "artefact_mass": "artefact mass", "segu_c_iou_mean": "c_IoU", "accuracy_gap": "agree − disagree gap"}
    out = {}
    for model in comparison.results:
        entry = {}
        for key, metric in keys.items():
            entry[key] = comparison.value(model, metric)
            entry[f"{key}_ci"] = [comparison.value(model, metric, "ci_low"), comparison.value(model, metric, "ci_high")]
        out[(names or {}).get(model, model)] = entry
    return out


def input_gradient_energy(model: nn.Module, images: torch.Tensor, masks: np.ndarray, task: str,
                          artefacts: np.ndarray | None = None, batch_size: int = 50) -> pd.DataFrame:
    """Where a classifier is *locally* sensitive, per image of ``images`` ``(N, C, H, W)``: the squared input gradient
    of the summed log-probabilities (what :func:`rrr_penalty` differentiates), summed over channels and over the
    pixels ``outside`` the mask (bool ``(N, H, W)``: exactly RRR's penalty), ``inside`` it, and ``on artefact``
    (``artefacts`` bool ``(N, H, W)``; NaN where an image has none). In eval mode, float32, without a graph for the
    parameters. A counterfactual twin tests a *finite* change of the artefact; this tests an infinitesimal one."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else images.device
    was_training = model.training
    model.eval()
    energies = []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].detach().float().to(device).requires_grad_(True)
            (grads,) = torch.autograd.grad(log_probabilities(model(batch).float(), task).sum(), batch)
            energies.append(grads.pow(2).sum(dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    energy = np.concatenate(energies) if energies else np.zeros((0,) + tuple(images.shape[-2:]), np.float32)
    inside = np.asarray(masks, dtype=bool)
    table = pd.DataFrame({"outside": (energy * ~inside).sum(axis=(1, 2)), "inside": (energy * inside).sum(axis=(1, 2))})
    if artefacts is not None:
        artefacts = np.asarray(artefacts, dtype=bool)
        on = (energy * artefacts).sum(axis=(1, 2))
        table["on artefact"] = np.where(artefacts.any(axis=(1, 2)), on, np.nan)
    return table


def sensitivity_table(comparison: FixComparison, models: dict[str, TrainedModel], data: LoadedDataset) -> pd.DataFrame:
    """Why an input-gradient penalty can be met while the shortcut stays: per model, the mean of
    :func:`input_gradient_energy` over the test images, outside the true masks (RRR's penalty), inside them and on
    the shortcut artefact (images that carry it), the artefact's share of each such image's gradient energy, and the
    shortcut-driven rate of ``comparison`` (the twins: a finite change). One row per model of ``models``."""
    rows = []
    for name, trained in models.items():
        tensors = split_tensors(data, "test", trained.meta)
        artefacts = shortcut_artefact_masks(data, tensors["image_id"], trained.meta["image_size"])
        energy = input_gradient_energy(trained.model, tensors["image"], tensors["mask"][:, 0].numpy() > 0.5,
                                       trained.meta["task"], artefacts)
        row = {"model": name, "gradient² outside the mask (RRR's penalty)": float(energy["outside"].mean()),
               "gradient² inside the mask": float(energy["inside"].mean())}
        if "on artefact" in energy:
            carried = energy["on artefact"].notna()
            row["gradient² on the artefact"] = float(energy.loc[carried, "on artefact"].mean())
            row["artefact share of the gradient²"] = float((energy.loc[carried, "on artefact"] / (
                energy.loc[carried, "outside"] + energy.loc[carried, "inside"])).mean())
        row["shortcut-driven rate"] = comparison.value(name, "shortcut-driven rate")
        rows.append(row)
    return pd.DataFrame(rows)


def target_check(comparison: FixComparison, baseline: str, fixed: str,
                 metrics: tuple[str, ...] = ("shortcut-driven rate", "agree − disagree gap")) -> pd.DataFrame:
    """The issue's targets for one fixed model against the baseline: each metric at most half the baseline's,
    with 95 % CIs that do not overlap. One row per metric with ``met``."""
    rows = []
    for metric in metrics:
        b, f = (comparison.value(baseline, metric), comparison.value(fixed, metric))
        b_low, f_high = comparison.value(baseline, metric, "ci_low"), comparison.value(fixed, metric, "ci_high")
        halved = bool(abs(f) <= 0.5 * abs(b)) if np.isfinite(b) and np.isfinite(f) else False
        separate = bool(f_high < b_low) if np.isfinite(b_low) and np.isfinite(f_high) else False
        rows.append({"model": fixed, "metric": metric, "baseline": b, "fixed": f,
                     "ratio": f / b if b else float("nan"), "at most half": halved, "CIs do not overlap": separate,
                     "met": halved and separate})
    return pd.DataFrame(rows)


def fix_config(settings, seed: int = 0) -> TrainConfig:
    """How long notebook 07 trains each fix, starting from notebook 03's classifier: one epoch of
    ``settings.max_batches_per_epoch`` batches in quick mode, a third of the classifier's epochs in full mode, at
    lr 3e-4 (a fresh AdamW at the baseline's 1e-3 wrecks the model within 12 steps: validation loss 0.36 -> 5.2).
    The control run (``method="none"``: the same extra training without a fix) uses the same."""
    if settings.max_batches_per_epoch is not None:
        return TrainConfig(epochs=1, lr=3e-4, monitor="val_auroc", seed=seed,
                           max_batches_per_epoch=settings.max_batches_per_epoch, cpu_bf16=settings.cpu_bf16,
                           cpu_fast_kernels=settings.cpu_fast_kernels)
    return TrainConfig(epochs=max(1, settings.cls_epochs // 3), lr=3e-4, monitor="val_auroc", seed=seed,
                       cpu_bf16=settings.cpu_bf16, cpu_fast_kernels=settings.cpu_fast_kernels)


# ------------------------------------------------------------------------------ what notebook 07 reads off the comparison

def choose_per_method(selection: pd.DataFrame, methods: tuple[str, ...] = ("rrr", "background")) -> pd.DataFrame:
    """:func:`selection_table` with ``chosen`` marking the lowest criterion of each fix method separately (one λ for
    RRR, one q for the background intervention) instead of the lowest overall."""
    table = selection.copy()
    table["chosen"] = False
    for method in methods:
        rows = table[table["method"] == method]
        if len(rows):
            table.loc[rows["criterion"].idxmin(), "chosen"] = True
    return table


def targets_met(targets: pd.DataFrame, names: dict[str, str] | None = None) -> dict[str, bool]:
    """Per fixed model of ``targets`` (:func:`target_check` rows, concatenated), whether it met every target; keys
    renamed by ``names`` as in :func:`fix_summary`."""
    return {(names or {}).get(model, model): bool(targets[targets["model"] == model]["met"].all())
            for model in dict.fromkeys(targets["model"])}


def shortcut_driven_examples(comparison: FixComparison, model: str = "baseline", n: int = 4) -> list[str]:
    """Ids of the first ``n`` test images whose prediction by ``model`` was shortcut-driven (flips with the
    artefact), to compare every model's maps on; the first ``n`` explained images when there are none (or no
    counterfactual twins)."""
    rows = comparison.predictions[model]
    driven = rows["shortcut_driven"] if "shortcut_driven" in rows else pd.Series(False, index=rows.index)
    picked = list(rows.loc[driven.to_numpy(dtype=bool), "image_id"].unique()[:n])
    return picked or list(dict.fromkeys(comparison.results[model].table["image_id"]))[:n]
