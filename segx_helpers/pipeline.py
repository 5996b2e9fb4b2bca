"""Recipes the notebooks call: train or load the segmenter and the classifier, and evaluate them.

Each ``train_*`` function skips training when its checkpoint already exists (re-running a
notebook is cheap and never clobbers a model) unless ``retrain=True``. A checkpoint is reused only
if it was trained on the same thing: every checkpoint stores a *fingerprint* (dataset name, class
names in order, task, image size, channels, a hash of the training split's ids, the model choices
and the training settings such as epochs and ``max_batches_per_epoch``), and a mismatch is a
:class:`~segx_helpers.training.CheckpointError` naming each differing field and how to retrain.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data.format import LoadedDataset
from .data.torch_dataset import Normalization, SegXDataset
from .metrics import (classification_report, dice_score, iou_score, macro_auroc, predict_labels, select_mask_threshold, select_thresholds)
from .models import build_classifier, build_segmenter
from .notebook import TutorialPaths, require
from .training import (CheckpointError, DiceBCELoss, TrainConfig, balanced_class_weights, classification_loss, fit,
                       load_checkpoint, make_loader, predict_classifier, predict_masks, save_checkpoint, set_seed)


@dataclass
class TrainedModel:
    """A model ready to use, its checkpoint metadata and (when it was just trained) its history."""

    model: nn.Module
    meta: dict
    history: pd.DataFrame


def load_trained(checkpoint: str | Path, kind: str, expected: dict | None = None, how_to_retrain: str = "") -> TrainedModel:
    """Load a checkpoint written by ``train_segmenter`` / ``train_classifier`` (``kind`` "segmenter" or "classifier").

    With ``expected`` (a fingerprint, or some of its fields) the checkpoint must have been trained
    on exactly that, and to the end, else :class:`CheckpointError` names every differing field and
    ends with ``how_to_retrain``.
    """
    model, meta = load_checkpoint(checkpoint, expected_kind=kind)
    if expected is not None:
        _check_fingerprint(Path(checkpoint), meta, expected, how_to_retrain)
    return TrainedModel(model, meta, pd.DataFrame(meta.get("history", [])))


def training_fingerprint(data: LoadedDataset, image_size: int, config: TrainConfig, **choices) -> dict:
    """What a model is trained on, as stored in its checkpoint (``meta["fingerprint"]``): dataset name,
    class names in order, task, image size, channels, SHA-256 of the sorted training ids, the training
    settings (epochs, max_batches_per_epoch, lr, weight decay, patience, monitor, seed) and ``choices``
    (architecture, weights, batch size, normalisation)."""
    train_ids = sorted(str(i) for i in data.split("train")["image_id"])
    settings = {k: v for k, v in asdict(config).items() if k not in ("device", "amp")}
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


_DATA_AND_MODE = ("dataset", "class_names", "task", "image_size", "channels", "train_ids_sha256", "epochs",
                  "max_batches_per_epoch")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_fingerprint(path: Path, meta: dict, expected: dict, how_to_retrain: str) -> None:
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
    if meta.get("finished") is False:
        raise CheckpointError(f"{path} holds an unfinished training run (interrupted?). {how_to_retrain}")


def _retrain_hint(path: Path, notebook: str | None = None) -> str:
    where = f"run notebook {notebook} again with RETRAIN = True" if notebook else "pass retrain=True (RETRAIN = True in the notebook)"
    return f"To train again, {where} to replace it, or delete or rename {path} (keep it to reuse it with its own settings)."


def _check_monitor(config: TrainConfig, key: str) -> None:
    if config.monitor != key:
        raise ValueError(f"config.monitor is {config.monitor!r}, but this model is validated with {key!r}: "
                         f"use TrainConfig(monitor={key!r}, ...).")


def _with_weights_if_online(build, requested, pretrained_value, scratch_value):
    """Build a model; ``requested="if-online"`` tries pretrained weights and falls back to random
    initialisation, saying so, when they cannot be downloaded. Returns ``(model, weights used)``."""
    from .models import WeightsUnavailableError

    if requested != "if-online":
        return build(requested), requested
    try:
        return build(pretrained_value), pretrained_value
    except WeightsUnavailableError as err:
        print(f"Pretrained weights unavailable, training from scratch instead: {err}")
        return build(scratch_value), scratch_value


def _datasets(data: LoadedDataset, image_size: int, normalization: Normalization | None = None):
    norm = normalization or Normalization.for_channels(data.info.channels)
    return (SegXDataset(data, "train", image_size, norm, train=True), SegXDataset(data, "val", image_size, norm),
            norm)


def train_segmenter(data: LoadedDataset, checkpoint: str | Path, image_size: int = 128, encoder: str = "resnet18",
                    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8), encoder_weights: str | None = None,
                    config: TrainConfig | None = None, batch_size: int = 32, num_workers: int = 0,
                    normalization: Normalization | None = None, retrain: bool = False) -> TrainedModel:
    """Train (or load) a U-Net on the dataset's masks; Dice + BCE loss, best epoch by validation Dice.

    The binarisation threshold is then chosen on the validation split and stored in the checkpoint.
    ``normalization`` defaults to ImageNet statistics (their channel mean for grayscale).
    ``encoder_weights``: None (random, the default), "imagenet", or "if-online" (ImageNet when they
    can be downloaded, else random with a message).
    """
    checkpoint = Path(checkpoint)
    config = config or TrainConfig(lr=3e-3, monitor="val_dice")
    _check_monitor(config, "val_dice")
    norm = normalization or Normalization.for_channels(data.info.channels)
    fingerprint = training_fingerprint(data, image_size, config, kind="segmenter", encoder=encoder,
                                       decoder_channels=list(decoder_channels), encoder_weights=encoder_weights,
                                       batch_size=batch_size, normalization=asdict(norm))
    if checkpoint.exists() and not retrain:
        return load_trained(checkpoint, "segmenter", fingerprint, _retrain_hint(checkpoint))
    if image_size % 32:
        raise ValueError(f"image_size must be divisible by 32 for a U-Net, got {image_size}")
    if data.table["mask_path"].isna().all():
        raise ValueError(f"{data.root} has no masks: a segmenter cannot be trained on it.")
    train_set, val_set, norm = _datasets(data, image_size, norm)
    train_loader = make_loader(train_set, batch_size, shuffle=True, seed=config.seed, num_workers=num_workers)
    val_loader = make_loader(val_set, 64, shuffle=False)
    val_masks = val_set.tensors()["mask"][:, 0].numpy() > 0.5

    def validate(model: nn.Module) -> dict:
        return {"val_dice": float(dice_score(val_masks, predict_masks(model, val_loader) >= 0.5).mean())}

    set_seed(config.seed)
    model, encoder_weights = _with_weights_if_online(
        lambda weights: build_segmenter(encoder, encoder_weights=weights, in_channels=data.info.channels,
                                        decoder_channels=decoder_channels),
        encoder_weights, "imagenet", None)
    meta = {"kind": "segmenter", "arch": "Unet", "encoder": encoder, "decoder_channels": list(decoder_channels),
            "in_channels": data.info.channels, "image_size": image_size, "normalization": asdict(norm),
            "dataset": data.info.name, "mask_description": data.info.mask_description, "threshold": 0.5,
            "fingerprint": fingerprint, "finished": False}
    history = fit(model, DiceBCELoss(), train_loader, validate, config, target_key="mask", checkpoint_path=checkpoint,
                  meta=meta, overwrite=retrain)
    val_prob = predict_masks(model, val_loader)
    meta["threshold"] = select_mask_threshold(val_masks, val_prob)
    meta["metrics"] = {"val_dice": float(dice_score(val_masks, val_prob >= meta["threshold"]).mean())}
    meta["history"] = history.records
    meta["train_config"] = asdict(config)
    meta["finished"] = True
    save_checkpoint(checkpoint, model, meta, overwrite=True)
    return TrainedModel(model, meta, history.frame())


def train_classifier(data: LoadedDataset, checkpoint: str | Path, image_size: int = 128, arch: str = "resnet18",
                     pretrained: bool | str = False, class_weighting: bool = False, config: TrainConfig | None = None,
                     batch_size: int = 32, num_workers: int = 0, normalization: Normalization | None = None,
                     retrain: bool = False) -> TrainedModel:
    """Train (or load) a torchvision classifier; best epoch by validation macro AUROC.

    Multilabel decision thresholds (per class, maximising F1 on validation, as the reference code
    does) are stored in the checkpoint; multiclass decisions are the argmax. ``pretrained``: False
    (default), True, or "if-online" (ImageNet weights when they can be downloaded, else random).
    """
    checkpoint = Path(checkpoint)
    config = config or TrainConfig(lr=1e-3, monitor="val_auroc")
    _check_monitor(config, "val_auroc")
    norm = normalization or Normalization.for_channels(data.info.channels)
    fingerprint = training_fingerprint(data, image_size, config, kind="classifier", arch=arch, pretrained=pretrained,
                                       class_weighting=class_weighting, batch_size=batch_size,
                                       normalization=asdict(norm))
    if checkpoint.exists() and not retrain:
        return load_trained(checkpoint, "classifier", fingerprint, _retrain_hint(checkpoint))
    task = data.info.task
    train_set, val_set, norm = _datasets(data, image_size, norm)
    train_loader = make_loader(train_set, batch_size, shuffle=True, seed=config.seed, num_workers=num_workers)
    val_loader = make_loader(val_set, 64, shuffle=False)
    weights = balanced_class_weights(train_set.targets, task) if class_weighting else None

    def validate(model: nn.Module) -> dict:
        result = predict_classifier(model, val_loader, task)
        return {"val_auroc": macro_auroc(result["targets"], result["probs"])}

    set_seed(config.seed)
    model, pretrained = _with_weights_if_online(
        lambda weights: build_classifier(arch, num_classes=data.info.num_classes, in_channels=data.info.channels,
                                         pretrained=weights),
        pretrained, True, False)
    meta = {"kind": "classifier", "arch": arch, "task": task, "class_names": data.info.class_names,
            "in_channels": data.info.channels, "image_size": image_size, "normalization": asdict(norm),
            "dataset": data.info.name, "pretrained": pretrained, "thresholds": None, "fingerprint": fingerprint,
            "finished": False}
    history = fit(model, classification_loss(task, weights), train_loader, validate, config, checkpoint_path=checkpoint,
                  meta=meta, overwrite=retrain)
    val = predict_classifier(model, val_loader, task)
    if task == "multilabel":
        meta["thresholds"] = select_thresholds(val["targets"], val["probs"]).tolist()
    meta["metrics"] = {"val_auroc": macro_auroc(val["targets"], val["probs"])}
    meta["history"] = history.records
    meta["train_config"] = asdict(config)
    meta["finished"] = True
    save_checkpoint(checkpoint, model, meta, overwrite=True)
    return TrainedModel(model, meta, history.frame())


def split_tensors(data: LoadedDataset, split: str, meta: dict) -> dict:
    """One split as tensors prepared the way a checkpoint expects (its image size and normalisation)."""
    norm = Normalization(**{k: tuple(v) for k, v in meta["normalization"].items()})
    return SegXDataset(data, split, meta["image_size"], norm).tensors()


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


@dataclass(frozen=True)
class RunSettings:
    """How much work each notebook does. ``QUICK`` is what CI and ``make tutorial`` run on 2 CPU cores;
    ``FULL`` is for a real run (a GPU or patience).

    ``seg_image_size`` is the segmenter's input size: quick mode segments at half resolution (the
    clinical regions are large blobs) and upsamples the probabilities, which makes it 4x cheaper.
    """

    n_images: int
    image_size: int
    seg_image_size: int
    seg_epochs: int
    cls_epochs: int
    max_batches_per_epoch: int | None
    shap_images: int
    shap_nsamples: int
    shap_background: int
    bootstrap: int


QUICK = RunSettings(n_images=1000, image_size=128, seg_image_size=64, seg_epochs=3, cls_epochs=3, max_batches_per_epoch=12,
                    shap_images=48, shap_nsamples=16, shap_background=16, bootstrap=200)
FULL = RunSettings(n_images=1000, image_size=128, seg_image_size=128, seg_epochs=15, cls_epochs=15, max_batches_per_epoch=None,
                   shap_images=200, shap_nsamples=50, shap_background=50, bootstrap=1000)


def run_settings(quick: bool, real_data: bool | int = False) -> RunSettings:
    """``QUICK`` or ``FULL``; ``real_data=True`` switches to the paper's full image size (256 px) for
    classifier and segmenter, for datasets fetched by ``data_download.sh``. ``real_data`` may also be an
    image size in pixels (a multiple of 32, e.g. 128 for a CPU run, 64 for a test on a tiny copy), which
    every notebook then uses alike (``-p REAL_DATA=128`` with the runner)."""
    settings = QUICK if quick else FULL
    if real_data is None or real_data is False:
        return settings
    if real_data is True:
        size = 256
    elif isinstance(real_data, int) and real_data >= 32 and real_data % 32 == 0:
        size = real_data
    else:
        raise ValueError(f"REAL_DATA must be False, True (256 px) or an image size that is a multiple of 32, "
                         f"got {real_data!r}")
    return dataclasses.replace(settings, image_size=size, seg_image_size=size)


def segmenter_config(settings: RunSettings, seed: int = 0) -> TrainConfig:
    """The segmenter's training configuration for a run mode (shared by notebook 02 and ``prepare_models``)."""
    return TrainConfig(epochs=settings.seg_epochs, lr=3e-3, monitor="val_dice", seed=seed,
                       max_batches_per_epoch=settings.max_batches_per_epoch)


