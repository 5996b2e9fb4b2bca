"""Classification and segmentation metrics against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from segx_helpers.scores.metrics import (accuracy, average_precision, average_ranks, bootstrap_ci, classification_report, dice_score, iou_score, macro_auprc,
                                  macro_auroc, macro_f1, per_class_auroc, predict_labels, select_mask_threshold,
                                  select_thresholds)


def test_macro_auroc_hand_case():
    y = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    # class 1 scores: negatives 0.1, 0.4; positives 0.35, 0.8 -> 3 of 4 pairs ordered -> 0.75, same for class 0
    assert macro_auroc(y, scores) == pytest.approx(0.75)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_per_class_auroc_equals_scikit_learn_with_ties(task):
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, (90, 4)) / 5.0  # six distinct values: many ties
    y = rng.integers(0, 4, 90) if task == "multiclass" else rng.integers(0, 2, (90, 4))
    onehot = np.eye(4, dtype=int)[y] if task == "multiclass" else y
    expected = [roc_auc_score(onehot[:, c], scores[:, c]) for c in range(4)]
    np.testing.assert_allclose(per_class_auroc(y, scores), expected, rtol=0, atol=1e-12)
    onehot[:, 2] = 1  # omnipresent class: undefined
    assert np.isnan(per_class_auroc(onehot, scores)[2]) and np.isfinite(per_class_auroc(onehot, scores)[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match="NaN"):
        per_class_auroc(y, np.where(scores > 0.9, np.nan, scores))


@pytest.mark.parametrize("n, distinct, share", [(90, 6, 0.3), (200, 1000, 0.1), (40, 2, 0.9), (7, 3, 1.0), (1, 1, 1.0)])
def test_average_precision_is_scikit_learns_to_the_last_bit(n, distinct, share):
    """Ties (few distinct scores), a rare and a common positive class, every item positive, one item."""
    rng = np.random.default_rng(n)
    for _ in range(20):
        score = rng.integers(0, distinct, n) / distinct - 0.5
        positive = rng.random(n) < share
        positive[rng.integers(n)] = True
        assert average_precision(positive, score) == average_precision_score(positive.astype(int), score)
        assert average_precision(positive, -score) == average_precision_score(positive.astype(int), -score)
    assert np.isnan(average_precision(np.zeros(n, bool), score))  # no positive: undefined
    with pytest.raises(ValueError, match="NaN"):
        average_precision(positive, np.full(n, np.nan))


def test_average_ranks_are_scipys_with_ties():
    from scipy.stats import rankdata

    rng = np.random.default_rng(5)
    for values in (rng.integers(0, 4, (50, 3)) / 3.0, rng.normal(size=(30, 2)), np.zeros((5, 1)), np.ones((1, 2))):
        np.testing.assert_array_equal(average_ranks(values), rankdata(values, axis=0))


def test_macro_auroc_ignores_absent_classes():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    scores = np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.1]])
    assert macro_auroc(y, scores) == pytest.approx(1.0)


def test_macro_auprc_hand_case():
    y = np.array([[1], [0], [1], [0]])
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    # ranks: TP (P=1), FP, TP (P=2/3) -> AP = (1 + 2/3) / 2
    assert macro_auprc(y, scores) == pytest.approx((1 + 2 / 3) / 2)


def test_f1_and_accuracy():
    assert macro_f1(np.array([0, 1, 1]), np.array([0, 1, 0])) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert accuracy(np.array([[1, 0], [0, 1]]), np.array([[1, 0], [1, 1]])) == 0.5


def test_threshold_maximises_f1():
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.3, 0.35, 0.6, 0.8, 0.7])
    t = select_thresholds(y, s[:, None])[0]
    # candidates: >=0.35 gives TP3 FP2 (F1 0.75); >=0.6 gives TP2 FP1 (0.667); >=0.8 gives 0.5
    assert t == pytest.approx(0.35)
    decisions = predict_labels(s[:, None], "multilabel", [t])[:, 0]
    assert decisions.tolist() == [0, 0, 1, 1, 1, 1]


def test_threshold_absent_class_keeps_default():
    assert select_thresholds(np.zeros((4, 1)), np.random.default_rng(0).random((4, 1)))[0] == 0.5


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    values = rng.normal(0.8, 0.1, 200)
    a = bootstrap_ci(np.mean, values, n_resamples=300, seed=1)
    b = bootstrap_ci(np.mean, values, n_resamples=300, seed=1)
    assert a == b
    point, low, high = a
    assert low < point < high
    assert high - low == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(200), rel=0.3)


def test_classification_report_tables():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    scores = rng.dirichlet(np.ones(3), 120)
    scores[np.arange(120), y] += 0.5
    summary, per_class = classification_report(y, scores / scores.sum(1, keepdims=True), "multiclass", ["a", "b", "c"],
                                               n_resamples=50)
    assert summary["metric"].tolist() == ["macro AUROC", "macro AUPRC", "macro F1", "accuracy", "balanced accuracy"]
    assert (summary["ci_low"] <= summary["value"]).all() and (summary["value"] <= summary["ci_high"]).all()
    assert per_class["support"].sum() == 120


def test_dice_and_iou_hand_case():
    true = np.zeros((2, 4, 4), bool)
    pred = np.zeros((2, 4, 4), bool)
    true[0, :2] = True          # 8 pixels
    pred[0, 1:3] = True         # 8 pixels, overlap 4
    assert dice_score(true, pred)[0] == pytest.approx(0.5)
    assert iou_score(true, pred)[0] == pytest.approx(4 / 12)
    assert dice_score(true, pred)[1] == 1.0 and iou_score(true, pred, empty_value=0.0)[1] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        dice_score(true, pred[:, :3])


def test_mask_threshold_selection():
    true = np.zeros((1, 4, 4), bool)
    true[0, :2] = True
    prob = np.where(true, 0.3, 0.1)
    assert select_mask_threshold(true, prob) == pytest.approx(0.15)


def test_bootstrap_resamples_whole_groups_and_warns_when_unreliable():
    import warnings as _warnings

    from segx_helpers.scores.metrics import BootstrapWarning, bootstrap_ci

    rng = np.random.default_rng(0)
    per_image = rng.random(40)
    values = np.repeat(per_image, 5)                 # 5 identical predictions per image: 40 independent units
    groups = np.repeat(np.arange(40), 5)
    _, low_rows, high_rows = bootstrap_ci(np.mean, values, n_resamples=400)
    _, low_groups, high_groups = bootstrap_ci(np.mean, values, n_resamples=400, groups=groups)
    assert (high_groups - low_groups) > 1.8 * (high_rows - low_rows)   # rows pretend there are 200 units
    with pytest.warns(BootstrapWarning, match="over 4 samples"):
        bootstrap_ci(np.mean, np.arange(4.0), n_resamples=50)
    labels = np.array([0] * 18 + [1] * 2)
    with pytest.warns(BootstrapWarning, match="left the metric undefined"):
        bootstrap_ci(lambda y, s: roc_auc_score(y, s) if 0 < y.sum() < len(y) else np.nan, labels, rng.random(20),
                     n_resamples=200)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        bootstrap_ci(np.mean, rng.random(50), n_resamples=50)      # enough samples: no warning


def test_macro_auroc_can_require_every_class():
    y = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    assert macro_auroc(y, scores, require_all=True) == 1.0
    three = np.column_stack([scores, np.zeros(4)])   # class 2 never occurs: undefined
    assert macro_auroc(y, three) == 1.0 and np.isnan(macro_auroc(y, three, require_all=True))


def test_dice_needs_boolean_masks_or_a_threshold():
    true = np.zeros((1, 4, 4), bool)
    true[0, :2] = True
    prob = np.full((1, 4, 4), 0.01)
    prob[0, :2] = 0.9
    with pytest.raises(ValueError, match="y_pred.*threshold="):
        dice_score(true, prob)
    assert dice_score(true, prob, threshold=0.5)[0] == 1.0
    assert dice_score(true.astype(np.uint8), (prob > 0.5).astype(float))[0] == 1.0
