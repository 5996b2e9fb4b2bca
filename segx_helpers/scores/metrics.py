"""Metrics: classification, segmentation and localisation, with bootstrap confidence intervals.

Signatures follow scikit-learn: ``metric(y_true, y_score)``. Classification scores are class
probabilities ``(N, C)``; multiclass ``y_true`` is ``(N,)`` class indices, multilabel ``(N, C)`` 0/1.
Segmentation and localisation metrics take batches ``(N, H, W)`` and return per-sample ``(N,)``
arrays so that they can be averaged, bootstrapped or paired.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from segx_helpers.scores.decisions import (check_task, cutoffs, decide, one_hot, recalls, select_class_cutoffs,
                                          specificities)
from segx_helpers.scores.saliency import DegenerateMapWarning, check_maps, check_masks, kth_largest_positive, top_percent

# ------------------------------------------------------------------------------ classification


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks ``(N, C)`` of each column of ``values`` ``(N, C)`` from 1, tied values sharing their average rank:
    ``scipy.stats.rankdata(values, axis=0)``'s values, without its per-call overhead."""
    values = np.asarray(values, dtype=float)
    ranks = np.empty_like(values)
    n = len(values)
    for c in range(values.shape[1]):
        order = np.argsort(values[:, c], kind="stable")
        ordered = values[order, c]
        starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]  # the first position of each tied group
        ends = np.r_[starts[1:], n]
        ranks[order, c] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def per_class_auroc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC per class ``(C,)``; NaN for a class absent or omnipresent in ``y_true``.

    The Mann-Whitney form of the area under the ROC curve, all classes at once: the mean rank of the
    positives among all scores (ties share their average rank, so a tied pair counts one half), the value
    scikit-learn's ``roc_auc_score`` gives, without its per-call overhead (bootstraps call this thousands of
    times). Raises ``ValueError`` for NaN or infinite scores."""
    y_score = np.asarray(y_score, dtype=float)
    if y_score.ndim != 2:
        raise ValueError(f"y_score must be (N, C) scores, got shape {y_score.shape}")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score contains NaN or infinite values: AUROC is undefined")
    positive = one_hot(y_true, y_score.shape[1]).astype(bool)
    n_pos = positive.sum(axis=0)
    n_neg = len(positive) - n_pos
    if not len(positive):
        return np.full(y_score.shape[1], np.nan)
    rank_sum = np.where(positive, average_ranks(y_score), 0.0).sum(axis=0)
    defined = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), np.nan)


def average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """Average precision of ``score`` ``(N,)`` for the ``positive`` ``(N,)`` (bool or 0/1) ones: the step integral of
    the precision-recall curve, ``sum_k (R_k - R_{k-1}) P_k`` over the distinct scores from the highest, a tied
    group entering at once. The same arrays and sum as scikit-learn's ``average_precision_score`` (so the same
    value to the last bit: tests/test_metrics_classification.py), without its per-call input checks, which took
    about 95 % of the time in bootstraps that call it thousands of times. NaN when no item is positive."""
    positive = np.asarray(positive).astype(bool)
    score = np.asarray(score, dtype=float)
    if positive.shape != score.shape or score.ndim != 1:
        raise ValueError(f"positive and score must be (N,) arrays of one length, got {positive.shape} and {score.shape}")
    if not np.isfinite(score).all():
        raise ValueError("score contains NaN or infinite values: average precision is undefined")
    if not positive.any():
        return float("nan")
    order = np.argsort(-score, kind="stable")
    score, hits = score[order], positive[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # the last item of each tied group
    true_pos = np.cumsum(hits)[ends]
    false_pos = 1 + ends.astype(np.float64) - true_pos
    precision = np.r_[(true_pos / (true_pos + false_pos))[::-1], 1.0]
    recall = np.r_[(true_pos / true_pos[-1])[::-1], 0.0]
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def per_class_auprc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Average precision per class ``(C,)`` (:func:`average_precision`); NaN for a class absent from ``y_true``."""
    y_score = np.asarray(y_score, dtype=float)
    onehot = one_hot(y_true, y_score.shape[1])
    return np.array([average_precision(onehot[:, c], y_score[:, c]) for c in range(y_score.shape[1])])