def classifier_config(settings: RunSettings, seed: int = 0) -> TrainConfig:
    """The classifier's training configuration for a run mode (shared by notebook 03 and ``prepare_models``)."""
    return TrainConfig(epochs=settings.cls_epochs, lr=1e-3, monitor="val_auroc", seed=seed,
                       max_batches_per_epoch=settings.max_batches_per_epoch)


def prepare_dataset(name: str, paths: TutorialPaths, settings: RunSettings, prepare_missing: bool = False,
                    seed: int = 0) -> LoadedDataset:
    """Load ``data/<name>``; when it is missing, generate it (synthetic sets, ``prepare_missing``) or
    say which notebook or script makes it."""
    from .data.format import load_dataset
    from .data.synthetic import GENERATORS, SyntheticConfig, ensure_synthetic

    root = paths.dataset(name)
    if not root.exists() and prepare_missing and name in GENERATORS:
        ensure_synthetic(name, root, SyntheticConfig(n_images=settings.n_images, image_size=settings.image_size, seed=seed))
    made_by = "01_dataset_prep" if name in GENERATORS else f"data_download.sh {name}"
    return load_dataset(require(root, made_by), check_files=False)


def prepare_models(name: str, paths: TutorialPaths, data: LoadedDataset, settings: RunSettings,
                   prepare_missing: bool = False, seed: int = 0) -> tuple[TrainedModel, TrainedModel]:
    """Load the segmenter and classifier of notebooks 02 and 03; train them here in the given mode
    when they are missing and ``prepare_missing`` is set, else say which notebook to run.

    An existing checkpoint must have been trained on this dataset (name, class names, task,
    channels, training ids) at this mode's image size, epochs and ``max_batches_per_epoch``, else
    :class:`CheckpointError` (a full run never silently reuses a quick model). Architecture and
    learning-rate choices made in notebooks 02 and 03 are not checked here."""
    if not paths.segmenter(name).exists() and prepare_missing:
        train_segmenter(data, paths.segmenter(name), image_size=settings.seg_image_size,
                        config=segmenter_config(settings, seed))
    if not paths.classifier(name).exists() and prepare_missing:
        train_classifier(data, paths.classifier(name), image_size=settings.image_size,
                         config=classifier_config(settings, seed))
    loaded = []
    for kind, path, image_size, config, notebook in (
            ("segmenter", paths.segmenter(name), settings.seg_image_size, segmenter_config(settings, seed),
             "02_train_segmenter"),
            ("classifier", paths.classifier(name), settings.image_size, classifier_config(settings, seed),
             "03_train_classifier")):
        expected = {k: v for k, v in training_fingerprint(data, image_size, config).items() if k in _DATA_AND_MODE}
        loaded.append(load_trained(require(path, notebook), kind, expected, _retrain_hint(path, notebook)))
    return loaded[0], loaded[1]


