"""The CAM family: ``gradcam``, ``gradcam++``, ``hirescam``, ``scorecam``, ``eigencam``, ``layercam`` through
pytorch-grad-cam (with its ``ClassifierOutputTarget`` objects; maps ReLU'd and min-max scaled to [0, 1] per map
by the library), and the fast Grad-CAM engine. Their options are :class:`CamOptions`.

The fast engine gives pytorch-grad-cam's Grad-CAM with far fewer passes: one forward per batch (which also
gives the probabilities and the predicted classes) and one backward per round of targets, not per image and
class. Tests check that it agrees with the library.

pytorch-grad-cam is imported inside the functions that use it: it is slow to import (OpenCV and more), which
importing the package (and ``segx --help``) should not pay.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from segx_helpers.explain.registry import ExplanationMethod, register_method
from segx_helpers.explain.targets import (Settings, check_logits, explain_pairs, explained_output, normalise_targets,
                                          predicted_targets, probabilities)
from segx_helpers.models.networks import cam_reshape_transform, find_target_layer

CAM_CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "scorecam": "ScoreCAM",
               "eigencam": "EigenCAM", "layercam": "LayerCAM"}
"""Method name -> pytorch-grad-cam class name."""


@dataclass(frozen=True)
class CamOptions:
    """Options of the CAM methods. ``target_layers``: the layers to hook; by default the one
    :func:`segx_helpers.models.networks.find_target_layer` finds (ResNet, DenseNet, vision transformers, any
    model with a ``Conv2d``). ``reshape_transform``: for a layer that outputs tokens, a function to a feature map
    ``(N, C, h, w)`` (pytorch-grad-cam's argument); by default automatic for torchvision / timm vision
    transformers (:class:`segx_helpers.models.networks.TokensToGrid`: drop the class token, tokens to the patch
    grid)."""

    target_layers: Sequence[nn.Module] | None = None
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _prepare(options: CamOptions, model: nn.Module, images: torch.Tensor) -> CamOptions:
    """``options`` with the target layers and the reshape transform filled in for ``model``."""
    layers = list(options.target_layers) if options.target_layers is not None else [find_target_layer(model)]
    transform = options.reshape_transform if options.reshape_transform is not None else cam_reshape_transform(model)
    return dataclasses.replace(options, target_layers=layers, reshape_transform=transform)


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, disable=not progress, total=math.ceil(n / batch_size), leave=False)


def _protect_activation(module: nn.Module, inputs, activation, reshape_transform=None):
    """Forward hook for a CAM target layer: check that it outputs a feature map ``(N, C, H, W)`` (after
    ``reshape_transform``, for transformer tokens), and hand the rest of the model a copy, so that an in-place
    operation after the layer (``ReLU(inplace=True)``, torchvision DenseNet's functional in-place ReLU)
    cannot rewrite the activations the CAM reads."""
    grid = activation
    if reshape_transform is not None and isinstance(activation, torch.Tensor):
        grid = reshape_transform(activation)
    if not isinstance(grid, torch.Tensor) or grid.ndim != 4:
        shape = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(activation).__name__
        raise ValueError(f"target layer {type(module).__name__} outputs {shape}, but CAM methods need a layer whose "
                         "output is a feature map (N, C, H, W), e.g. the last convolutional block: pass "
                         "options=CamOptions(target_layers=[<that layer>]) (and reshape_transform= for a layer that "
                         "outputs tokens)")
    return activation.clone()


@contextlib.contextmanager
def _protected(layers: Sequence[nn.Module], reshape_transform=None) -> Iterator[None]:
    """:func:`_protect_activation` on ``layers`` for the duration. Registered after pytorch-grad-cam's own
    hooks, so the library records the layer's real output and the model continues on the copy."""
    hook = functools.partial(_protect_activation, reshape_transform=reshape_transform)
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _library_cam(method: str, model: nn.Module, images: torch.Tensor, targets: list[list[int]], options: CamOptions,
                 settings: Settings) -> np.ndarray:
    """The CAM ``method`` (a key of :data:`CAM_CLASSES`) through pytorch-grad-cam, one (image, class) pair per
    input row, ``settings.batch_size`` images at a time: maps ``(M, H, W)``."""
    import pytorch_grad_cam  # here, not at the top: slow to import (see the module docstring)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = getattr(pytorch_grad_cam, CAM_CLASSES[method])
    layers, transform, batch_size = options.target_layers, options.reshape_transform, settings.batch_size
    maps = []
    with (cam_class(model=model, target_layers=layers, reshape_transform=transform) as cam,
          _protected(layers, transform)):
        for start in _batches(len(images), batch_size, settings.progress, method):
            chunk = images[start:start + batch_size]
            batch_pairs = [(i, c) for i, row in enumerate(targets[start:start + batch_size]) for c in row]
            if not batch_pairs:
                continue
            rows = torch.as_tensor([i for i, _ in batch_pairs])
            maps.append(cam(input_tensor=chunk[rows].to(settings.device).requires_grad_(True),
                            targets=[ClassifierOutputTarget(c) for _, c in batch_pairs]))
            cam.activations_and_grads.clear()
    return np.concatenate(maps)


def _fast_gradcam(model: nn.Module, images: torch.Tensor, targets, options: CamOptions,
                  settings: Settings) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
    """Grad-CAM for every (image, class) pair (an :data:`~segx_helpers.explain.targets.Engine`): per batch
    one forward (which also gives the probabilities and, when ``targets`` is None, the predicted classes)
    and one backward per round. With several target layers, pytorch-grad-cam's Grad-CAM.

    Round ``r`` back-propagates the sum of each image's ``r``-th target output; in eval mode images do
    not interact, so each image's gradient is exactly its own target's gradient. Post-processing is
    pytorch-grad-cam's own (ReLU, min-max scaling, bilinear resize).
    """
    if len(options.target_layers) != 1:
        return explain_pairs(functools.partial(_library_cam, "gradcam"), model, images, targets, options, settings)
    from pytorch_grad_cam.utils.image import scale_cam_image  # here, not at the top: slow to import

    (layer,), reshape_transform = options.target_layers, options.reshape_transform
    task, output, batch_size = settings.task, settings.output, settings.batch_size
    height, width = images.shape[-2:]
    maps, pairs, probs = [], [], []
    captured = {}

    def capture(module, inputs, activation):
        captured["a"] = activation
        return _protect_activation(module, inputs, activation, reshape_transform)

    handle = layer.register_forward_hook(capture)
    try:
        for start in _batches(len(images), batch_size, settings.progress, "gradcam"):
            logits = model(images[start:start + batch_size].to(settings.device).requires_grad_(True))
            check_logits(logits, task)
            batch_probs = probabilities(logits.detach().float(), task).cpu().numpy()
            probs.append(batch_probs)
            if targets is None:
                chunk_targets = predicted_targets(batch_probs, task, settings.thresholds, settings.selection)
            else:
                if start == 0:
                    targets = normalise_targets(targets, len(images), logits.shape[1])
                chunk_targets = targets[start:start + batch_size]
            activations = captured.pop("a")
            rounds = max((len(row) for row in chunk_targets), default=0)
            found: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
            for r in range(rounds):
                rows = [i for i, row in enumerate(chunk_targets) if len(row) > r]
                classes = [chunk_targets[i][r] for i in rows]
                selected = explained_output(logits, output, task)[torch.as_tensor(rows), torch.as_tensor(classes)].sum()
                grads = torch.autograd.grad(selected, activations, retain_graph=r + 1 < rounds)[0]
                grid = activations
                if reshape_transform is not None:  # transformer tokens -> (N, C, h, w), as pytorch-grad-cam does
                    grads, grid = reshape_transform(grads), reshape_transform(activations)
                weights = grads[rows].mean(dim=(2, 3), keepdim=True)
                cam = torch.relu((weights * grid[rows]).sum(dim=1)).detach().cpu().numpy()
                scaled = scale_cam_image(scale_cam_image(cam, (width, height)))
                for k, (i, c) in enumerate(zip(rows, classes)):
                    found[(i, r)] = (c, scaled[k])
            for i, r in sorted(found):
                maps.append(found[(i, r)][1])
                pairs.append((start + i, found[(i, r)][0]))
    finally:
        handle.remove()
    stacked = np.stack(maps) if maps else np.zeros((0, height, width), np.float32)
    return stacked, pairs, np.concatenate(probs)


_ZERO_MAPS_HINT = ("the target layer does not influence the explained output (e.g. a transformer's patch embedding: "
                  "pass options=CamOptions(target_layers=..., reshape_transform=...))")

for _name in CAM_CLASSES:
    register_method(ExplanationMethod(_name, CamOptions, functools.partial(_library_cam, _name),
                                      fast=_fast_gradcam if _name == "gradcam" else None, prepare=_prepare,
                                      zero_maps_hint=_ZERO_MAPS_HINT))
