"""Selective prediction: does a certainty score separate correct from incorrect predictions, and what
does abstaining on its lowest values buy?

:func:`separation` (Mann-Whitney U, rank-biserial correlation, AUROC and AUPRC of a *low* score for the
errors, with bootstrap CIs) and its tables (:func:`separation_table`, :func:`separation_by_error_type` over
the shortcut's error taxonomy :func:`error_types`); the risk-coverage curve (:func:`risk_coverage`) and
its areas :func:`aurc` and :func:`augrc`; and a logistic combination of two scores fitted on validation
(:func:`fit_combination`, :func:`combined_confidence`). Scores are any per-prediction certainty, e.g.
:mod:`segx_helpers.scores.segu`'s or the classifier's confidence: ``correct`` ``(N,)`` bool and a score
``(N,)`` float, higher meaning more certain.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression

from segx_helpers.scores.metrics import average_precision, bootstrap_ci, per_class_auroc


def separation(correct: np.ndarray, certainty: np.ndarray, n_resamples: int = 1000, seed: int = 0,
               groups: np.ndarray | None = None) -> dict:
    """How well a certainty score separates correct from incorrect predictions.

    Returns the Mann-Whitney U test (two-sided p-value), its effect size as the rank-biserial
    correlation (``2 * AUC - 1``, positive when correct predictions score higher), and the AUROC
    and AUPRC of *low* certainty for detecting *incorrect* predictions, each with a bootstrap CI.
    ``groups`` ``(N,)`` (e.g. image ids): the bootstrap resamples whole groups, as it must when one
    image has several predictions (multi-label). A single outcome gives NaN statistics and a warning.
    """
    correct = np.asarray(correct, dtype=bool)
    certainty = np.asarray(certainty, dtype=float)
    if correct.all() or not correct.any():
        warnings.warn(f"separation needs both correct and incorrect predictions, got {int(correct.sum())} correct and "
                      f"{int((~correct).sum())} incorrect: every statistic is NaN", UserWarning, stacklevel=2)
        nan = float("nan")
        return {"n_correct": int(correct.sum()), "n_incorrect": int((~correct).sum()), "mann_whitney_u": nan,
                "p_value": nan, "rank_biserial": nan, "auroc": nan, "auroc_low": nan, "auroc_high": nan,
                "auprc": nan, "auprc_low": nan, "auprc_high": nan, "error_rate": float((~correct).mean()) if len(correct) else nan}
    u, p_value = stats.mannwhitneyu(certainty[correct], certainty[~correct], alternative="two-sided")
    auc_correct = u / (correct.sum() * (~correct).sum())
    wrong = (~correct).astype(int)

    def auroc(y, s):
        return per_class_auroc(y, -s[:, None])[0]

    def auprc(y, s):
        return average_precision(y, -s)

    auroc_ci = bootstrap_ci(auroc, wrong, certainty, n_resamples=n_resamples, seed=seed, groups=groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the AUROC call above already warned about the same resamples
        auprc_ci = bootstrap_ci(auprc, wrong, certainty, n_resamples=n_resamples, seed=seed, groups=groups)
    return {"n_correct": int(correct.sum()), "n_incorrect": int((~correct).sum()), "mann_whitney_u": float(u),
            "p_value": float(p_value), "rank_biserial": float(2 * auc_correct - 1),
            "auroc": auroc_ci[0], "auroc_low": auroc_ci[1], "auroc_high": auroc_ci[2],
            "auprc": auprc_ci[0], "auprc_low": auprc_ci[1], "auprc_high": auprc_ci[2],
            "error_rate": float((~correct).mean())}


ERROR_TYPES = ("correct", "artefact present", "artefact absent", "other error")


def error_types(correct: np.ndarray, predicted_class: np.ndarray, true_class: np.ndarray, artefact: np.ndarray,
                shortcut_class: str) -> np.ndarray:
    """Each prediction's place in the shortcut's error taxonomy ``(N,)``:

    * ``"artefact present"``: wrong, the artefact is in the image and the model called the class the
      artefact goes with (ink on a naevus -> melanoma): evidence that *is* in the image, outside the
      lesion, which SegU can see;
    * ``"artefact absent"``: wrong, the image is of the shortcut class but has no artefact, and the model
      called something else (a melanoma without ink -> naevus): the evidence is an *absence*, and no map
      can point at what is not there;
    * ``"other error"``: every other wrong prediction; ``"correct"`` otherwise.
    """
    correct, artefact = np.asarray(correct, bool), np.asarray(artefact, bool)
    predicted_class, true_class = np.asarray(predicted_class), np.asarray(true_class)
    kind = np.full(len(correct), "other error", dtype=object)
    kind[~correct & artefact & (predicted_class == shortcut_class)] = "artefact present"
    kind[~correct & ~artefact & (true_class == shortcut_class)] = "artefact absent"
    kind[correct] = "correct"
    return kind


def separation_by_error_type(table: pd.DataFrame, scores: list[str], n_resamples: int = 1000,
                             seed: int = 0) -> pd.DataFrame:
    """:func:`separation` of each score for correct predictions vs each error type (``table`` needs an
    ``error_type`` column from :func:`error_types`) and vs all errors. One row per (errors, score)."""
    rows = []
    kinds = ["all errors"] + [k for k in ERROR_TYPES[1:] if (table["error_type"] == k).any()]
    for kind in kinds:
        part = table if kind == "all errors" else table[table["error_type"].isin(["correct", kind])]
        for score in scores:
            result = separation(part["correct"].to_numpy(), part[score].to_numpy(), n_resamples=n_resamples, seed=seed,
                                groups=_image_groups(part))
            rows.append({"errors": kind, "certainty": score, **result})
    return pd.DataFrame(rows)


def risk_coverage(correct: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective prediction: keep the most confident first. Returns ``(coverage, risk)`` ``(N,)``.

    ``risk[k-1]`` is the expected error rate among the ``k`` most confident predictions; within a
    group of tied confidences errors are spread evenly (the expectation over tie orders), so the
    curve does not depend on an arbitrary ordering.
    """
    correct = np.asarray(correct, dtype=bool)
    confidence = np.asarray(confidence, dtype=float)
    n = len(correct)
    if n == 0:
        raise ValueError("risk_coverage needs at least one prediction")
    order = np.argsort(-confidence, kind="stable")
    conf_sorted = confidence[order]
    errors_sorted = (~correct[order]).astype(float)
    _, group_start, group_size = np.unique(-conf_sorted, return_index=True, return_counts=True)
    expected = np.empty(n)
    for start, size in zip(group_start, group_size):
        expected[start:start + size] = errors_sorted[start:start + size].mean()
    cumulative = np.cumsum(expected)
    k = np.arange(1, n + 1)
    return k / n, cumulative / k


