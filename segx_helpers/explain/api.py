"""Explanation maps: one API, ``explain(model, images, targets, method)``, for every method.

* CAM family through pytorch-grad-cam (``gradcam``, ``gradcam++``, ``hirescam``, ``scorecam``,
  ``eigencam``, ``layercam``), with its ``ClassifierOutputTarget`` objects. Maps are ReLU'd and
  min-max scaled to [0, 1] per map by the library.
* ``gradient_shap``: expected gradients (Gradient SHAP) against a background of training images;
  the per-pixel map is the mean absolute attribution over channels for the target class.

Two engines. ``engine="library"`` calls pytorch-grad-cam / ``shap.GradientExplainer`` as they
are (the correctness reference). ``engine="fast"`` (default where available) gives the same
result with far fewer passes: plain Grad-CAM takes one forward per batch and one backward per
round of targets (not per image and class), and Gradient SHAP draws the same kind of samples as
shap but runs them batched across images, for the target classes only. Tests check that both
engines agree.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from segx_helpers.models.networks import cam_reshape_transform, find_target_layer, pick_device

CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "scorecam", "eigencam", "layercam")
METHODS = CAM_METHODS + ("gradient_shap",)
FAST_METHODS = ("gradcam", "gradient_shap")


@dataclass
class Explanations:
    """Maps for (image, class) pairs.

    ``maps`` float32 ``(M, H, W)`` at input resolution, non-negative; ``image_index`` ``(M,)`` the row
    of ``images`` each map explains; ``class_index`` ``(M,)`` the explained class; ``scores`` ``(M,)``
    the model's probability for that class (softmax or sigmoid by ``task``).
    """

    maps: np.ndarray
    image_index: np.ndarray
    class_index: np.ndarray
    scores: np.ndarray
    method: str

    def __len__(self) -> int:
        return len(self.maps)


SELECTIONS = ("decision", "above-threshold")


def predicted_targets(probs: np.ndarray, task: str, thresholds: Sequence[float] | None = None,
                      selection: str = "decision") -> list[list[int]]:
    """Classes to explain per image.

    ``selection="decision"`` (default): the model's decision, the argmax (multiclass) or every class at
    or above its threshold (multilabel; 0.5 when no thresholds are given). ``"above-threshold"``: every
    class at or above its threshold whatever the task, as the reference code does for both of its
    datasets (with thresholds that maximise each class's F1 on validation, see
    :func:`segx_helpers.scores.metrics.select_thresholds`); an image can then have none or several.
    """
    probs = np.asarray(probs)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if task not in ("multiclass", "multilabel"):
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
    if task == "multiclass" and selection == "decision":
        return [[int(c)] for c in probs.argmax(axis=1)]
    if selection == "above-threshold" and thresholds is None:
        raise ValueError("selection='above-threshold' needs per-class thresholds (e.g. select_thresholds on validation)")
    cut = np.full(probs.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
    if cut.shape != (probs.shape[1],):
        raise ValueError(f"thresholds must have one value per class ({probs.shape[1]}), got {cut.shape}")
    return [np.flatnonzero(row >= cut).tolist() for row in probs]


def _class_index(value) -> int:
    """One class index: a Python/NumPy int or an integer 0-d tensor/array (never a float or a bool)."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise TypeError(f"targets must be integer class indices (an int, one int per image, or a list of ints per image); "
                    f"got {value!r} ({type(value).__name__}). For probabilities, pass targets=None (the predicted "
                    "classes) or convert with predicted_targets(probs, task).")


def _is_scalar(value) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 0
    return isinstance(value, (str, bytes)) or not hasattr(value, "__iter__")


def _normalise_targets(targets, n_images: int, n_classes: int) -> list[list[int]]:
    if isinstance(targets, (torch.Tensor, np.ndarray)):
        if targets.ndim > 2:
            raise ValueError(f"targets must be an int, (N,) or (N, k) class indices, got shape {tuple(targets.shape)}")
        targets = targets.tolist()
    if _is_scalar(targets):
        targets = [[_class_index(targets)]] * n_images
    else:
        targets = [[_class_index(t)] if _is_scalar(t) else [_class_index(c) for c in t] for t in targets]
    if len(targets) != n_images:
        raise ValueError(f"targets has {len(targets)} entries but there are {n_images} images (one entry per image)")
    bad = sorted({c for row in targets for c in row if not 0 <= c < n_classes})
    if bad:
        raise ValueError(f"target classes {bad} are out of range for a model with {n_classes} outputs")
    return targets


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with frozen parameters for the duration; the caller's state is restored exactly after:
    every module's ``training`` flag, every parameter's ``requires_grad`` and ``.grad`` (the same
    tensor object, with its values, or ``None``), whatever the explainer did in between."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad, None if p.grad is None else p.grad.detach().clone())
              for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag, grad, values in params:
            p.requires_grad_(flag)
            if grad is not None:
                with torch.no_grad():
                    grad.copy_(values)
            p.grad = grad
        for m, training in modes:
            m.training = training


