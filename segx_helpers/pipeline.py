"""Recipes the notebooks call: train or load the segmenter and the classifier, and evaluate them.

Each ``train_*`` function skips training when its checkpoint already exists (re-running a
notebook is cheap and never clobbers a model) unless ``retrain=True``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from .data.format import LoadedDataset
from .data.torch_dataset import Normalization, SegXDataset
from .metrics import (classification_report, dice_score, iou_score, macro_auroc, predict_labels, select_mask_threshold,
                      select_thresholds)
from .models import build_classifier, build_segmenter
from .notebook import TutorialPaths, require
from .training import (DiceBCELoss, TrainConfig, balanced_class_weights, classification_loss, fit,
                       load_checkpoint, make_loader, predict_classifier, predict_masks, save_checkpoint, set_seed)


@dataclass
class TrainedModel:
    """A model ready to use, its checkpoint metadata and (when it was just trained) its history."""

    model: nn.Module
    meta: dict
    history: pd.DataFrame


def load_trained(checkpoint: str | Path, kind: str) -> TrainedModel:
    """Load a checkpoint written by ``train_segmenter`` / ``train_classifier`` (``kind`` "segmenter" or "classifier")."""
    model, meta = load_checkpoint(checkpoint, expected_kind=kind)
    return TrainedModel(model, meta, pd.DataFrame(meta.get("history", [])))


def _datasets(data: LoadedDataset, image_size: int, augment: bool = True):
    norm = Normalization.for_channels(data.info.channels)
    return (SegXDataset(data, "train", image_size, norm, train=augment), SegXDataset(data, "val", image_size, norm),
            norm)


def train_segmenter(data: LoadedDataset, checkpoint: str | Path, image_size: int = 128, encoder: str = "resnet18",
                    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8), encoder_weights: str | None = None,
                    config: TrainConfig | None = None, batch_size: int = 32, num_workers: int = 0,
                    retrain: bool = False) -> TrainedModel:
    """Train (or load) a U-Net on the dataset's masks; Dice + BCE loss, best epoch by validation Dice.

    The binarisation threshold is then chosen on the validation split and stored in the checkpoint.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.exists() and not retrain:
        return load_trained(checkpoint, "segmenter")
    if image_size % 32:
        raise ValueError(f"image_size must be divisible by 32 for a U-Net, got {image_size}")
    if data.table["mask_path"].isna().all():
        raise ValueError(f"{data.root} has no masks: a segmenter cannot be trained on it.")
    config = config or TrainConfig(lr=3e-3, monitor="val_dice")
    train_set, val_set, norm = _datasets(data, image_size)
    train_loader = make_loader(train_set, batch_size, shuffle=True, seed=config.seed, num_workers=num_workers)
    val_loader = make_loader(val_set, 64, shuffle=False)
    val_masks = val_set.tensors()["mask"][:, 0].numpy() > 0.5

    def validate(model: nn.Module) -> dict:
        return {"val_dice": float(dice_score(val_masks, predict_masks(model, val_loader) >= 0.5).mean())}

    set_seed(config.seed)
    model = build_segmenter(encoder, encoder_weights=encoder_weights, in_channels=data.info.channels,
                            decoder_channels=decoder_channels)
    meta = {"kind": "segmenter", "arch": "Unet", "encoder": encoder, "decoder_channels": list(decoder_channels),
            "in_channels": data.info.channels, "image_size": image_size, "normalization": asdict(norm),
            "dataset": data.info.name, "mask_description": data.info.mask_description, "threshold": 0.5}
    history = fit(model, DiceBCELoss(), train_loader, validate, config, target_key="mask", checkpoint_path=checkpoint,
                  meta=meta, overwrite=retrain)
    val_prob = predict_masks(model, val_loader)
    meta["threshold"] = select_mask_threshold(val_masks, val_prob)
    meta["metrics"] = {"val_dice": float(dice_score(val_masks, val_prob >= meta["threshold"]).mean())}
    meta["history"] = history.records
    meta["train_config"] = asdict(config)
    save_checkpoint(checkpoint, model, meta, overwrite=True)
    return TrainedModel(model, meta, history.frame())