def mask_probabilities(source, data: LoadedDataset, split: str, image_size: int,
                       images: torch.Tensor | None = None) -> np.ndarray:
    """Clinical-interest probabilities ``(N, image_size, image_size)`` for one split, from any mask source.

    ``source`` may be a :class:`TrainedModel` segmenter or a path to its checkpoint (run with its own
    image size and normalisation, then resized), a folder of ``<id>.png`` masks (e.g. the dataset's
    ``masks/`` or masks made by another tool), or any callable ``images (N, C, H, W) -> (N, H, W)``
    (then ``images`` must be given, prepared as the classifier expects).
    """
    import torch.nn.functional as F

    from .data.format import read_mask

    if isinstance(source, (str, Path)) and Path(source).is_dir():
        ids = data.split(split)["image_id"]
        masks = []
        for image_id in ids:
            path = Path(source) / f"{image_id}.png"
            if not path.is_file():
                raise FileNotFoundError(f"No mask for {image_id!r} in {source} (expected {path})")
            masks.append(torch.from_numpy(read_mask(path).astype(np.float32))[None, None])
        return np.concatenate([F.interpolate(m, size=(image_size, image_size), mode="nearest")[:, 0].numpy()
                               for m in masks])
    if isinstance(source, (str, Path)):
        source = load_trained(source, "segmenter")
    if isinstance(source, TrainedModel):
        tensors = split_tensors(data, split, source.meta)
        prob = torch.from_numpy(predict_masks(source.model, tensors["image"]))[:, None]
        return F.interpolate(prob, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0].numpy()
    if callable(source):
        if images is None:
            raise ValueError("a callable mask source needs the images it should segment: pass images=")
        out = np.asarray(source(images), dtype=np.float32)
        if out.shape != (len(images), image_size, image_size):
            raise ValueError(f"the mask callable returned shape {out.shape}, expected {(len(images), image_size, image_size)}")
        return out
    raise TypeError(f"Unsupported mask source {type(source).__name__}: use a segmenter, checkpoint path, mask folder or callable")


