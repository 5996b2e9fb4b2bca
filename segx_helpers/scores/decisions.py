"""Decisions chosen on validation, the confidence of a decision, and whether a classifier decides at all.

A classifier's probabilities ``(N, C)`` become decisions through **cut-offs** ``t`` ``(C,)`` chosen on the
validation split and stored in the checkpoint (``meta["thresholds"]``):

- multiclass (one class per image): ``t`` sums to 1 and the decision is ``argmax_c p_c / t_c``. Uniform cut-offs
  (``1 / C`` each) are the plain argmax; for two classes ``t = (1 - s, s)`` is the threshold ``p_1 >= s``.
  :func:`select_class_cutoffs` chooses them for the best **balanced accuracy** (the mean of the per-class recalls;
  for two classes the same cut-off as Youden's J = sensitivity + specificity - 1).
- multilabel (any number of findings): one threshold per class, ``p_c >= t_c``
  (:func:`segx_helpers.scores.metrics.select_thresholds`, F1 on validation, as the reference code does).

The **confidence** of a decision is the probability after the same prior correction
(:func:`decision_probabilities`): ``q_c = (p_c / t_c) / sum_k (p_k / t_k)`` for multiclass, and for a multilabel
class ``q = p (1 - t) / (p (1 - t) + (1 - p) t)``. It is the probability itself for uniform cut-offs (or ``t = 0.5``),
0.5 exactly at a cut-off, and it ranks the decisions on each side of a cut-off by their distance from it: a
threshold far from 0.5 makes the raw probability of the predicted class rank errors *above* correct decisions,
this does not.

Whether a classifier decides at all: :func:`segx_helpers.scores.metrics.decides_check`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TASKS = ("multiclass", "multilabel")


def one_hot(y_true: np.ndarray, num_classes: int) -> np.ndarray:
    """``(N,)`` class indices -> ``(N, C)`` 0/1; ``(N, C)`` input (or 0/1 labels of a single class) as int."""
    y_true = np.asarray(y_true)
    if y_true.ndim == 2 or num_classes == 1:
        return y_true.reshape(len(y_true), -1).astype(int)
    out = np.zeros((len(y_true), num_classes), dtype=int)
    out[np.arange(len(y_true)), y_true.astype(int)] = 1
    return out


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")


def cutoffs(task: str, num_classes: int, thresholds: Sequence[float] | None = None) -> np.ndarray:
    """The cut-offs ``(C,)`` in use: ``thresholds`` checked (one positive value per class; multiclass ones sum to
    1), or the defaults: ``1 / C`` each (multiclass: the argmax), 0.5 each (multilabel)."""
    check_task(task)
    if thresholds is None:
        return np.full(num_classes, 1.0 / num_classes if task == "multiclass" else 0.5)
    cut = np.asarray(thresholds, dtype=float).reshape(-1)
    if cut.shape != (num_classes,):
        raise ValueError(f"thresholds must have one value per class ({num_classes}), got {cut.shape[0]}")
    if not np.isfinite(cut).all() or (cut < 0).any() or (cut > 1).any() or (task == "multiclass" and (cut == 0).any()):
        raise ValueError(f"thresholds must lie in [0, 1] (multiclass cut-offs above 0), got {cut.tolist()}")
    if task == "multiclass" and not np.isclose(cut.sum(), 1.0, atol=1e-6):
        raise ValueError(f"multiclass cut-offs must sum to 1 (uniform 1/C is the argmax), got {cut.tolist()} "
                         f"(sum {cut.sum():.4f}); choose them with select_class_cutoffs")
    return cut


def decision_probabilities(probs: np.ndarray, task: str, thresholds: Sequence[float] | None = None) -> np.ndarray:
    """The probabilities ``(N, C)`` after the prior correction the cut-offs stand for (see the module docstring):
    the decision is their argmax (multiclass) or each class at 0.5 or above (multilabel); the value of the
    decided class is the decision's confidence."""
    probs = np.asarray(probs, dtype=float)
    cut = cutoffs(task, probs.shape[1], thresholds)
    if task == "multiclass":
        scaled = probs / cut[None, :]
        return scaled / np.maximum(scaled.sum(axis=1, keepdims=True), 1e-12)
    positive = probs * (1 - cut[None, :])
    return positive / np.maximum(positive + (1 - probs) * cut[None, :], 1e-12)


