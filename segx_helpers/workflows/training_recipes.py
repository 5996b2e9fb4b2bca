"""Training recipes the notebooks call: train or load the segmenter and the classifier, evaluate them,
the training configuration of each run mode, and loading (or making) what a notebook needs.

Each ``train_*`` function skips training when its checkpoint already exists (re-running a
notebook is cheap and never clobbers a model) unless ``retrain=True``. A checkpoint is reused only
if it was trained on the same thing (its fingerprint, :func:`segx_helpers.models.checkpoints.training_fingerprint`),
else :class:`~segx_helpers.models.checkpoints.CheckpointError` names each differing field and how to retrain.

:func:`segmenter_recipe` / :func:`classifier_recipe` and :func:`finish_training` are the parts of a
recipe besides the loop (loss, validation metric, checkpoint metadata, thresholds chosen on
validation); ``segx train`` (:func:`segx_helpers.cli.distributed.train`) uses them with its DDP loop.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from segx_helpers.data.augmentation import REAL_DERMOSCOPY, Augmentation, augmentation_for, default_augmentation
from segx_helpers.data.format import LoadedDataset, load_dataset
from segx_helpers.data.synthetic import GENERATORS, SyntheticConfig, ensure_synthetic
from segx_helpers.data.torch_dataset import Normalization, SegXDataset
from segx_helpers.models.checkpoints import (TrainedModel, check_fingerprint, last_checkpoint_path, load_checkpoint,
                                             load_trained, save_checkpoint, split_tensors, training_fingerprint)
from segx_helpers.models.masks import mask_probabilities
from segx_helpers.models.networks import (CPU_DECODER_CHANNELS, Initialisation, build_classifier, build_segmenter,
                                          classifier_normalization, pick_device, resolve_weights)
from segx_helpers.models.training import (
    CheckpointPlan,
    DiceBCELoss,
    TrainConfig,
    balanced_class_weights,
    classification_loss,
    fit,
    make_loader,
    predict_classifier,
    predict_masks,
    set_seed,
)
from segx_helpers.scores.metrics import (classification_report, dice_score, iou_score, macro_auroc, predict_labels,
                                         select_decision_thresholds, select_mask_threshold)
from segx_helpers.workflows.settings import RunSettings, TutorialPaths, require

# The fingerprint fields prepare_models checks: the data and the run mode, not the notebooks' model choices.
_DATA_AND_MODE = ("dataset", "class_names", "task", "image_size", "channels", "train_ids_sha256", "epochs",
                  "max_batches_per_epoch", "dataset_generator")


def _retrain_hint(path: Path, notebook: str | None = None) -> str:
    where = f"run notebook {notebook} again with RETRAIN = True" if notebook else "pass retrain=True (RETRAIN = True in the notebook)"
    return f"To train again, {where} to replace it, or delete or rename {path} (keep it to reuse it with its own settings)."


def _interrupted_run(checkpoint: Path, kind: str, fingerprint: dict) -> bool:
    """True when ``checkpoint`` holds an unfinished run of exactly ``fingerprint`` whose resume state
    (``<checkpoint>.last.pt``) is still there: running the notebook again then continues it (:func:`fit`'s
    ``resume``) instead of refusing it. Another fingerprint is refused as for a finished checkpoint."""
    if not last_checkpoint_path(checkpoint).exists():
        return False
    _, meta = load_checkpoint(checkpoint, expected_kind=kind)
    if meta.get("finished") is not False:
        return False
    check_fingerprint(checkpoint, meta, fingerprint, _retrain_hint(checkpoint), require_finished=False)
    print(f"{checkpoint} holds an interrupted run of these settings: resuming it from {last_checkpoint_path(checkpoint)}")
    return True


# A validation class with fewer images than this makes "best epoch by validation AUROC" a coin toss.
SMALL_VALIDATION_CLASS = 10
CLASSIFIER_MONITORS = ("val_auroc", "val_loss", "auto")


class SmallValidationWarning(UserWarning):
    """A class has so few validation images that the validation AUROC of one epoch is mostly noise."""


def _check_monitor(config: TrainConfig, key: str, also: tuple[str, ...] = ()) -> None:
    if config.monitor != key and config.monitor not in also:
        others = "".join(f" or {k!r}" for k in also)
        raise ValueError(f"config.monitor is {config.monitor!r}, but this model is validated with {key!r}{others}: "
                         f"use TrainConfig(monitor={key!r}, ...).")


def validation_class_counts(data: LoadedDataset) -> dict[str, int]:
    """Validation images per class (multiclass), or validation positives per class (multilabel)."""
    targets = data.targets[(data.table["split"] == "val").to_numpy()]
    if data.info.task == "multiclass":
        counts = np.bincount(targets, minlength=data.info.num_classes)
    else:
        counts = targets.sum(axis=0)
    return {name: int(n) for name, n in zip(data.info.class_names, counts)}


def classifier_selection(config: TrainConfig, data: LoadedDataset) -> TrainConfig:
    """The classifier's model-selection rule for this dataset's validation split.

    Warns (:class:`SmallValidationWarning`, naming each class and its count) when a validation class has
    fewer than :data:`SMALL_VALIDATION_CLASS` images (positives, multilabel). ``config.monitor="auto"``
    then selects on the validation loss (cross-entropy / BCE, the training loss), which every image moves
    a little, instead of the macro AUROC, which one image of a rare class can swing; with enough images of
    every class "auto" is ``"val_auroc"``. An explicit ``"val_auroc"`` or ``"val_loss"`` is kept. Returns
    the configuration with the monitor resolved and prints the choice and why.
    """
    _check_monitor(config, "val_auroc", also=CLASSIFIER_MONITORS[1:])
    counts = validation_class_counts(data)
    small = {name: n for name, n in counts.items() if n < SMALL_VALIDATION_CLASS}
    if small:
        listed = ", ".join(f"{name!r}: {n}" for name, n in small.items())
        warnings.warn(f"{data.info.name}: the validation split has fewer than {SMALL_VALIDATION_CLASS} images of class "
                      f"{listed}; a best epoch chosen by validation AUROC is then mostly noise. Move more images of "
                      "these classes to the validation split if you can.", SmallValidationWarning, stacklevel=3)
    if config.monitor != "auto":
        return config
    monitor = "val_loss" if small else "val_auroc"
    why = (f"a validation class has fewer than {SMALL_VALIDATION_CLASS} images ({', '.join(small)})" if small
           else f"every validation class has at least {SMALL_VALIDATION_CLASS} images")
    print(f"monitor='auto' -> {monitor!r}: {why}")
    return dataclasses.replace(config, monitor=monitor)


@dataclass(frozen=True)
class ClassifierSpec:
    """What classifier is trained, all of it recorded in the checkpoint's fingerprint: ``arch`` (see
    :data:`~segx_helpers.models.networks.CLASSIFIER_ARCHS`) at ``image_size``, starting from ``weights`` (a request
    for :func:`~segx_helpers.models.networks.resolve_weights`: ``None`` random, ``"imagenet"``, ``"if-online"``,
    a file; the fingerprint records what it resolved to), the loss's ``class_weighting`` (inverse class
    frequency) and ``label_smoothing``, the training ``augmentation`` (``None``: the dataset's own), the input
    ``normalization`` (``None``: the architecture's, :func:`~segx_helpers.models.networks.classifier_normalization`)
    and ``batch_size``."""

    arch: str = "resnet18"
    image_size: int = 128
    weights: str | None = None
    class_weighting: bool = False
    label_smoothing: float = 0.0
    augmentation: Augmentation | None = None
    normalization: Normalization | None = None
    batch_size: int = 32

    def resolved(self, data: LoadedDataset) -> "ClassifierSpec":
        """This spec with the augmentation and normalisation it will use on ``data`` filled in."""
        return dataclasses.replace(self, augmentation=self.augmentation or augmentation_for(data.info),
                                   normalization=self.normalization or classifier_normalization(self.arch,
                                                                                                data.info.channels))


@dataclass(frozen=True)
class SegmenterSpec:
    """What segmenter is trained, all of it in the checkpoint's fingerprint: a U-Net with ``encoder`` and
    ``decoder_channels`` at ``image_size`` (a multiple of 32), the encoder starting from ``encoder_weights`` (as
    :class:`ClassifierSpec`'s ``weights``), the input ``normalization`` (``None``: ImageNet statistics, their
    channel mean for grayscale) and ``batch_size``."""

    encoder: str = "resnet18"
    image_size: int = 128
    decoder_channels: tuple[int, ...] = CPU_DECODER_CHANNELS
    encoder_weights: str | None = None
    normalization: Normalization | None = None
    batch_size: int = 32

    def resolved(self, data: LoadedDataset) -> "SegmenterSpec":
        return dataclasses.replace(
            self, normalization=self.normalization or Normalization.for_channels(data.info.channels)
        )


def classifier_fingerprint(data: LoadedDataset, spec: ClassifierSpec, config: TrainConfig, init: Initialisation,
                           **extra) -> dict:
    """The fingerprint of a classifier trained on ``data`` as ``spec`` (resolved) says with ``config``, starting from
    ``init`` (its name, not the request); ``extra``: fields a caller adds (e.g. ``segx train``'s world size)."""
    return training_fingerprint(data, spec.image_size, config, kind="classifier", arch=spec.arch, init=init.name,
                                class_weighting=spec.class_weighting, label_smoothing=spec.label_smoothing,
                                augmentation=asdict(spec.augmentation), batch_size=spec.batch_size,
                                normalization=asdict(spec.normalization), **extra)


def segmenter_fingerprint(data: LoadedDataset, spec: SegmenterSpec, config: TrainConfig, init: Initialisation,
                          **extra) -> dict:
    """The fingerprint of a segmenter trained on ``data`` as ``spec`` (resolved) says (see
    :func:`classifier_fingerprint`)."""
    return training_fingerprint(data, spec.image_size, config, kind="segmenter", encoder=spec.encoder,
                                decoder_channels=list(spec.decoder_channels), init=init.name,
                                batch_size=spec.batch_size, normalization=asdict(spec.normalization), **extra)


def _datasets(data: LoadedDataset, image_size: int, norm: Normalization, augmentation: Augmentation | None = None):
    return (SegXDataset(data, "train", image_size, norm, train=True, augmentation=augmentation),
            SegXDataset(data, "val", image_size, norm))


@dataclass
class Recipe:
    """A recipe's parts besides the training loop: the checkpoint ``meta`` (``finished`` False until
    :func:`finish_training`), the ``loss``, the batch key of the targets, ``validate(model) -> {metric: value}``
    for the loop, and ``choose_thresholds(model)``, which stores the decision thresholds chosen on
    validation and the validation metric in ``meta``."""

    meta: dict
    loss: nn.Module
    target_key: str
    validate: Callable[[nn.Module], dict]
    choose_thresholds: Callable[[nn.Module], None]


def segmenter_recipe(data: LoadedDataset, spec: SegmenterSpec, init: Initialisation, val_set: SegXDataset,
                     val_loader, fingerprint: dict, device: str | None = None) -> Recipe:
    """The segmenter's recipe: Dice + BCE loss, best epoch by validation Dice, the binarisation
    threshold chosen on validation. ``spec`` resolved (:meth:`SegmenterSpec.resolved`); ``val_set`` /
    ``val_loader``: the validation split."""
    val_masks = val_set.tensors()["mask"][:, 0].numpy() > 0.5
    meta = {
        "kind": "segmenter",
        "arch": "Unet",
        "encoder": spec.encoder,
        "decoder_channels": list(spec.decoder_channels),
        "in_channels": data.info.channels,
        "image_size": spec.image_size,
        "normalization": asdict(spec.normalization),
        "dataset": data.info.name,
        "init": init.name,
        "init_source": init.source,
        "mask_description": data.info.mask_description,
        "threshold": 0.5,
        "fingerprint": fingerprint,
        "finished": False,
    }

    def validate(model: nn.Module) -> dict:
        return {"val_dice": float(dice_score(val_masks, predict_masks(model, val_loader, device=device) >= 0.5).mean())}

    def choose_thresholds(model: nn.Module) -> None:
        prob = predict_masks(model, val_loader, device=device)
        meta["threshold"] = select_mask_threshold(val_masks, prob)
        meta["metrics"] = {"val_dice": float(dice_score(val_masks, prob >= meta["threshold"]).mean())}

    return Recipe(meta, DiceBCELoss(), "mask", validate, choose_thresholds)


def classifier_recipe(data: LoadedDataset, spec: ClassifierSpec, init: Initialisation, val_loader, fingerprint: dict,
                      class_weights: np.ndarray | None = None, device: str | None = None) -> Recipe:
    """The classifier's recipe: cross-entropy (multiclass) or BCE (multilabel) loss, optionally class
    weighted and with label smoothing (``spec``, resolved); ``validate`` returns the validation macro AUROC
    (``val_auroc``) and the same loss on the validation split (``val_loss``), either of which the loop may monitor
    (see :func:`classifier_selection`); the decision cut-offs chosen on validation
    (:func:`~segx_helpers.scores.metrics.select_decision_thresholds`: balanced accuracy for multiclass, Youden's J
    for two classes, F1 per class for multilabel) stored in the checkpoint."""
    task = data.info.task
    meta = {
        "kind": "classifier",
        "arch": spec.arch,
        "task": task,
        "class_names": data.info.class_names,
        "in_channels": data.info.channels,
        "image_size": spec.image_size,
        "normalization": asdict(spec.normalization),
        "dataset": data.info.name,
        "init": init.name,
        "init_source": init.source,
        "pretrained": init.name == "imagenet",
        "thresholds": None,
        "fingerprint": fingerprint,
        "finished": False,
    }

    loss = classification_loss(task, class_weights, spec.label_smoothing)

    def validate(model: nn.Module) -> dict:
        result = predict_classifier(model, val_loader, task, device=device)
        with torch.no_grad():
            val_loss = loss(torch.as_tensor(result["logits"]), torch.as_tensor(result["targets"])).item()
        return {"val_auroc": macro_auroc(result["targets"], result["probs"]), "val_loss": val_loss}

    def choose_thresholds(model: nn.Module) -> None:
        val = predict_classifier(model, val_loader, task, device=device)
        meta["thresholds"] = select_decision_thresholds(val["targets"], val["probs"], task).tolist()
        meta["metrics"] = {"val_auroc": macro_auroc(val["targets"], val["probs"])}

    return Recipe(meta, loss, "target", validate, choose_thresholds)


def finish_training(recipe: Recipe, model: nn.Module, history, config: TrainConfig, checkpoint: str | Path) -> dict:
    """After the loop: choose the thresholds on validation, store the history and the configuration,
    mark the run finished and save the checkpoint, then remove ``<checkpoint>.last.pt`` (the state kept
    for resuming an interrupted run, no longer needed). Returns the checkpoint's ``meta``."""
    recipe.choose_thresholds(model)
    recipe.meta.update(history=history.records, train_config=asdict(config), finished=True)
    save_checkpoint(checkpoint, model, recipe.meta, overwrite=True)
    last_checkpoint_path(checkpoint).unlink(missing_ok=True)
    return recipe.meta


def fit_recipe(model: nn.Module, recipe: Recipe, train_loader, config: TrainConfig, plan: CheckpointPlan) -> TrainedModel:
    """:func:`fit` ``model`` with ``recipe``'s loss and validation, writing checkpoints as ``plan`` says, then
    :func:`finish_training`: the step :func:`train_segmenter` and :func:`train_classifier` share."""
    history = fit(model, recipe.loss, train_loader, recipe.validate, config, checkpoint=plan,
                  target_key=recipe.target_key)
    return TrainedModel(model, finish_training(recipe, model, history, config, Path(plan.path)), history.frame())


def train_segmenter(data: LoadedDataset, checkpoint: str | Path, spec: SegmenterSpec = SegmenterSpec(),
                    config: TrainConfig | None = None, num_workers: int = 0, retrain: bool = False) -> TrainedModel:
    """Train (or load) a U-Net (``spec``) on the dataset's masks; Dice + BCE loss, best epoch by validation Dice.

    The binarisation threshold is then chosen on the validation split and stored in the checkpoint, with what
    initialised the encoder (``meta["init"]``). A checkpoint is reused only when its fingerprint matches.
    """
    checkpoint = Path(checkpoint)
    config = config or TrainConfig(lr=3e-3, monitor="val_dice")
    _check_monitor(config, "val_dice")
    spec = spec.resolved(data)
    init = resolve_weights(spec.encoder_weights, spec.encoder, kind="segmenter")
    fingerprint = segmenter_fingerprint(data, spec, config, init)
    resume = checkpoint.exists() and not retrain and _interrupted_run(checkpoint, "segmenter", fingerprint)
    if checkpoint.exists() and not retrain and not resume:
        return load_trained(checkpoint, "segmenter", fingerprint, _retrain_hint(checkpoint))
    if spec.image_size % 32:
        raise ValueError(f"image_size must be divisible by 32 for a U-Net, got {spec.image_size}")
    if data.table["mask_path"].isna().all():
        raise ValueError(f"{data.root} has no masks: a segmenter cannot be trained on it.")
    train_set, val_set = _datasets(data, spec.image_size, spec.normalization)
    train_loader = make_loader(train_set, spec.batch_size, shuffle=True, seed=config.seed, num_workers=num_workers)
    val_loader = make_loader(val_set, 64, shuffle=False)
    recipe = segmenter_recipe(data, spec, init, val_set, val_loader, fingerprint)
    set_seed(config.seed)
    model = build_segmenter(spec.encoder, encoder_weights=init, in_channels=data.info.channels,
                            decoder_channels=spec.decoder_channels)
    plan = CheckpointPlan(path=checkpoint, meta=recipe.meta, overwrite=retrain, resume=resume)
    return fit_recipe(model, recipe, train_loader, config, plan)


def train_classifier(data: LoadedDataset, checkpoint: str | Path, spec: ClassifierSpec = ClassifierSpec(),
                     config: TrainConfig | None = None, num_workers: int = 0, retrain: bool = False) -> TrainedModel:
    """Train (or load) a classifier (``spec``); best epoch by validation macro AUROC or loss.

    Model selection follows ``config`` (:class:`~segx_helpers.models.training.TrainConfig`: ``monitor``,
    ``min_epochs``, ``selection_window``, ``patience``); ``monitor="auto"`` (the run modes' :func:`classifier_config`)
    selects on the validation loss when a validation class has fewer than :data:`SMALL_VALIDATION_CLASS` images,
    else on the AUROC, and a small class is warned about by name (:func:`classifier_selection`). The decision
    cut-offs chosen on validation and what initialised the model (``meta["init"]``: ``"random"``,
    ``"imagenet"``, ``"file:<sha256>"``) are stored in the checkpoint. A checkpoint is reused only when its
    fingerprint matches, the initialisation actually obtained included (so ``weights="if-online"`` offline and
    online are different models).
    """
    checkpoint = Path(checkpoint)
    config = classifier_selection(config or TrainConfig(lr=1e-3, monitor="val_auroc"), data)
    spec = spec.resolved(data)
    init = resolve_weights(spec.weights, spec.arch)
    fingerprint = classifier_fingerprint(data, spec, config, init)
    resume = checkpoint.exists() and not retrain and _interrupted_run(checkpoint, "classifier", fingerprint)
    if checkpoint.exists() and not retrain and not resume:
        return load_trained(checkpoint, "classifier", fingerprint, _retrain_hint(checkpoint))
    train_set, val_set = _datasets(data, spec.image_size, spec.normalization, spec.augmentation)
    train_loader = make_loader(train_set, spec.batch_size, shuffle=True, seed=config.seed, num_workers=num_workers)
    val_loader = make_loader(val_set, 64, shuffle=False)
    weights = balanced_class_weights(train_set.targets, data.info.task) if spec.class_weighting else None
    set_seed(config.seed)
    model = build_classifier(spec.arch, num_classes=data.info.num_classes, in_channels=data.info.channels,
                             weights=init)
    recipe = classifier_recipe(data, spec, init, val_loader, fingerprint, weights)
    plan = CheckpointPlan(path=checkpoint, meta=recipe.meta, overwrite=retrain, resume=resume)
    return fit_recipe(model, recipe, train_loader, config, plan)


def evaluate_segmenter(trained: TrainedModel, data: LoadedDataset, split: str = "test",
                       image_size: int | None = None) -> dict:
    """Predicted masks on a split and per-image Dice / IoU against the true masks, at ``image_size``
    (default: the segmenter's own; predictions are resized bilinearly before thresholding).

    Returns ``image`` ``(N, C, H, W)``, ``true`` / ``pred`` bool ``(N, H, W)``, ``prob`` ``(N, H, W)``,
    ``dice`` / ``iou`` ``(N,)``, ``image_id``; images without a true mask are dropped.
    """
    size = image_size or trained.meta["image_size"]
    tensors = split_tensors(data, split, {**trained.meta, "image_size": size})
    keep = np.flatnonzero(tensors["has_mask"])
    prob = mask_probabilities(trained, data, split, size)[keep]
    true = tensors["mask"][keep, 0].numpy() > 0.5
    pred = prob >= trained.meta["threshold"]
    return {"image": tensors["image"][keep], "true": true, "prob": prob, "pred": pred, "dice": dice_score(true, pred),
            "iou": iou_score(true, pred), "image_id": [tensors["image_id"][i] for i in keep]}


def evaluate_classifier(trained: TrainedModel, data: LoadedDataset, split: str = "test", n_resamples: int = 1000,
                        seed: int = 0) -> dict:
    """Probabilities, decisions and the metric tables (with bootstrap CIs) on a split."""
    meta = trained.meta
    norm = Normalization(**{k: tuple(v) for k, v in meta["normalization"].items()})
    loader = make_loader(SegXDataset(data, split, meta["image_size"], norm), 64, shuffle=False)
    result = predict_classifier(trained.model, loader, meta["task"])
    summary, per_class = classification_report(result["targets"], result["probs"], meta["task"], meta["class_names"],
                                               thresholds=meta.get("thresholds"), n_resamples=n_resamples, seed=seed)
    result["pred"] = predict_labels(result["probs"], meta["task"], meta.get("thresholds"))
    result["summary"], result["per_class"] = summary, per_class
    return result


def segmenter_config(settings: RunSettings, seed: int = 0) -> TrainConfig:
    """The segmenter's training configuration for a run mode (shared by notebook 02 and ``prepare_models``)."""
    return TrainConfig(epochs=settings.seg_epochs, lr=3e-3, monitor="val_dice", seed=seed,
                       max_batches_per_epoch=settings.max_batches_per_epoch, cpu_bf16=settings.cpu_bf16,
                       cpu_fast_kernels=settings.cpu_fast_kernels)


def classifier_config(settings: RunSettings, seed: int = 0) -> TrainConfig:
    """The classifier's training configuration for a run mode in the ``"tutorial"`` recipe (shared by notebook 03
    and ``prepare_models``).

    Model selection: ``monitor="auto"`` (validation AUROC, or validation loss when a validation class is
    small: :func:`classifier_selection`), and no epoch in the first third of the run is kept
    (``min_epochs = epochs // 3``: 5 of 15 in full mode, none in quick mode's 3)."""
    return TrainConfig(epochs=settings.cls_epochs, lr=1e-3, monitor="auto", seed=seed,
                       min_epochs=settings.cls_epochs // 3, max_batches_per_epoch=settings.max_batches_per_epoch,
                       cpu_bf16=settings.cpu_bf16, cpu_fast_kernels=settings.cpu_fast_kernels)


@dataclass(frozen=True)
class ClassifierTraining:
    """A classifier recipe as notebook 03 shows it: what is trained (``spec``) and how (``config``)."""

    recipe: str
    spec: ClassifierSpec
    config: TrainConfig

    def with_choices(self, arch: str | None = None, weights: str | None = None, class_weighting: bool | None = None,
                     label_smoothing: float | None = None, epochs: int | None = None) -> "ClassifierTraining":
        """The recipe with the choices that are not ``None`` replaced (notebook 03's parameters)."""
        spec_changes = {k: v for k, v in (("arch", arch), ("weights", weights), ("class_weighting", class_weighting),
                                          ("label_smoothing", label_smoothing)) if v is not None}
        config = self.config if epochs is None else dataclasses.replace(
            self.config, epochs=epochs, min_epochs=min(self.config.min_epochs, epochs),
            warmup_epochs=min(self.config.warmup_epochs, max(epochs - 1, 0)))
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, **spec_changes), config=config)

    def table(self) -> pd.DataFrame:
        """Every choice of the recipe, one row each (setting, value)."""
        spec, config = self.spec, self.config
        augmentation = spec.augmentation.describe() if spec.augmentation is not None else "the dataset's own"
        rows = [
            ("recipe", self.recipe),
            ("architecture", spec.arch),
            ("starts from", spec.weights or "random"),
            ("image size", spec.image_size),
            ("class weighting", spec.class_weighting),
            ("label smoothing", spec.label_smoothing),
            ("augmentation", augmentation),
            ("batch size", spec.batch_size),
            ("optimiser", f"AdamW, lr {config.lr:g}, weight decay {config.weight_decay:g}"),
            (
                "schedule",
                f"{config.warmup_epochs} warm-up epochs, then cosine" if config.warmup_epochs else "cosine",
            ),
            ("epochs", config.epochs),
            ("model selection", config.selection_rule()),
            ("decision", "cut-offs chosen on validation (balanced accuracy; Youden's J for two classes)"),
        ]
        return pd.DataFrame(rows, columns=["setting", "value"]).astype({"value": str})


CLASSIFIER_RECIPES = ("tutorial", "real-data")


def classifier_weights(request, segmenter: str | Path):
    """Notebook 03's ``WEIGHTS`` as :func:`~segx_helpers.models.networks.build_classifier` takes it: ``"segmenter"``
    becomes the path of notebook 02's segmenter checkpoint ``segmenter`` (its U-Net encoder has the classifier's
    ResNet backbone; ``load_matching`` takes the tensors whose names and shapes match, the head stays new);
    anything else passes through unchanged. ``"segmenter"`` without that checkpoint is a ``FileNotFoundError``
    naming it and notebook 02."""
    if not (isinstance(request, str) and request == "segmenter"):
        return request
    if not Path(segmenter).is_file():
        raise FileNotFoundError(f"WEIGHTS = 'segmenter' starts the classifier from notebook 02's segmenter, but "
                                f"{segmenter} does not exist: run notebook 02 first, or choose other WEIGHTS")
    return str(segmenter)


def classifier_training(settings: RunSettings, recipe: str, data: LoadedDataset, seed: int = 0) -> ClassifierTraining:
    """The classifier recipe ``recipe`` for a run mode on ``data``.

    ``"tutorial"``: the synthetic set's recipe (ResNet-18 from random weights, plain cross-entropy, the dataset's
    augmentation, :func:`classifier_config`). ``"real-data"``: a recipe for small, imbalanced real datasets, the
    measured starting point of docs/real-data.md: EfficientNet-Lite0 from ImageNet weights (offline from the
    ``offline-imagenet`` extra), class-weighted cross-entropy with label smoothing 0.1, random resized crops,
    flips, 90-degree rotations and mild colour jitter for dermoscopy (the dataset's own augmentation otherwise),
    AdamW with weight decay 0.05, a 3-epoch warm-up then cosine, and the epoch chosen by the validation score
    averaged over 3 epochs, from the first third of the run on. Both decide with cut-offs chosen on validation."""
    if recipe not in CLASSIFIER_RECIPES:
        raise ValueError(f"recipe must be one of {CLASSIFIER_RECIPES}, got {recipe!r}")
    config = classifier_config(settings, seed)
    if recipe == "tutorial":
        return ClassifierTraining(recipe, ClassifierSpec(image_size=settings.image_size), config)
    dermoscopy = default_augmentation(data.info.modality) == default_augmentation("dermoscopy")
    spec = ClassifierSpec(arch="efficientnet_lite0", image_size=settings.image_size, weights="imagenet",
                          class_weighting=True, label_smoothing=0.1,
                          augmentation=REAL_DERMOSCOPY if dermoscopy and data.info.augmentation is None else None)
    long_enough = config.epochs >= 9
    config = dataclasses.replace(config, weight_decay=0.05, warmup_epochs=3 if long_enough else 0,
                                 selection_window=3 if long_enough else 1)
    return ClassifierTraining(recipe, spec, config)


def generator_description(generator: dict) -> str:
    """The parameters of a generated dataset (``dataset.json``'s ``generator``) a later notebook depends on, as
    one phrase: images and their size, seed, the shortcut's correlation in train/val and test, and the artefact
    style of a set that has one (synthetic-derm's ``shortcut_artefact``)."""
    style = generator.get("artefact_style") if generator.get("shortcut_artefact") else None
    return (f"{generator.get('n_images')} images at {generator.get('image_size')} px, seed {generator.get('seed')}, "
            f"shortcut correlation {generator.get('shortcut_correlation')} in train/val and "
            f"{generator.get('test_shortcut_correlation')} in test" + (f", artefact {style!r}" if style else ""))


def prepare_dataset(name: str, paths: TutorialPaths, settings: RunSettings, prepare_missing: bool = False,
                    seed: int = 0) -> LoadedDataset:
    """Load ``data/<name>``, checking that every image and mask can be read (a corrupt file is a
    :class:`~segx_helpers.data.format.DatasetFormatError` naming it, before any training); when it is missing,
    generate it (synthetic sets, ``prepare_missing``) with notebook 01's default parameters, or say which notebook or
    command makes it. Prints which of the two happened and the generated dataset's parameters (those notebook 01
    chose are kept in its ``dataset.json`` and reused as they are), and notes an image size other than this run
    mode's."""
    root = paths.dataset(name)
    if not root.exists() and prepare_missing and name in GENERATORS:
        print(f"preparing the dataset (notebook 01's step): {name} is not under ROOT, so it is generated here with "
              "notebook 01's default parameters (below). To use other ones, run notebook 01 with them first on the "
              "same ROOT (on Colab: GOOGLE_DRIVE = True in both).", flush=True)
        ensure_synthetic(name, root, SyntheticConfig(n_images=settings.n_images, image_size=settings.image_size, seed=seed))
    made_by = ("01_dataset_prep" if name in GENERATORS else
               f"python -m segx_helpers.cli.download {name} --data-dir {paths.root / 'data'} (see its -h)")
    data = load_dataset(require(root, made_by), check_files=True)
    generator = data.info.generator or {}
    if generator and name in GENERATORS:
        print(f"dataset: {name} as generated under ROOT ({generator_description(generator)})")
        if generator.get("image_size") not in (None, settings.image_size):
            print(f"note: its images are {generator['image_size']} px and this run mode uses {settings.image_size} px: "
                  "they are resized (run notebook 01 in this mode to generate them at that size)")
    return data


def describe_training(settings: RunSettings, kind: str) -> str:
    """How a run mode trains the ``"segmenter"`` or the ``"classifier"``, as one phrase for what a notebook
    prints (mode, epochs, the cap on batches per epoch, image size)."""
    epochs, size = ((settings.seg_epochs, settings.seg_image_size) if kind == "segmenter"
                    else (settings.cls_epochs, settings.image_size))
    cap = f" of at most {settings.max_batches_per_epoch} batches" if settings.max_batches_per_epoch else ""
    return f"{settings.name} mode: {epochs} epochs{cap} at {size} px"


def prepare_models(name: str, paths: TutorialPaths, data: LoadedDataset, settings: RunSettings,
                   prepare_missing: bool = False, seed: int = 0) -> tuple[TrainedModel, TrainedModel]:
    """Load the segmenter and classifier of notebooks 02 and 03; train them here in the given mode
    when they are missing and ``prepare_missing`` is set, else say which notebook to run.

    An existing checkpoint must have been trained on this dataset (name, class names, task,
    channels, training ids) at this mode's image size, epochs and ``max_batches_per_epoch``, else
    :class:`CheckpointError` (a full run never silently reuses a quick model). Architecture and
    learning-rate choices made in notebooks 02 and 03 are not checked here."""
    device = pick_device()
    if not paths.segmenter(name).exists() and prepare_missing:
        print(f"preparing the segmenter (notebook 02's step, {describe_training(settings, 'segmenter')}, on {device}): "
              f"{paths.segmenter(name)} is missing ...", flush=True)
        train_segmenter(data, paths.segmenter(name), SegmenterSpec(image_size=settings.seg_image_size),
                        config=segmenter_config(settings, seed))
    if not paths.classifier(name).exists() and prepare_missing:
        training = classifier_training(settings, "real-data" if settings.real_data else "tutorial", data, seed)
        print(f"preparing the classifier (notebook 03's step with its defaults, {describe_training(settings, 'classifier')}"
              f", on {device}): {paths.classifier(name)} is missing ...", flush=True)
        train_classifier(data, paths.classifier(name), training.spec, training.config)
    loaded = []
    for kind, path, image_size, config, notebook in (
            ("segmenter", paths.segmenter(name), settings.seg_image_size, segmenter_config(settings, seed),
             "02_train_segmenter"),
            ("classifier", paths.classifier(name), settings.image_size, classifier_config(settings, seed),
             "03_train_classifier")):
        expected = {k: v for k, v in training_fingerprint(data, image_size, config).items() if k in _DATA_AND_MODE}
        loaded.append(load_trained(require(path, notebook), kind, expected, _retrain_hint(path, notebook)))
    return loaded[0], loaded[1]
