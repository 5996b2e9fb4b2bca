"""What an explanation is of: the model's probabilities (:func:`predict`), the classes explained per image
(:func:`predicted_targets`, or the caller's targets checked by :func:`normalise_targets`), the quantity whose
gradient is followed (:func:`explained_output`), the model's state while explaining (:func:`evaluation_mode`),
the settings every method receives (:class:`Settings`) and the result (:class:`Explanations`).

:func:`explain_pairs` runs a method's maps function the standard way: predict, choose the targets, wrap the
model so that it outputs the explained quantity, then compute one map per (image, class) pair.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from segx_helpers.scores.decisions import decide, decision_probabilities


@dataclass
class Explanations:
    """Maps for (image, class) pairs.

    ``maps`` float32 ``(M, H, W)`` at input resolution, non-negative; ``image_index`` ``(M,)`` the row
    of ``images`` each map explains; ``class_index`` ``(M,)`` the explained class; ``confidence`` ``(M,)``
    the confidence of that decision (:func:`decision_confidence`: the model's probability for the class after the
    prior correction of the validation-chosen cut-offs; the probability itself without cut-offs);
    ``probabilities`` ``(N, classes)`` the model's probabilities for every image (softmax or sigmoid), when known.
    """

    maps: np.ndarray
    image_index: np.ndarray
    class_index: np.ndarray
    confidence: np.ndarray
    method: str
    probabilities: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.maps)


TASKS = ("multiclass", "multilabel")
SELECTIONS = ("decision", "above-threshold")

OUTPUTS = ("logit", "probability", "sigmoid")
"""What an explanation differentiates: the class ``logit`` (our default), the class ``probability``
(softmax for multiclass, sigmoid for multilabel), or the ``sigmoid`` of the logit whatever the task
(what the reference code explains, for both of its datasets)."""


@dataclass(frozen=True)
class TargetChoice:
    """What :func:`segx_helpers.explain.api.explain` explains. ``task``: ``"multiclass"`` (softmax) or
    ``"multilabel"`` (sigmoid). With ``targets=None``, ``selection`` (:data:`SELECTIONS`) picks the classes: the
    model's decision with the cut-offs ``thresholds`` chosen on validation (``"decision"``; a checkpoint's
    ``meta["thresholds"]``, see :mod:`segx_helpers.scores.decisions`), or every class at or above its per-class
    ``thresholds`` (``"above-threshold"``, the reference code's rule). ``output`` (:data:`OUTPUTS`): the class
    ``"logit"`` (default), its ``"probability"`` (softmax or sigmoid by ``task``) or its ``"sigmoid"`` (the
    reference code's choice). Bad values are refused here, naming the field."""

    task: str = "multiclass"
    thresholds: Sequence[float] | None = None
    selection: str = "decision"
    output: str = "logit"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")


@dataclass(frozen=True)
class Settings:
    """:func:`segx_helpers.explain.api.explain`'s common keywords, as every method's functions receive them
    (``device`` already resolved to a ``torch.device``)."""

    task: str
    thresholds: Sequence[float] | None
    selection: str
    output: str
    batch_size: int
    progress: bool
    device: torch.device


MapsFunction = Callable[[nn.Module, torch.Tensor, list[list[int]], Any, Settings], np.ndarray]
"""``maps(model, images, targets, options, settings)``: one map per (image, class) pair, ``(M, H, W)`` at
the input resolution, image by image and in each image's target order. ``model`` outputs the explained
quantity (:func:`explained_output`) and is in eval mode on ``settings.device``; ``images`` ``(N, C, H, W)``
float32 as the caller gave them; ``targets`` a list of class indices per image, at least one pair in all."""

Engine = Callable[[nn.Module, torch.Tensor, Any, Any, Settings],
                  tuple[np.ndarray, list[tuple[int, int]], np.ndarray]]
"""``engine(model, images, targets, options, settings) -> (maps, pairs, probs)``: a whole explanation run,
given the model as the caller passed it and ``targets`` as given (``None``: the predicted classes). Returns
the maps ``(M, H, W)``, their ``(image, class)`` pairs and the probabilities ``(N, classes)``.
:func:`explain_pairs` is the standard one."""


def predicted_targets(probs: np.ndarray, task: str, thresholds: Sequence[float] | None = None,
                      selection: str = "decision") -> list[list[int]]:
    """Classes to explain per image, from the probabilities ``(N, classes)``.

    ``selection="decision"`` (default): the model's decision with the cut-offs ``thresholds`` chosen on validation
    (:func:`segx_helpers.scores.decisions.decide`): ``argmax p / t`` (multiclass; the argmax when no cut-offs are
    given) or every class at or above its threshold (multilabel; 0.5 when none are given). ``"above-threshold"``: every
    class at or above its threshold whatever the task, as the reference code does for both of its
    datasets (with thresholds that maximise each class's F1 on validation, see
    :func:`segx_helpers.scores.metrics.select_thresholds`); an image can then have none or several.
    """
    probs = np.asarray(probs)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if task not in TASKS:
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
    if task == "multiclass" and selection == "decision":
        return [[int(c)] for c in decide(probs, task, thresholds)]
    if selection == "above-threshold" and thresholds is None:
        raise ValueError("selection='above-threshold' needs per-class thresholds (e.g. select_thresholds on validation)")
    cut = np.full(probs.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
    if cut.shape != (probs.shape[1],):
        raise ValueError(f"thresholds must have one value per class ({probs.shape[1]}), got {cut.shape}")
    return [np.flatnonzero(row >= cut).tolist() for row in probs]


def decision_confidence(probs: np.ndarray, settings: "Settings") -> np.ndarray:
    """The confidence ``(N, classes)`` each explained (image, class) pair gets: with ``selection="decision"`` the
    probabilities after the cut-offs' prior correction
    (:func:`segx_helpers.scores.decisions.decision_probabilities`: 0.5 at a cut-off, the probability itself
    without cut-offs), so that the confidence ranks the decisions actually made; with ``"above-threshold"`` (the
    reference code's per-class thresholds) the probabilities themselves."""
    if settings.selection != "decision":
        return np.asarray(probs)
    return decision_probabilities(probs, settings.task, settings.thresholds)


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


def normalise_targets(targets, n_images: int, n_classes: int) -> list[list[int]]:
    """The caller's ``targets`` (one int for all images, one int per image, a list of ints per image, or
    an integer tensor/array ``(N,)`` / ``(N, k)``) as a list of class indices per image, checked against
    ``n_images`` and ``n_classes``."""
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


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Class probabilities ``(N, classes)`` from logits: softmax (multiclass) or sigmoid (multilabel)."""
    return logits.softmax(1) if task == "multiclass" else logits.sigmoid()


def check_logits(logits: torch.Tensor, task: str) -> None:
    """Refuse model outputs that are not logits ``(N, classes)``, or one output under ``task='multiclass'``."""
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
        check_logits(logits, task)
        out.append(probabilities(logits, task).cpu().numpy())
    return np.concatenate(out)


def explained_output(logits: torch.Tensor, output: str, task: str) -> torch.Tensor:
    """The quantity whose gradient the explanation follows, ``(N, classes)``, from the logits; ``output`` is
    one of :data:`OUTPUTS`."""
    if output == "logit":
        return logits
    if output == "probability":
        return probabilities(logits, task)
    if output == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


class ExplainedOutput(nn.Module):
    """A classifier whose outputs are :func:`explained_output` of its logits."""

    def __init__(self, model: nn.Module, output: str, task: str) -> None:
        super().__init__()
        self.model, self.output, self.task = model, output, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return explained_output(self.model(x), self.output, self.task)


def explain_pairs(maps: MapsFunction, model: nn.Module, images: torch.Tensor, targets, options: Any,
                  settings: Settings) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
    """The standard :data:`Engine` around a :data:`MapsFunction`: the probabilities (:func:`predict`), the
    targets (``None``: :func:`predicted_targets`; else :func:`normalise_targets`), then
    ``maps(model outputting the explained quantity, images, targets, options, settings)`` when there is at
    least one pair. Returns ``(maps (M, H, W), pairs, probs (N, classes))``, pairs image by image."""
    probs = predict(model, images, settings.task, settings.batch_size, settings.device)
    chosen = predicted_targets(probs, settings.task, settings.thresholds, settings.selection) if targets is None \
        else targets
    chosen = normalise_targets(chosen, len(images), probs.shape[1])
    pairs = [(i, c) for i, row in enumerate(chosen) for c in row]
    if not pairs:
        return np.zeros((0, *images.shape[-2:]), np.float32), pairs, probs
    explained = model if settings.output == "logit" else ExplainedOutput(model, settings.output, settings.task)
    return maps(explained, images, chosen, options, settings), pairs, probs