def _probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    return logits.softmax(1) if task == "multiclass" else logits.sigmoid()


OUTPUTS = ("logit", "probability", "sigmoid")
"""What an explanation differentiates: the class ``logit`` (our default), the class ``probability``
(softmax for multiclass, sigmoid for multilabel), or the ``sigmoid`` of the logit whatever the task
(what the reference code explains, for both of its datasets)."""


def explained_output(logits: torch.Tensor, output: str, task: str) -> torch.Tensor:
    """The quantity whose gradient the explanation follows, ``(N, classes)``, from the logits."""
    if output == "logit":
        return logits
    if output == "probability":
        return _probabilities(logits, task)
    if output == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


class _ExplainedOutput(nn.Module):
    """A classifier whose outputs are :func:`explained_output` (for the library engines)."""

    def __init__(self, model: nn.Module, output: str, task: str) -> None:
        super().__init__()
        self.model, self.output, self.task = model, output, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return explained_output(self.model(x), self.output, self.task)


def explain(model: nn.Module, images: torch.Tensor | np.ndarray, targets=None, method: str = "gradcam", *,
            task: str = "multiclass", thresholds: Sequence[float] | None = None,
            target_layers: Sequence[nn.Module] | None = None, engine: str = "auto", batch_size: int = 32,
            background: torch.Tensor | None = None, nsamples: int = 50, seed: int = 0, progress: bool = True,
            device: str | None = None, output: str = "logit", selection: str = "decision",
            reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Explanations:
    """Explanation maps ``(M, H, W)``, one per (image, target class).

    ``images``: ``(N, C, H, W)`` as the model expects them (normalised). ``targets``: ``None`` (the
    predicted classes, see :func:`predicted_targets`), one int for all images, one int per image,
    or a list of classes per image. ``target_layers``: for CAMs; found automatically for ResNet,
    DenseNet, vision transformers and any model with a ``Conv2d`` (:func:`segx_helpers.models.networks.find_target_layer`).
    ``background``: ``(B, C, H, W)`` reference images for Gradient SHAP (e.g. training images).
    ``engine``: ``"auto"`` (default: the fast engine for gradcam and gradient_shap, the libraries'
    own for the rest), ``"fast"`` (warns for a method without one) or ``"library"``. ``output``: what is explained,
    the class ``"logit"`` (default), its ``"probability"`` (softmax or sigmoid by ``task``) or its
    ``"sigmoid"`` (the reference code's choice); see :data:`OUTPUTS`. ``selection``: which classes
    ``targets=None`` explains, see :func:`predicted_targets`. ``reshape_transform``: for CAMs on a layer
    that outputs tokens, a function to a feature map ``(N, C, h, w)`` (pytorch-grad-cam's argument);
    automatic for torchvision / timm vision transformers (:class:`segx_helpers.models.networks.TokensToGrid`:
    drop the class token, tokens to the patch grid). The model is put in eval mode while explaining and
    restored afterwards. Warns when every map comes out zero (a target layer the output does not
    depend on, or a model whose outputs do not depend on the input, e.g. a zero-initialised head).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if engine not in ("auto", "fast", "library"):
        raise ValueError(f"engine must be 'auto', 'fast' or 'library', got {engine!r}")
    if engine == "fast" and method not in FAST_METHODS:
        warnings.warn(f"{method} has no fast engine (only {FAST_METHODS} do); using pytorch-grad-cam's own. "
                      "Pass engine='auto' to choose silently.", UserWarning, stacklevel=2)
    if engine != "library":
        engine = "fast" if method in FAST_METHODS else "library"
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf values")
    device = pick_device(device)
    if method == "gradient_shap":
        if background is None:
            raise ValueError("gradient_shap needs background images (e.g. a few dozen training images): pass background=")
        background = torch.as_tensor(background, dtype=torch.float32)
        if background.shape[1:] != images.shape[1:]:
            raise ValueError(f"background {tuple(background.shape)} must have the images' shape {tuple(images.shape[1:])}")
    model.to(device)
    layers = None
    if method in CAM_METHODS:
        layers = list(target_layers) if target_layers is not None else [find_target_layer(model)]
        if reshape_transform is None:
            reshape_transform = cam_reshape_transform(model)
    with evaluation_mode(model):
        if method == "gradcam" and engine == "fast" and len(layers) == 1:
            maps, pairs, probs = _fast_gradcam(model, images, targets, task, thresholds, layers[0], batch_size,
                                               progress, device, output, selection, reshape_transform)
        else:
            probs = predict(model, images, task, batch_size, device)
            chosen = predicted_targets(probs, task, thresholds, selection) if targets is None else targets
            chosen = _normalise_targets(chosen, len(images), probs.shape[1])
            explained = model if output == "logit" else _ExplainedOutput(model, output, task)
            if method in CAM_METHODS:
                maps, pairs = _library_cam(explained, images, chosen, method, layers, batch_size, progress, device,
                                           reshape_transform)
            else:
                maps, pairs = _explain_shap(explained, images, chosen, background, nsamples, engine, batch_size, seed,
                                            progress, device)
    if not np.isfinite(maps).all():
        raise FloatingPointError(f"{method} produced NaN/inf maps; check the model and inputs")
    if len(maps) and not maps.any():
        hint = ("the target layer does not influence the explained output (e.g. a transformer's patch embedding: pass "
                "target_layers= and reshape_transform=), or " if method in CAM_METHODS else "")
        warnings.warn(f"All {len(maps)} {method} maps are zero: {hint}the model's outputs do not depend on the input "
                      "(e.g. an untrained, zero-initialised head).", UserWarning, stacklevel=2)
    image_index = np.asarray([p[0] for p in pairs], dtype=np.int64)
    class_index = np.asarray([p[1] for p in pairs], dtype=np.int64)
    return Explanations(maps=maps.astype(np.float32), image_index=image_index, class_index=class_index,
                        scores=probs[image_index, class_index] if len(pairs) else np.zeros(0, np.float32),
                        method=method)


def _check_logits(logits: torch.Tensor, task: str) -> None:
    if logits.ndim != 2:
        raise ValueError(f"The model must output logits of shape (N, classes); got {tuple(logits.shape)}")
    if task == "multiclass" and logits.shape[1] == 1:
        raise ValueError("The model has one output, but task='multiclass' takes a softmax over the outputs, which is "
                         "always 1.0 for one output: use task='multilabel' (a sigmoid per output) for a one-output "
                         "binary model, or give the model one output per class.")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, task: str, batch_size: int = 64,
            device: torch.device | str | None = None) -> np.ndarray:
    """The model's class probabilities ``(N, classes)`` for ``images`` ``(N, C, H, W)`` prepared as it
    expects them: softmax (multiclass) or sigmoid (multilabel) of its logits, in batches of ``batch_size``
    on ``device`` (default: where the model's parameters are). Leaves the model's mode as it is; call
    ``model.eval()`` (or use :func:`evaluation_mode`) first for inference."""
    if device is None:
        device = next(model.parameters()).device
    out = []
    for batch in torch.split(images, batch_size):
        logits = model(batch.to(device)).float()
        _check_logits(logits, task)
        out.append(_probabilities(logits, task).cpu().numpy())
    return np.concatenate(out)


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, disable=not progress, total=math.ceil(n / batch_size), leave=False)


# ------------------------------------------------------------------------------ CAM family

def _cam_class(method: str):
    import pytorch_grad_cam as pgc

    return {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM,
            "scorecam": pgc.ScoreCAM, "eigencam": pgc.EigenCAM, "layercam": pgc.LayerCAM}[method]


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
                         "target_layers=[<that layer>] (and reshape_transform= for a layer that outputs tokens)")
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


def _library_cam(model, images, targets, method, layers, batch_size, progress, device, reshape_transform=None):
    """Any CAM method through pytorch-grad-cam, one (image, class) pair per input row."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    maps, pairs = [], []
    with (_cam_class(method)(model=model, target_layers=layers, reshape_transform=reshape_transform) as cam,
          _protected(layers, reshape_transform)):
        for start in _batches(len(images), batch_size, progress, method):
            chunk = images[start:start + batch_size]
            batch_pairs = [(i, c) for i, row in enumerate(targets[start:start + batch_size]) for c in row]
            if not batch_pairs:
                continue
            rows = torch.as_tensor([i for i, _ in batch_pairs])
            maps.append(cam(input_tensor=chunk[rows].to(device).requires_grad_(True),
                            targets=[ClassifierOutputTarget(c) for _, c in batch_pairs]))
            cam.activations_and_grads.clear()
            pairs += [(start + i, c) for i, c in batch_pairs]
    h, w = images.shape[-2:]
    return (np.concatenate(maps) if maps else np.zeros((0, h, w), np.float32)), pairs


def _fast_gradcam(model, images, targets, task, thresholds, layer, batch_size, progress, device, output="logit",
                  selection="decision", reshape_transform=None):
    """Grad-CAM for every (image, class) pair: per batch one forward (which also gives the
    probabilities and, when ``targets`` is None, the predicted classes) and one backward per round.

    Round ``r`` back-propagates the sum of each image's ``r``-th target logit; in eval mode images do
    not interact, so each image's gradient is exactly its own target's gradient. Post-processing is
    pytorch-grad-cam's own (ReLU, min-max scaling, bilinear resize).
    """
    from pytorch_grad_cam.utils.image import scale_cam_image

    height, width = images.shape[-2:]
    maps, pairs, probs = [], [], []
    captured = {}

    def capture(module, inputs, activation):
        captured["a"] = activation
        return _protect_activation(module, inputs, activation, reshape_transform)

    handle = layer.register_forward_hook(capture)
    try:
        for start in _batches(len(images), batch_size, progress, "gradcam"):
            logits = model(images[start:start + batch_size].to(device).requires_grad_(True))
            _check_logits(logits, task)
            batch_probs = _probabilities(logits.detach().float(), task).cpu().numpy()
            probs.append(batch_probs)
            if targets is None:
                chunk_targets = predicted_targets(batch_probs, task, thresholds, selection)
            else:
                if start == 0:
                    targets = _normalise_targets(targets, len(images), logits.shape[1])
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


# ------------------------------------------------------------------------------ Gradient SHAP

class _SelectOutput(nn.Module):
    """Wrap a classifier so that it outputs only one class's logit ``(N, 1)`` (shap then explains just it)."""

    def __init__(self, model: nn.Module, class_index: int) -> None:
        super().__init__()
        self.model, self.class_index = model, class_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.class_index:self.class_index + 1]


def _explain_shap(model, images, targets, background, nsamples, engine, batch_size, seed, progress, device):
    pairs = [(i, c) for i, row in enumerate(targets) for c in row]
    h, w = images.shape[-2:]
    if not pairs:
        return np.zeros((0, h, w), np.float32), []
    background = background.to(device)
    if engine == "library":
        attributions = _library_shap(model, images, pairs, background, nsamples, seed, progress, device)
    else:
        attributions = _fast_shap(model, images, targets, background, nsamples, batch_size, seed, progress, device)
    return np.abs(attributions).mean(axis=1), pairs


def _library_shap(model, images, pairs, background, nsamples, seed, progress, device) -> np.ndarray:
    """shap.GradientExplainer per target class (a wrapper exposing only that logit), per image."""
    import shap

    out = np.zeros((len(pairs),) + tuple(images.shape[1:]), dtype=np.float32)
    by_class: dict[int, list[int]] = {}
    for k, (_, c) in enumerate(pairs):
        by_class.setdefault(c, []).append(k)
    bar = tqdm(total=len(pairs), desc="gradient_shap (shap)", disable=not progress, leave=False)
    for c, members in by_class.items():
        explainer = shap.GradientExplainer(_SelectOutput(model, c), background)
        for k in members:
            x = images[pairs[k][0]:pairs[k][0] + 1].to(device)
            values = explainer.shap_values(x, nsamples=nsamples, rseed=seed + pairs[k][0])
            values = np.asarray(values[0] if isinstance(values, list) else values)
            out[k] = values.reshape(values.shape[:4])[0]
            bar.update(1)
    bar.close()
    model.eval()
    return out


def _fast_shap(model, images, targets, background, nsamples, batch_size, seed, progress, device) -> np.ndarray:
    """Expected gradients for every (image, target class) pair, image-major like the pairs.

    Like shap: per image ``nsamples`` draws of a background image ``b`` and ``t ~ U(0, 1)``; the
    gradient of the target logit at ``b + t (x - b)`` times ``(x - b)``, averaged. Unlike the
    reference usage, only the target classes are explained, and all targets of an image share one
    forward pass over its samples (one backward per target).
    """
    generator = torch.Generator().manual_seed(seed)
    n_bg = len(background)
    images_per_chunk = max(1, (2 * batch_size) // nsamples)
    found: dict[tuple[int, int], np.ndarray] = {}
    bar = tqdm(total=sum(len(t) for t in targets), desc="gradient_shap", disable=not progress, leave=False)
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
    return np.stack([found[key] for key in sorted(found)])