def macro_auroc(y_true: np.ndarray, y_score: np.ndarray, require_all: bool = False) -> float:
    """Mean one-vs-rest AUROC over the classes where it is defined; with ``require_all`` NaN unless it
    is defined for every class (so a bootstrap resample that lacks a class is dropped and counted,
    instead of silently averaging over fewer classes)."""
    values = per_class_auroc(y_true, y_score)
    if require_all and not np.isfinite(values).all():
        return float("nan")
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def macro_auprc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Mean average precision over the classes present in ``y_true``."""
    values = per_class_auprc(y_true, y_score)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def predict_labels(y_score: np.ndarray, task: str, thresholds: Sequence[float] | None = None) -> np.ndarray:
    """Decisions from scores with the stored cut-offs: class indices ``(N,)`` (multiclass: ``argmax p / t``, the
    argmax without cut-offs) or 0/1 ``(N, C)`` (multilabel: ``p >= t``, 0.5 without); see
    :mod:`segx_helpers.scores.decisions`."""
    return decide(y_score, task, thresholds)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 of decisions (class indices or 0/1 matrices)."""
    y_true = np.asarray(y_true)
    if y_true.ndim == 1:
        return float(f1_score(y_true, y_pred, average="macro", labels=np.unique(np.concatenate([y_true, y_pred])),
                              zero_division=0))
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of exactly right decisions (subset accuracy for multilabel)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim == 1:
        return float((y_true == y_pred).mean())
    return float((y_true == y_pred).all(axis=1).mean())


def select_thresholds(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Per-class decision thresholds ``(C,)`` maximising F1 on the given (validation) data.

    Candidate thresholds are the observed scores; ties in F1 go to the higher threshold. A class
    absent from ``y_true`` keeps 0.5.
    """
    y_score = np.asarray(y_score, dtype=float)
    onehot = one_hot(y_true, y_score.shape[1])
    thresholds = np.full(y_score.shape[1], 0.5)
    for c in range(y_score.shape[1]):
        positives = onehot[:, c].sum()
        if positives == 0:
            continue
        order = np.argsort(-y_score[:, c], kind="stable")
        sorted_scores = y_score[order, c]
        true_pos = np.cumsum(onehot[order, c])
        predicted = np.arange(1, len(order) + 1)
        f1 = 2 * true_pos / (predicted + positives)
        last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
        f1 = np.where(last_of_tie, f1, -1)
        thresholds[c] = sorted_scores[int(np.argmax(f1))]
    return thresholds


def select_decision_thresholds(y_true: np.ndarray, y_score: np.ndarray, task: str) -> np.ndarray:
    """The cut-offs ``(C,)`` a classifier's checkpoint stores, chosen on the validation split: multiclass
    cut-offs for the best balanced accuracy (:func:`segx_helpers.scores.decisions.select_class_cutoffs`; Youden's J
    for two classes), multilabel thresholds for the best F1 per class (:func:`select_thresholds`, as the
    reference code)."""
    check_task(task)
    if task == "multiclass":
        return select_class_cutoffs(y_true, y_score)
    return select_thresholds(y_true, y_score)


class BootstrapWarning(UserWarning):
    """A bootstrap interval is unreliable: too few samples, or many resamples where the metric was undefined."""


def bootstrap_ci(metric: Callable[..., float], *arrays: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95, groups: np.ndarray | None = None) -> tuple[float, float, float]:
    """``(point estimate, low, high)``: percentile bootstrap over rows of ``arrays`` (resampled together).

    ``groups`` ``(N,)``: resample whole groups instead of rows (e.g. the image id of each prediction in
    a multi-label run, so that the predictions of one image stay together; resampling rows would make
    the interval too narrow). Resamples where the metric is undefined (NaN, e.g. one class only) are
    dropped; when more than 5 % are, a :class:`BootstrapWarning` says how many. Fewer than 10 rows (or
    groups) also warn: such an interval means little.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci: all arrays need the same number of rows")
    point = float(metric(*arrays))
    rng = np.random.default_rng(seed)
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError(f"bootstrap_ci: groups has {len(groups)} entries for {n} rows")
        _, inverse = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)] if n else []
    units = len(members) if groups is not None else n
    if units < 10:
        warnings.warn(f"bootstrap over {units} {'groups' if groups is not None else 'samples'}: the interval is unreliable",
                      BootstrapWarning, stacklevel=2)
    values = []
    for _ in range(n_resamples):
        picked = rng.integers(0, units, units) if units else np.zeros(0, int)
        rows = np.concatenate([members[g] for g in picked]) if groups is not None and units else picked
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = metric(*(a[rows] for a in arrays))
        if np.isfinite(value):
            values.append(value)
    dropped = n_resamples - len(values)
    if dropped > 0.05 * n_resamples:
        warnings.warn(f"{dropped} of {n_resamples} bootstrap resamples left the metric undefined (e.g. a class "
                      "missing) and were dropped: the interval is conditional on the others", BootstrapWarning,
                      stacklevel=2)
    if not values:
        return point, float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return point, float(low), float(high)