def background_images(data: LoadedDataset, meta: dict, n: int, seed: int = 0, reference: bool = False) -> torch.Tensor:
    """``n`` images ``(n, C, H, W)`` prepared for the classifier: the Gradient SHAP background.

    Default: ``n`` training images drawn at random (seeded). ``reference=True``: the first ``n``
    validation images, as the reference code does."""
    norm = Normalization(**{k: tuple(v) for k, v in meta["normalization"].items()})
    source = SegXDataset(data, "val" if reference else "train", meta["image_size"], norm, cache=False)
    count = min(n, len(source))
    rows = np.arange(count) if reference else np.random.default_rng(seed).choice(len(source), size=count, replace=False)
    return torch.stack([source[int(i)]["image"] for i in rows])


def explained_subset(targets: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Positions of ``n`` images to explain with a slow method, drawn at random (seeded) and stratified
    by class, sorted. ``targets``: ``(N,)`` class indices or ``(N, C)`` 0/1 (stratified by the label set).
    Taking the *first* ``n`` would explain only one class on a folder whose files sort by class."""
    targets = np.asarray(targets)
    if n >= len(targets):
        return np.arange(len(targets))
    keys = targets if targets.ndim == 1 else np.unique(targets, axis=0, return_inverse=True)[1].ravel()
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(keys == k)) for k in np.unique(keys)]
    quota = {i: int(round(n * len(g) / len(targets))) for i, g in enumerate(groups)}
    chosen = np.concatenate([g[: quota[i]] for i, g in enumerate(groups)])
    rest = np.setdiff1d(np.arange(len(targets)), chosen)
    missing = n - len(chosen)
    if missing > 0:
        chosen = np.concatenate([chosen, rng.choice(rest, size=missing, replace=False)])
    return np.sort(chosen[:n])


def explain_predictions(classifier: TrainedModel, images: torch.Tensor, method: str,
                        subset: np.ndarray | None = None, **options):
    """:func:`segx_helpers.explain.explain` for a trained classifier: its predicted classes
    (argmax, or the per-class validation thresholds for multilabel) are the targets. ``subset``:
    positions of the images to explain (e.g. :func:`explained_subset`); the result's ``image_index``
    still refers to rows of ``images``."""
    from .explain import explain

    rows = np.arange(len(images)) if subset is None else np.asarray(subset, dtype=np.int64)
    e = explain(classifier.model, images[torch.as_tensor(rows)], None, method, task=classifier.meta["task"],
                thresholds=classifier.meta.get("thresholds"), **options)
    e.image_index = rows[e.image_index]
    return e


def segx_results(name: str, paths: TutorialPaths, data: LoadedDataset, segmenter: TrainedModel,
                 classifier: TrainedModel, settings: RunSettings, methods: Sequence[str] = ("gradcam", "gradient_shap"),
                 seed: int = 0, p: float = 5.0) -> dict:
    """Notebook 04's results in one call (for a fresh runtime that skipped it), with the same package
    calls as the notebook: explain the test split, score every prediction with the one analysis path
    (:func:`segx_helpers.results.explanation_results`), save each method's results folder and the test
    masks. Returns method -> :class:`~segx_helpers.results.Results`."""
    from .analysis import binarise_masks
    from .results import explanation_results, save_split_arrays

    test = split_tensors(data, "test", classifier.meta)
    images = Normalization(**classifier.meta["normalization"]).denormalize(test["image"])
    mask_prob = mask_probabilities(segmenter, data, "test", classifier.meta["image_size"])
    predicted = binarise_masks(mask_prob, segmenter.meta["threshold"])
    true_masks = test["mask"][:, 0].numpy() > 0.5
    targets = test["target"].numpy()
    out = {}
    for method in methods:
        if method == "gradient_shap":
            rows = explained_subset(targets, settings.shap_images, seed)
            e = explain_predictions(classifier, test["image"], method, subset=rows, nsamples=settings.shap_nsamples,
                                    background=background_images(data, classifier.meta, settings.shap_background, seed))
        else:
            e = explain_predictions(classifier, test["image"], method)
        out[method] = explanation_results(e, test["image_id"], targets, data.info.task, data.info.class_names,
                                          predicted, true_masks, test["has_mask"], p=p)
        out[method].save(paths.maps(name) / method, images, predicted, p=p)
    save_split_arrays(paths.maps(name) / "test_masks.npz", mask_prob=mask_prob, predicted_masks=predicted,
                      true_masks=true_masks, has_mask=np.asarray(test["has_mask"]), image_id=np.array(test["image_id"]))
    return out