def decide(probs: np.ndarray, task: str, thresholds: Sequence[float] | None = None) -> np.ndarray:
    """Decisions: class indices ``(N,)`` (multiclass, ``argmax p / t``) or 0/1 ``(N, C)`` (multilabel, ``p >= t``)."""
    probs = np.asarray(probs, dtype=float)
    cut = cutoffs(task, probs.shape[1], thresholds)
    if task == "multiclass":
        return (probs / cut[None, :]).argmax(axis=1)
    return (probs >= cut[None, :]).astype(int)


def recalls(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class recall (sensitivity) ``(C,)`` of decisions (class indices or 0/1 matrices); NaN for an absent class."""
    truth, pred = one_hot(y_true, num_classes).astype(bool), one_hot(y_pred, num_classes).astype(bool)
    positives = truth.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, (truth & pred).sum(axis=0) / np.maximum(positives, 1), np.nan)


def specificities(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class specificity ``(C,)``: the share of images *not* of the class that are not decided as it."""
    truth, pred = one_hot(y_true, num_classes).astype(bool), one_hot(y_pred, num_classes).astype(bool)
    negatives = (~truth).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(negatives > 0, (~truth & ~pred).sum(axis=0) / np.maximum(negatives, 1), np.nan)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``."""
    values = recalls(y_true, y_pred, num_classes)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def select_class_cutoffs(y_true: np.ndarray, probs: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Multiclass cut-offs ``(C,)`` (summing to 1) with the best balanced accuracy on ``(y_true, probs)``
    (the validation split). Two classes: an exhaustive search over the observed probabilities (the threshold on
    ``p_1`` that maximises Youden's J, placed midway between two neighbouring probabilities; ties go to the cut-off
    nearest 0.5). More classes: coordinate ascent on the log cut-offs, ``rounds`` passes over the classes, each
    trying 41 values from 1/8 to 8 times the current one. A class absent from ``y_true`` keeps its share."""
    y_true, probs = np.asarray(y_true).astype(int), np.asarray(probs, dtype=float)
    n, num_classes = probs.shape
    if n == 0:
        raise ValueError("select_class_cutoffs needs at least one validation image")
    if num_classes == 2:
        return _binary_cutoff(y_true, probs[:, 1])
    weights = np.ones(num_classes)
    best = balanced_accuracy(y_true, (probs * weights).argmax(axis=1), num_classes)
    factors = np.exp(np.linspace(np.log(1 / 8), np.log(8), 41))
    for _ in range(rounds):
        for c in range(num_classes):
            for factor in factors:
                trial = weights.copy()
                trial[c] *= factor
                value = balanced_accuracy(y_true, (probs * trial).argmax(axis=1), num_classes)
                if value > best + 1e-12:
                    best, weights = value, trial
    cut = 1 / weights
    return cut / cut.sum()


def _binary_cutoff(y_true: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """``(1 - s, s)`` with ``s`` the threshold on ``p_1`` of the best Youden's J (see :func:`select_class_cutoffs`)."""
    values = np.unique(p1)
    candidates = np.r_[values[0] / 2, (values[:-1] + values[1:]) / 2, (values[-1] + 1) / 2]
    positives, negatives = (y_true == 1).sum(), (y_true != 1).sum()
    if positives == 0 or negatives == 0:
        return np.array([0.5, 0.5])
    decided = p1[None, :] >= candidates[:, None]
    sensitivity = (decided & (y_true == 1)[None, :]).sum(axis=1) / positives
    specificity = (~decided & (y_true != 1)[None, :]).sum(axis=1) / negatives
    youden = sensitivity + specificity - 1
    best = np.flatnonzero(np.isclose(youden, youden.max()))
    s = float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
    s = min(max(s, 1e-6), 1 - 1e-6)
    return np.array([1 - s, s])
