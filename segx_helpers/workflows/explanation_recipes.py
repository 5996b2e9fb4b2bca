"""Explaining a trained classifier's predictions, as the notebooks do: the Gradient SHAP background
sampler (:func:`background_images`), the seeded, class-stratified subset a slow method explains
(:func:`explained_subset`), :func:`explain_predictions` (the classifier's own decisions as targets),
and :func:`segx_results`, notebook 04's results in one call; :func:`segmenter_masks` and :func:`score_split` for
notebook 05's extra variants (another split, layer or method)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from segx_helpers.scores.analysis import AnalysisOptions, binarise_masks
from segx_helpers.models.checkpoints import TrainedModel, split_tensors
from segx_helpers.data.format import LoadedDataset
from segx_helpers.data.torch_dataset import Normalization, SegXDataset
from segx_helpers.explain.api import RunOptions, explain
from segx_helpers.explain.gradient_shap import GradientShapOptions
from segx_helpers.explain.targets import TargetChoice
from segx_helpers.models.masks import mask_probabilities
from segx_helpers.workflows.settings import RunSettings
from segx_helpers.workflows.results import SplitLabels, explanation_results, save_split_arrays


def background_images(data: LoadedDataset, meta: dict, n: int, seed: int = 0, as_reference_code: bool = False) -> torch.Tensor:
    """``n`` images ``(n, C, H, W)`` prepared for the classifier: the Gradient SHAP background.

    Default: ``n`` training images drawn at random (seeded). ``as_reference_code=True``: the first ``n``
    validation images, as the reference code does."""
    norm = Normalization(**{k: tuple(v) for k, v in meta["normalization"].items()})
    source = SegXDataset(data, "val" if as_reference_code else "train", meta["image_size"], norm, cache=False)
    count = min(n, len(source))
    rows = np.arange(count) if as_reference_code else np.random.default_rng(seed).choice(len(source), size=count, replace=False)
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
                        subset: np.ndarray | None = None, **keywords):
    """:func:`segx_helpers.explain.api.explain` for a trained classifier: its predicted classes
    (argmax, or the per-class validation thresholds for multilabel) are the targets. ``subset``:
    positions of the images to explain (e.g. :func:`explained_subset`); the result's ``image_index``
    still refers to rows of ``images``. ``keywords`` go to ``explain``: ``options=`` (the method's) and ``run=``
    (:class:`~segx_helpers.explain.api.RunOptions`)."""
    rows = np.arange(len(images)) if subset is None else np.asarray(subset, dtype=np.int64)
    explained = TargetChoice(task=classifier.meta["task"], thresholds=classifier.meta.get("thresholds"))
    e = explain(classifier.model, images[torch.as_tensor(rows)], None, method, explained=explained, **keywords)
    e.image_index = rows[e.image_index]
    return e


def segx_results(folder: str | Path, data: LoadedDataset, segmenter: TrainedModel, classifier: TrainedModel,
                 settings: RunSettings, methods: Sequence[str] = ("gradcam", "gradient_shap"), seed: int = 0,
                 p: float = 5.0) -> dict:
    """Notebook 04's results in one call (for a fresh runtime that skipped it), with the same package
    calls as the notebook: explain the test split, score every prediction with the one analysis path
    (:func:`segx_helpers.workflows.results.explanation_results`), save each method's results in
    ``<folder>/<method>`` and the test masks in ``<folder>/test_masks.npz`` (the notebooks' ``paths.maps(DATASET)``).
    Returns method -> :class:`~segx_helpers.workflows.results.Results`. Prints what it computes."""
    folder = Path(folder)
    shap = (f", Gradient SHAP on {settings.shap_images} test images with {settings.shap_nsamples} samples"
            if "gradient_shap" in methods else "")
    print(f"preparing notebook 04's results ({settings.name} mode: {', '.join(methods)}; Grad-CAM family on every "
          f"test image{shap}) into {folder} ...", flush=True)
    test = split_tensors(data, "test", classifier.meta)
    images = Normalization(**classifier.meta["normalization"]).denormalize(test["image"])
    mask_prob = mask_probabilities(segmenter, data, "test", classifier.meta["image_size"])
    predicted = binarise_masks(mask_prob, segmenter.meta["threshold"])
    true_masks = test["mask"][:, 0].numpy() > 0.5
    labels = SplitLabels.of(test, data.info)
    out = {}
    for method in methods:
        if method == "gradient_shap":
            rows = explained_subset(labels.targets, settings.shap_images, seed)
            background = background_images(data, classifier.meta, settings.shap_background, seed)
            e = explain_predictions(classifier, test["image"], method, subset=rows,
                                    options=GradientShapOptions(background, nsamples=settings.shap_nsamples))
        else:
            e = explain_predictions(classifier, test["image"], method)
        out[method] = explanation_results(e, labels, predicted, true_masks, test["has_mask"],
                                          options=AnalysisOptions(p=p))
        out[method].save(folder / method, images, predicted, p=p)
    save_split_arrays(folder / "test_masks.npz", mask_prob=mask_prob, predicted_masks=predicted,
                      true_masks=true_masks, has_mask=np.asarray(test["has_mask"]), image_id=np.array(test["image_id"]))
    return out


def segmenter_masks(segmenter: TrainedModel, data: LoadedDataset, split: str, image_size: int) -> np.ndarray:
    """The segmenter's masks of a split, bool ``(N, image_size, image_size)``: its probabilities binarised once,
    with the threshold it tuned on validation."""
    return binarise_masks(mask_probabilities(segmenter, data, split, image_size), segmenter.meta["threshold"])


def score_split(classifier: TrainedModel, data: LoadedDataset, tensors: dict, method: str, masks: np.ndarray,
                p: float = 5.0, **keywords):
    """Explain a split's predictions with ``method`` and score every map against ``masks`` with the one analysis
    path. ``tensors``: :func:`~segx_helpers.models.checkpoints.split_tensors` of the split; ``keywords`` go to
    :func:`explain_predictions` (e.g. ``options=CamOptions(target_layers=...)``). Returns
    :class:`~segx_helpers.workflows.results.Results`."""
    e = explain_predictions(classifier, tensors["image"], method, run=RunOptions(progress=False), **keywords)
    return explanation_results(e, SplitLabels.of(tensors, data.info), masks, options=AnalysisOptions(p=p))