def classification_report(y_true: np.ndarray, y_score: np.ndarray, task: str, class_names: Sequence[str],
                          thresholds: Sequence[float] | None = None, n_resamples: int = 1000,
                          seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Summary table (metric, value, 95 % CI) and per-class table (AUROC, AUPRC, F1, sensitivity, specificity, share
    of images decided as the class, its cut-off, support); decisions use the stored cut-offs ``thresholds``."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    cut = None if thresholds is None else np.asarray(thresholds)

    def f1(t, s):
        return macro_f1(t, predict_labels(s, task, cut))

    defined = np.isfinite(per_class_auroc(y_true, y_score))

    def auroc(t, s):  # the classes defined on the full sample must all be defined in a resample
        values = per_class_auroc(t, s)
        return float(np.mean(values[defined])) if defined.any() and np.isfinite(values[defined]).all() else float("nan")

    metrics: dict[str, Callable] = {"macro AUROC": auroc, "macro AUPRC": macro_auprc, "macro F1": f1}
    if task == "multiclass":
        metrics["accuracy"] = lambda t, s: accuracy(t, predict_labels(s, task, cut))
        metrics["balanced accuracy"] = lambda t, s: float(np.nanmean(recalls(t, predict_labels(s, task, cut),
                                                                             s.shape[1])))
    rows = []
    for name, fn in metrics.items():
        value, low, high = bootstrap_ci(fn, y_true, y_score, n_resamples=n_resamples, seed=seed)
        rows.append({"metric": name, "value": value, "ci_low": low, "ci_high": high})
    onehot = one_hot(y_true, y_score.shape[1])
    decisions = one_hot(predict_labels(y_score, task, cut), y_score.shape[1])
    per_class = pd.DataFrame({
        "class": list(class_names), "AUROC": per_class_auroc(y_true, y_score), "AUPRC": per_class_auprc(y_true, y_score),
        "F1": [f1_score(onehot[:, c], decisions[:, c], zero_division=0) for c in range(len(class_names))],
        "sensitivity": recalls(y_true, decisions, y_score.shape[1]),
        "specificity": specificities(y_true, decisions, y_score.shape[1]),
        "predicted share": decisions.mean(axis=0),
        "cut-off": cutoffs(task, y_score.shape[1], cut),
        "support": onehot.sum(axis=0),
    })
    return pd.DataFrame(rows), per_class


MIN_RECALL = 0.2
MIN_CLASS_IMAGES = 10
DECIDES_RULE = (f"a classifier decides when (1) every class with at least {MIN_CLASS_IMAGES} test images is "
                f"recognised in at least {MIN_RECALL:.0%} of them (its recall: no class is ignored), (2) the 95 % "
                "bootstrap interval of its test macro AUROC lies above 0.5, and (3) its macro AUROC is above that of "
                "every one-feature baseline the data offers (e.g. the lesion's area; on the trap sets each annotated "
                "artefact), each baseline oriented on the validation split")
"""Why it matters: a classifier that calls almost every image benign makes "incorrect" mean "malignant", and SegU's
tables then measure whatever separates the classes (lesion size), not SegU."""


def oriented_auroc(feature_val: np.ndarray, y_val: np.ndarray, feature_test: np.ndarray, y_test: np.ndarray,
                   num_classes: int) -> float:
    """Macro one-vs-rest test AUROC of one feature ``(N,)`` (e.g. the lesion's area), each class's direction
    (higher or lower means the class) taken from the validation split, never from the test split itself."""
    val = np.repeat(np.asarray(feature_val, dtype=float)[:, None], num_classes, axis=1)
    test = np.repeat(np.asarray(feature_test, dtype=float)[:, None], num_classes, axis=1)
    sign = np.where(per_class_auroc(y_val, val) < 0.5, -1.0, 1.0)
    values = per_class_auroc(y_test, test * sign[None, :])
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


@dataclass
class DecidesCheck:
    """The answer of :func:`decides_check`: ``decides`` and the ``reasons`` it fails (empty when it decides), the
    test macro ``auroc`` with its 95 % interval, ``baseline_auroc`` ({feature: AUROC}), ``predicted_share``
    ({class: share of test images decided as it}), ``sensitivity`` and ``specificity`` ({class: value}), and the
    ``thresholds`` (cut-offs) of the decision."""

    decides: bool
    reasons: list[str]
    auroc: tuple[float, float, float]
    baseline_auroc: dict[str, float]
    predicted_share: dict[str, float]
    sensitivity: dict[str, float]
    specificity: dict[str, float]
    thresholds: list[float] = field(default_factory=list)

    def verdict(self) -> str:
        """One line: "decides" or why not, with the consequence for SegU."""
        if self.decides:
            return "The classifier decides: its SegU tables are a valid test of SegU."
        return ("The classifier does not decide (" + "; ".join(self.reasons) + "): its SegU tables are **not a valid "
                "test of SegU** (they measure what separates the classes, e.g. lesion size, not SegU).")

    def summary(self) -> dict:
        """The ``classifier`` fields of ``outputs/summary.json``."""
        return {"decides": bool(self.decides), "decides_reasons": list(self.reasons),
                "thresholds": [float(t) for t in self.thresholds], "predicted_share": dict(self.predicted_share),
                "baseline_auroc": dict(self.baseline_auroc), "sensitivity": dict(self.sensitivity),
                "specificity": dict(self.specificity)}


@dataclass(frozen=True)
class Baseline:
    """One feature per image that might separate the classes on its own (``(N,)`` on the validation and the test
    split, in the order of their labels): the lesion's area, an annotated artefact's 0/1 flag."""

    validation: np.ndarray
    test: np.ndarray


def decides_check(y_true: np.ndarray, probs: np.ndarray, task: str, class_names: Sequence[str],
                  thresholds: Sequence[float] | None = None, baselines: dict[str, Baseline] | None = None,
                  validation_labels: np.ndarray | None = None, n_resamples: int = 1000) -> DecidesCheck:
    """Does the classifier decide on this (test) split? :data:`DECIDES_RULE`, on labels ``y_true`` and
    probabilities ``probs`` ``(N, C)`` with the stored ``thresholds``; ``baselines`` need ``validation_labels``
    (the validation split's labels, to orient each feature)."""
    check_task(task)
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    num_classes = probs.shape[1]
    predicted = decide(probs, task, thresholds)
    decided = one_hot(predicted, num_classes)
    truth = one_hot(y_true, num_classes)
    sens, spec = recalls(y_true, predicted, num_classes), specificities(y_true, predicted, num_classes)
    auroc = bootstrap_ci(macro_auroc, y_true, probs, n_resamples=n_resamples, seed=0)
    baseline_auroc = {}
    for name, feature in (baselines or {}).items():
        if validation_labels is None:
            raise ValueError("decides_check: baselines need validation_labels to orient each feature")
        baseline_auroc[name] = oriented_auroc(feature.validation, validation_labels, feature.test, y_true, num_classes)
    reasons = []
    ignored = [name for c, name in enumerate(class_names)
               if truth[:, c].sum() >= MIN_CLASS_IMAGES and sens[c] < MIN_RECALL]
    if ignored:
        reasons.append(f"recall below {MIN_RECALL:.0%} for {', '.join(ignored)}")
    if not auroc[1] > 0.5:
        reasons.append(f"test macro AUROC {auroc[0]:.3f} [{auroc[1]:.3f}, {auroc[2]:.3f}] is not above chance")
    beaten_by = [f"{name} ({value:.3f})" for name, value in baseline_auroc.items() if value >= auroc[0]]
    if beaten_by:
        reasons.append(f"AUROC {auroc[0]:.3f} is not above the one-feature baseline " + ", ".join(beaten_by))
    names = list(class_names)
    return DecidesCheck(not reasons, reasons, auroc, baseline_auroc,
                        {n: float(v) for n, v in zip(names, decided.mean(axis=0))},
                        {n: float(v) for n, v in zip(names, sens)}, {n: float(v) for n, v in zip(names, spec)},
                        cutoffs(task, num_classes, thresholds).tolist())


# ------------------------------------------------------------------------------ segmentation


def _as_batch(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {a.shape}")
    return a


def _check_pair(pred: np.ndarray, true: np.ndarray, names=("y_pred", "y_true")) -> tuple[np.ndarray, np.ndarray]:
    pred, true = _as_batch(pred, names[0]), _as_batch(true, names[1])
    if pred.shape != true.shape:
        raise ValueError(f"{names[0]} {pred.shape} and {names[1]} {true.shape} must have the same shape (N, H, W)")
    return pred, true


def _binary_mask(a: np.ndarray, name: str, threshold: float | None) -> np.ndarray:
    if a.dtype == bool:
        return a
    if threshold is not None:
        return a >= threshold
    if ((a == 0) | (a == 1)).all():
        return a.astype(bool)
    raise ValueError(f"{name} is not a binary mask (it has values other than 0 and 1, e.g. probabilities): pass "
                     "threshold= (e.g. 0.5, foreground where >= threshold) or binarise it first (prob >= t).")


def dice_score(y_true: np.ndarray, y_pred: np.ndarray, empty_value: float = 1.0,
               threshold: float | None = None) -> np.ndarray:
    """Per-image Dice ``2|A∩B| / (|A|+|B|)`` of binary masks ``(N, H, W)``; ``empty_value`` when both are empty.

    Masks must be boolean or hold only 0 and 1; other values (probabilities) are refused unless
    ``threshold`` is given, which binarises every non-boolean input as ``value >= threshold``.
    """
    pred, true = _check_pair(y_pred, y_true)
    pred, true = _binary_mask(pred, "y_pred", threshold), _binary_mask(true, "y_true", threshold)
    inter = (pred & true).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + true.sum(axis=(1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), empty_value).astype(float)


def iou_score(y_true: np.ndarray, y_pred: np.ndarray, empty_value: float = 1.0) -> np.ndarray:
    """Per-image IoU ``|A∩B| / |A∪B|`` of binary masks ``(N, H, W)``; ``empty_value`` when both are empty."""
    pred, true = _check_pair(y_pred, y_true)
    pred, true = pred.astype(bool), true.astype(bool)
    inter = (pred & true).sum(axis=(1, 2))
    union = (pred | true).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), empty_value).astype(float)


