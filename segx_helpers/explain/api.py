"""Explanation maps: one call, ``explain(model, images, targets, method, options=...)``, for every registered
method (:mod:`segx_helpers.explain.registry`). The built-in ones: the CAM family through pytorch-grad-cam
and the fast Grad-CAM (:mod:`segx_helpers.explain.cams`, options :class:`~segx_helpers.explain.cams.CamOptions`),
and ``gradient_shap`` (:mod:`segx_helpers.explain.gradient_shap`, options
:class:`~segx_helpers.explain.gradient_shap.GradientShapOptions`).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from segx_helpers.explain import cams, gradient_shap  # noqa: F401 (importing them registers the built-in methods)
from segx_helpers.explain.registry import get_method, method_names
from segx_helpers.explain.targets import (Explanations, Settings, TargetChoice, decision_confidence, evaluation_mode,
                                          explain_pairs)
from segx_helpers.models.networks import pick_device

ENGINES = ("auto", "fast", "library")


@dataclass(frozen=True)
class RunOptions:
    """How :func:`explain` runs. ``engine`` (:data:`ENGINES`): ``"auto"`` (default: the method's fast engine where
    it has one, else its reference one), ``"fast"`` (warns for a method without one) or ``"library"`` (the
    reference). ``batch_size``: images per pass. ``progress``: show a progress bar. ``device``: where to explain
    (default: CUDA, then MPS, then CPU). Bad values are refused here, naming the field."""

    engine: str = "auto"
    batch_size: int = 32
    progress: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def explain(model: nn.Module, images: torch.Tensor | np.ndarray, targets=None, method: str = "gradcam", *,
            options: Any = None, explained: TargetChoice | None = None,
            run: RunOptions | None = None) -> Explanations:
    """Explanation maps ``(M, H, W)``, one per (image, target class), by the registered ``method``.

    ``images``: ``(N, C, H, W)`` as the model expects them (normalised). ``targets``: ``None`` (the
    predicted classes, see :func:`~segx_helpers.explain.targets.predicted_targets`), one int for all images,
    one int per image, or a list of classes per image. ``options``: the method's options dataclass, e.g.
    ``CamOptions(target_layers=[model.layer3])`` or ``GradientShapOptions(background, nsamples=50, seed=0)``;
    ``None`` takes its defaults. ``explained``: :class:`~segx_helpers.explain.targets.TargetChoice`, the task,
    which classes ``targets=None`` explains and which output (default: the multiclass decision's logit).
    ``run``: :class:`RunOptions` (engine, batch size, progress bar, device).

    The model is put in eval mode while explaining and restored afterwards. Warns when every map comes out
    zero (e.g. a model whose outputs do not depend on the input, like a zero-initialised head).
    """
    explained = explained if explained is not None else TargetChoice()
    run = run if run is not None else RunOptions()
    engine = run.engine
    spec = get_method(method)
    if options is None:
        try:
            options = spec.options()
        except TypeError as error:
            raise TypeError(f"{method} needs options: pass options={spec.options.__name__}(...) ({error})") from None
    if not isinstance(options, spec.options):
        raise TypeError(f"options for {method} must be {spec.options.__name__}(...), got {type(options).__name__}")
    if engine == "fast" and spec.fast is None:
        fast = tuple(name for name in method_names() if get_method(name).fast is not None)
        warnings.warn(f"{method} has no fast engine (only {fast} do); using its library engine. "
                      "Pass run=RunOptions(engine='auto') to choose silently.", UserWarning, stacklevel=2)
    compute = spec.fast if engine != "library" and spec.fast is not None else functools.partial(explain_pairs, spec.maps)
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf values")
    settings = Settings(task=explained.task, thresholds=explained.thresholds, selection=explained.selection,
                        output=explained.output, batch_size=run.batch_size, progress=run.progress,
                        device=pick_device(run.device))
    model.to(settings.device)
    if spec.prepare is not None:
        options = spec.prepare(options, model, images)
    with evaluation_mode(model):
        maps, pairs, probs = compute(model, images, targets, options, settings)
    if not isinstance(maps, np.ndarray):
        raise TypeError(f"explanation method {method!r} returned a {type(maps).__name__}, not a numpy array (M, H, W) "
                        "with one map per (image, class) pair: return e.g. np.stack(maps) or tensor.detach().cpu().numpy()")
    if maps.shape != (len(pairs), *images.shape[-2:]):
        raise ValueError(f"{method} gave maps of shape {maps.shape} for {len(pairs)} (image, class) pairs of "
                         f"{tuple(images.shape[-2:])} images; a method must give one map per pair at input resolution")
    if not np.isfinite(maps).all():
        raise FloatingPointError(f"{method} produced NaN/inf maps; check the model and inputs")
    if len(maps) and not maps.any():
        hint = f"{spec.zero_maps_hint}, or " if spec.zero_maps_hint else ""
        warnings.warn(f"All {len(maps)} {method} maps are zero: {hint}the model's outputs do not depend on the input "
                      "(e.g. an untrained, zero-initialised head).", UserWarning, stacklevel=2)
    image_index = np.asarray([p[0] for p in pairs], dtype=np.int64)
    class_index = np.asarray([p[1] for p in pairs], dtype=np.int64)
    return Explanations(maps=maps.astype(np.float32), image_index=image_index, class_index=class_index,
                        confidence=decision_confidence(probs, settings)[image_index, class_index] if len(pairs)
                        else np.zeros(0, np.float32),
                        method=method, probabilities=np.asarray(probs, np.float32))
