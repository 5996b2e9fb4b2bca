"""Gradient SHAP (expected gradients) against a background of reference images, e.g. training images: the
per-pixel map is the mean absolute attribution over channels for the target class. Its options are
:class:`GradientShapOptions`.

The reference engine is ``shap.GradientExplainer`` as it is; the fast engine draws the same kind of samples
as shap but runs them batched across images, for the target classes only. Tests check that both agree.

shap is imported inside the function that uses it: importing it is slow, which importing the package
should not pay.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from segx_helpers.explain.registry import ExplanationMethod, register_method
from segx_helpers.explain.targets import Settings, explain_pairs


@dataclass(frozen=True)
class GradientShapOptions:
    """Options of ``gradient_shap``. ``background``: reference images ``(B, C, H, W)`` prepared like the
    explained images (e.g. a few dozen training images). ``nsamples``: samples per image (a background image
    and a point between it and the image). ``seed``: seeds the samples (shap's ``rseed`` is ``seed`` plus the
    image's row)."""

    background: torch.Tensor | np.ndarray
    nsamples: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.background is None:
            raise ValueError("gradient_shap needs background images (e.g. a few dozen training images): "
                             "GradientShapOptions(background=...)")
        if isinstance(self.nsamples, bool) or not isinstance(self.nsamples, (int, np.integer)) or self.nsamples < 1:
            raise ValueError(f"nsamples must be a positive integer, got {self.nsamples!r}")


def _prepare(options: GradientShapOptions, model: nn.Module, images: torch.Tensor) -> GradientShapOptions:
    """``options`` with the background as a float32 tensor, checked against the images ``(N, C, H, W)``."""
    background = torch.as_tensor(options.background, dtype=torch.float32)
    if background.shape[1:] != images.shape[1:]:
        raise ValueError(f"background {tuple(background.shape)} must have the images' shape {tuple(images.shape[1:])}")
    return dataclasses.replace(options, background=background)


class _SelectOutput(nn.Module):
    """Wrap a classifier so that it outputs only one class's output ``(N, 1)`` (shap then explains just it)."""

    def __init__(self, model: nn.Module, class_index: int) -> None:
        super().__init__()
        self.model, self.class_index = model, class_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.class_index:self.class_index + 1]


def _library_maps(model: nn.Module, images: torch.Tensor, targets: list[list[int]], options: GradientShapOptions,
                  settings: Settings) -> np.ndarray:
    """shap.GradientExplainer per target class (a wrapper exposing only that output), per image: maps
    ``(M, H, W)``."""
    import shap  # here, not at the top: slow to import (see the module docstring)

    pairs = [(i, c) for i, row in enumerate(targets) for c in row]
    background = options.background.to(settings.device)
    out = np.zeros((len(pairs),) + tuple(images.shape[1:]), dtype=np.float32)
    by_class: dict[int, list[int]] = {}
    for k, (_, c) in enumerate(pairs):
        by_class.setdefault(c, []).append(k)
    bar = tqdm(total=len(pairs), desc="gradient_shap (shap)", disable=not settings.progress, leave=False)
    for c, members in by_class.items():
        explainer = shap.GradientExplainer(_SelectOutput(model, c), background)
        for k in members:
            x = images[pairs[k][0]:pairs[k][0] + 1].to(settings.device)
            values = explainer.shap_values(x, nsamples=options.nsamples, rseed=options.seed + pairs[k][0])
            values = np.asarray(values[0] if isinstance(values, list) else values)
            out[k] = values.reshape(values.shape[:4])[0]
            bar.update(1)
    bar.close()
    model.eval()
    return np.abs(out).mean(axis=1)


def _fast_maps(model: nn.Module, images: torch.Tensor, targets: list[list[int]], options: GradientShapOptions,
               settings: Settings) -> np.ndarray:
    """Expected gradients for every (image, target class) pair, image-major like the pairs: maps ``(M, H, W)``.

    Like shap: per image ``nsamples`` draws of a background image ``b`` and ``t ~ U(0, 1)``; the
    gradient of the target output at ``b + t (x - b)`` times ``(x - b)``, averaged. Unlike the
    reference usage, only the target classes are explained, and all targets of an image share one
    forward pass over its samples (one backward per target).
    """
    device, nsamples = settings.device, options.nsamples
    background = options.background.to(device)
    generator = torch.Generator().manual_seed(options.seed)
    n_bg = len(background)
    images_per_chunk = max(1, (2 * settings.batch_size) // nsamples)
    found: dict[tuple[int, int], np.ndarray] = {}
    bar = tqdm(total=sum(len(t) for t in targets), desc="gradient_shap", disable=not settings.progress, leave=False)
    for start in range(0, len(images), images_per_chunk):
        chunk = [i for i in range(start, min(len(images), start + images_per_chunk)) if targets[i]]
        if not chunk:
            continue
        x = images[torch.as_tensor(chunk)].to(device)
        refs = background[torch.randint(0, n_bg, (len(chunk) * nsamples,), generator=generator).to(device)]
        t = torch.rand(len(chunk) * nsamples, 1, 1, 1, generator=generator).to(device)
        delta = x.repeat_interleave(nsamples, dim=0) - refs
        inputs = (refs + t * delta).requires_grad_(True)
        logits = model(inputs)
        rounds = max(len(targets[i]) for i in chunk)
        for r in range(rounds):
            members = [j for j, i in enumerate(chunk) if len(targets[i]) > r]
            rows = torch.cat([torch.arange(j * nsamples, (j + 1) * nsamples) for j in members]).to(device)
            classes = torch.as_tensor([targets[chunk[j]][r] for j in members], device=device).repeat_interleave(nsamples)
            grads = torch.autograd.grad(logits[rows, classes].sum(), inputs, retain_graph=r + 1 < rounds)[0]
            phi = (grads[rows] * delta[rows]).reshape(len(members), nsamples, *images.shape[1:]).mean(dim=1)
            for k, j in enumerate(members):
                found[(chunk[j], r)] = phi[k].detach().cpu().numpy()
            bar.update(len(members))
    bar.close()
    return np.abs(np.stack([found[key] for key in sorted(found)])).mean(axis=1)


register_method(ExplanationMethod("gradient_shap", GradientShapOptions, _library_maps,
                                  fast=functools.partial(explain_pairs, _fast_maps), prepare=_prepare))