def select_mask_threshold(y_true: np.ndarray, y_prob: np.ndarray,
                          candidates: Sequence[float] = tuple(np.round(np.arange(0.1, 0.91, 0.05), 2))) -> float:
    """Probability threshold (among ``candidates``) with the best mean Dice on validation masks."""
    scores = [dice_score(y_true, np.asarray(y_prob) >= t).mean() for t in candidates]
    best = float(candidates[int(np.argmax(scores))])
    return best


@dataclass
class SegmentationSummary:
    """Mean Dice and IoU with their bootstrap CIs."""

    dice: tuple[float, float, float]
    iou: tuple[float, float, float]

    def as_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"metric": "Dice", "value": self.dice[0], "ci_low": self.dice[1], "ci_high": self.dice[2]},
                             {"metric": "IoU", "value": self.iou[0], "ci_low": self.iou[1], "ci_high": self.iou[2]}])


def segmentation_summary(y_true: np.ndarray, y_pred: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> SegmentationSummary:
    """Mean per-image Dice and IoU of binary masks with bootstrap CIs."""
    return SegmentationSummary(dice=bootstrap_ci(np.mean, dice_score(y_true, y_pred), n_resamples=n_resamples, seed=seed),
                               iou=bootstrap_ci(np.mean, iou_score(y_true, y_pred), n_resamples=n_resamples, seed=seed))


# ------------------------------------------------------------------------------ localisation
# Maps are non-negative attributions (N, H, W); masks are the ground-truth clinical region (N, H, W).
# A map with no positive value, or an empty mask, gets the documented value 0.0 and a warning.


def localisation_inputs(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked maps ``(N, H, W)`` and boolean masks of their shape (a non-boolean mask is read as ``>= 0.5``), as
    every localisation score and SegU score takes them."""
    maps = check_maps(maps)
    masks = check_masks(masks, maps.shape)
    return maps, (masks >= 0.5) if masks.dtype != bool else masks


def warn_degenerate(flags: np.ndarray, what: str, value: float = 0.0) -> None:
    """One :class:`DegenerateMapWarning` saying how many samples (``flags`` ``(N,)`` bool) have ``what`` and the
    ``value`` their score is set to; nothing when none has."""
    if flags.any():
        warnings.warn(f"{int(flags.sum())} sample(s) have {what}; their score is set to {value}",
                      DegenerateMapWarning, stacklevel=3)


def relevance_mass(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of the (positive) attribution inside the mask, ``sum(a * m) / sum(a)``, per sample ``(N,)``."""
    maps, masks = localisation_inputs(maps, masks)
    total = maps.sum(axis=(1, 2), dtype=np.float64)
    inside = (maps * masks).sum(axis=(1, 2), dtype=np.float64)
    warn_degenerate(total <= 0, "an all-zero map")
    return np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0)


def relevance_rank_accuracy(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of the ``K = |mask|`` highest-ranked pixels that fall inside the mask ``(N,)``.

    Pixels tied with the K-th value count in expectation (as if ties were ordered at random).
    """
    maps, masks = localisation_inputs(maps, masks)
    n = len(maps)
    flat = maps.reshape(n, -1)
    flat_masks = masks.reshape(n, -1)
    sizes = np.count_nonzero(flat_masks, axis=1)
    valid = (sizes > 0) & (flat.max(axis=1) > 0)
    warn_degenerate(~valid, "an empty mask or an all-zero map")
    out = np.zeros(n)
    rows = np.flatnonzero(valid)
    if len(rows):
        values, inside_mask, k = flat[rows], flat_masks[rows], sizes[rows]
        kth = kth_largest_positive(values, k)[:, None]
        positive = values > 0
        above = positive & (values > kth)
        tied = np.where(kth > 0, values == kth, ~positive)
        from_ties = k - np.count_nonzero(above, axis=1)
        inside = (np.count_nonzero(above & inside_mask, axis=1)
                  + from_ties * np.count_nonzero(tied & inside_mask, axis=1) / np.count_nonzero(tied, axis=1))
        out[rows] = inside / k
    return out


def pointing_game(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """1.0 where a maximal pixel of the map lies inside the mask, else 0.0 ``(N,)`` (as in Quantus)."""
    maps, masks = localisation_inputs(maps, masks)
    peak = maps.max(axis=(1, 2), keepdims=True)
    hit = ((maps == peak) & masks).any(axis=(1, 2))
    valid = peak[:, 0, 0] > 0
    warn_degenerate(~valid, "an all-zero map")
    return np.where(valid, hit, False).astype(float)


def top_percent_iou(maps: np.ndarray, masks: np.ndarray, p: float = 5.0) -> np.ndarray:
    """IoU of each map's top-``p`` % saliency region with the mask ``(N,)`` (0.0 when both are empty)."""
    maps, masks = localisation_inputs(maps, masks)
    return iou_score(masks, top_percent(maps, p), empty_value=0.0)


def auitc(maps: np.ndarray, masks: np.ndarray, n_thresholds: int = 101) -> np.ndarray:
    """Area under the IoU–threshold curve ``(N,)`` (the paper's AUITC, Eq. 12; against the predicted
    mask it is SegU's ``c_AUITC``, Eq. 10).

    Each map is min-max scaled to [0, 1] (a constant positive map becomes all ones); at each
    threshold ``τ_j = j / (n_thresholds - 1)`` the region ``scaled >= τ`` is compared with
    the mask by IoU, and the curve is integrated with the trapezoid rule. The error of the grid falls
    as ``1 / n_thresholds`` (tested; docs/NOTES.md gives it for 101 thresholds on the tutorial's maps). This is
    the plain reference, one pass per threshold; :mod:`segx_helpers.scores.analysis` computes it from one
    histogram per map.
    """
    maps, masks = localisation_inputs(maps, masks)
    if n_thresholds < 2:
        raise ValueError(f"n_thresholds must be at least 2, got {n_thresholds}")
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    scaled = np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 1.0).astype(np.float32)
    taus = np.arange(n_thresholds, dtype=np.float32) / np.float32(n_thresholds - 1)  # j / (n - 1), float32
    curve = np.stack([iou_score(masks, scaled >= tau, empty_value=0.0) for tau in taus], axis=1)
    return ((curve[:, 1:] + curve[:, :-1]) / 2).sum(axis=1) / (n_thresholds - 1)


def energy_pointing_game(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Energy-based pointing game (Score-CAM paper): the share of the min-max normalised map's energy
    inside the mask ``(N,)``. Unlike :func:`relevance_mass` the map is shifted by its minimum first."""
    maps, masks = localisation_inputs(maps, masks)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    valid = span[:, 0, 0] > 0
    warn_degenerate(~valid, "a constant map")
    normalised = np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0)
    total = normalised.sum(axis=(1, 2), dtype=np.float64)
    inside = (normalised * masks).sum(axis=(1, 2), dtype=np.float64)
    return np.where(valid, inside / np.where(total > 0, total, 1), 0.0)


def localisation_scores(maps: np.ndarray, masks: np.ndarray, p: float = 5.0) -> pd.DataFrame:
    """Every localisation metric per sample: a frame with one column per metric, ``N`` rows
    (the top-p % region is computed once and shared by the IoU and Dice columns, named after ``p``:
    ``top-5% IoU`` for ``p = 5``)."""
    maps, masks = localisation_inputs(maps, masks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        top = top_percent(maps, p)
        return pd.DataFrame({"relevance mass": relevance_mass(maps, masks),
                             "relevance rank": relevance_rank_accuracy(maps, masks),
                             "pointing game": pointing_game(maps, masks),
                             f"top-{p:g}% IoU": iou_score(masks, top, empty_value=0.0),
                             f"top-{p:g}% Dice": dice_score(masks, top, empty_value=0.0),
                             "energy pointing game": energy_pointing_game(maps, masks)})


def paired_summary(original: pd.DataFrame, aligned: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean (95 % bootstrap CI) per metric for original and SegX maps, and their paired difference."""
    rows = []
    for metric in original.columns:
        a, b = original[metric].to_numpy(), aligned[metric].to_numpy()
        row = {"metric": metric}
        for label, values in (("original", a), ("SegX", b), ("difference", b - a)):
            mean, low, high = bootstrap_ci(np.mean, values, n_resamples=n_resamples, seed=seed)
            row[label] = f"{mean:.3f} [{low:.3f}, {high:.3f}]"
            row[f"{label}_mean"] = mean
        rows.append(row)
    return pd.DataFrame(rows)