def aurc(correct: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean of ``risk`` over coverages ``1/N .. 1`` (lower is better)."""
    return float(risk_coverage(correct, confidence)[1].mean())


def augrc(correct: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the generalised risk-coverage curve (Traub et al. 2024): the mean over coverages
    ``k/N`` of the share of *all* predictions that are accepted and wrong (errors among the ``k`` most
    confident, ties spread evenly, divided by ``N``). Lower is better; unlike AURC it does not
    over-weight the few most confident predictions."""
    coverage, risk = risk_coverage(correct, confidence)
    return float((risk * coverage).mean())


def fit_combination(certainty_val: np.ndarray, confidence_val: np.ndarray, correct_val: np.ndarray) -> LogisticRegression:
    """A logistic model of correctness from (SegU certainty, classifier confidence), fitted on validation only."""
    features = np.column_stack([certainty_val, confidence_val])
    correct_val = np.asarray(correct_val, dtype=int)
    if correct_val.min() == correct_val.max():
        raise ValueError("the validation predictions are all correct (or all wrong): nothing to fit")
    return LogisticRegression(C=1.0).fit(features, correct_val)


def combined_confidence(model: LogisticRegression, certainty: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Probability of being correct under a fitted :func:`fit_combination` model ``(N,)``."""
    return model.predict_proba(np.column_stack([certainty, confidence]))[:, 1]


def _image_groups(table: pd.DataFrame) -> np.ndarray | None:
    """Image ids when some image has several predictions (then the bootstrap resamples images), else None."""
    if "image_id" in table and table["image_id"].duplicated().any():
        return table["image_id"].to_numpy()
    return None


def separation_table(table: pd.DataFrame, scores: list[str], group: str | None = None, n_resamples: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """:func:`separation` for several score columns of a per-prediction table (needs a ``correct``
    column), optionally per ``group`` (e.g. method). One row per (group, score)."""
    rows = []
    groups = table.groupby(group, sort=False) if group else [("all", table)]
    for name, part in groups:
        for score in scores:
            result = separation(part["correct"].to_numpy(), part[score].to_numpy(), n_resamples=n_resamples, seed=seed,
                                groups=_image_groups(part))
            rows.append({"group": name, "certainty": score, **result})
    return pd.DataFrame(rows)