def train_classifier(data: LoadedDataset, checkpoint: str | Path, image_size: int = 128, arch: str = "resnet18",
                     pretrained: bool = False, class_weighting: bool = False, config: TrainConfig | None = None,
                     batch_size: int = 32, num_workers: int = 0, retrain: bool = False) -> TrainedModel:
    """Train (or load) a torchvision classifier; best epoch by validation macro AUROC.

    Multilabel decision thresholds (per class, maximising F1 on validation, as the reference code
    does) are stored in the checkpoint; multiclass decisions are the argmax.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.exists() and not retrain:
        return load_trained(checkpoint, "classifier")
    config = config or TrainConfig(lr=1e-3, monitor="val_auroc")
    task = data.info.task
    train_set, val_set, norm = _datasets(data, image_size)
    train_loader = make_loader(train_set, batch_size, shuffle=True, seed=config.seed, num_workers=num_workers)
    val_loader = make_loader(val_set, 64, shuffle=False)
    weights = balanced_class_weights(train_set.targets, task) if class_weighting else None

    def validate(model: nn.Module) -> dict:
        result = predict_classifier(model, val_loader, task)
        return {"val_auroc": macro_auroc(result["targets"], result["probs"])}

    set_seed(config.seed)
    model = build_classifier(arch, num_classes=data.info.num_classes, in_channels=data.info.channels, pretrained=pretrained)
    meta = {"kind": "classifier", "arch": arch, "task": task, "class_names": data.info.class_names,
            "in_channels": data.info.channels, "image_size": image_size, "normalization": asdict(norm),
            "dataset": data.info.name, "pretrained": pretrained, "thresholds": None}
    history = fit(model, classification_loss(task, weights), train_loader, validate, config, checkpoint_path=checkpoint,
                  meta=meta, overwrite=retrain)
    val = predict_classifier(model, val_loader, task)
    if task == "multilabel":
        meta["thresholds"] = select_thresholds(val["targets"], val["probs"]).tolist()
    meta["metrics"] = {"val_auroc": macro_auroc(val["targets"], val["probs"])}
    meta["history"] = history.records
    meta["train_config"] = asdict(config)
    save_checkpoint(checkpoint, model, meta, overwrite=True)
    return TrainedModel(model, meta, history.frame())


def split_tensors(data: LoadedDataset, split: str, meta: dict) -> dict:
    """One split as tensors prepared the way a checkpoint expects (its image size and normalisation)."""
    norm = Normalization(**{k: tuple(v) for k, v in meta["normalization"].items()})
    return SegXDataset(data, split, meta["image_size"], norm).tensors()


def evaluate_segmenter(trained: TrainedModel, data: LoadedDataset, split: str = "test") -> dict:
    """Predicted masks on a split and per-image Dice / IoU against the true masks.

    Returns ``image`` ``(N, C, H, W)``, ``true`` / ``pred`` bool ``(N, H, W)``, ``prob`` ``(N, H, W)``,
    ``dice`` / ``iou`` ``(N,)``, ``image_id``; images without a true mask are dropped.
    """
    tensors = split_tensors(data, split, trained.meta)
    keep = np.flatnonzero(tensors["has_mask"])
    images = tensors["image"][keep]
    prob = predict_masks(trained.model, images)
    true = tensors["mask"][keep, 0].numpy() > 0.5
    pred = prob >= trained.meta["threshold"]
    return {"image": images, "true": true, "prob": prob, "pred": pred, "dice": dice_score(true, pred),
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


def shortcut_breakdown(result: dict, artefacts: pd.DataFrame, shortcut: dict[str, str], class_names: list[str]) -> pd.DataFrame:
    """Accuracy where the spurious artefact agrees vs disagrees with the label, per shortcut class.

    ``shortcut`` maps a class name to the artefact column correlated with it (e.g.
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


@dataclass(frozen=True)
class RunSettings:
    """How much work each notebook does. ``QUICK`` is what CI and ``make tutorial`` run on 2 CPU cores;
    ``FULL`` is for a real run (a GPU or patience)."""

    n_images: int
    image_size: int
    seg_epochs: int
    cls_epochs: int
    max_batches_per_epoch: int | None
    shap_images: int
    shap_nsamples: int
    shap_background: int
    bootstrap: int


QUICK = RunSettings(n_images=1000, image_size=128, seg_epochs=3, cls_epochs=3, max_batches_per_epoch=12,
                    shap_images=48, shap_nsamples=16, shap_background=16, bootstrap=200)
FULL = RunSettings(n_images=1000, image_size=128, seg_epochs=15, cls_epochs=15, max_batches_per_epoch=None,
                   shap_images=200, shap_nsamples=50, shap_background=50, bootstrap=1000)


def run_settings(quick: bool) -> RunSettings:
    """``QUICK`` or ``FULL``."""
    return QUICK if quick else FULL


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
    when they are missing and ``prepare_missing`` is set, else say which notebook to run."""
    if not paths.segmenter(name).exists() and prepare_missing:
        train_segmenter(data, paths.segmenter(name), image_size=settings.image_size, config=segmenter_config(settings, seed))
    if not paths.classifier(name).exists() and prepare_missing:
        train_classifier(data, paths.classifier(name), image_size=settings.image_size,
                         config=classifier_config(settings, seed))
    return (load_trained(require(paths.segmenter(name), "02_train_segmenter"), "segmenter"),
            load_trained(require(paths.classifier(name), "03_train_classifier"), "classifier"))
