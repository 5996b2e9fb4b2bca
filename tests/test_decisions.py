"""Decisions chosen on validation (cut-offs), the confidence of a decision, and the "does it decide?" check."""
from __future__ import annotations

import numpy as np
import pytest

from segx_helpers.scores.decisions import (balanced_accuracy, cutoffs, decide, decision_probabilities, recalls,
                                           select_class_cutoffs, specificities)
from segx_helpers.scores.metrics import (Baseline, classification_report, decides_check, oriented_auroc,
                                         select_decision_thresholds)


def _binary(n=400, seed=0, prevalence=0.2, shift=1.0, bias=-2.0):
    """Labels and softmax probabilities of a classifier that ranks well but is calibrated towards the majority."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    logit = rng.normal(size=n) + shift * y + bias
    p1 = 1 / (1 + np.exp(-logit))
    return y, np.stack([1 - p1, p1], axis=1)


def test_uniform_cutoffs_are_the_argmax_and_the_probabilities_unchanged():
    probs = np.random.default_rng(1).dirichlet(np.ones(4), size=50)
    assert (decide(probs, "multiclass") == probs.argmax(1)).all()
    assert np.allclose(decision_probabilities(probs, "multiclass"), probs)
    assert np.allclose(decision_probabilities(probs, "multilabel", [0.5] * 4), probs)


def test_a_two_class_cutoff_is_a_threshold_on_the_positive_probability():
    y, probs = _binary()
    cut = np.array([0.9, 0.1])
    assert (decide(probs, "multiclass", cut) == (probs[:, 1] >= 0.1)).all()
    q = decision_probabilities(probs, "multiclass", cut)
    at_cut = decision_probabilities(np.array([[0.9, 0.1]]), "multiclass", cut)
    assert np.allclose(at_cut, 0.5)
    # the confidence of the decision ranks each side by its distance from the cut-off
    positive = probs[:, 1] >= 0.1
    order = np.argsort(probs[positive, 1])
    assert (np.diff(q[positive, 1][order]) >= -1e-12).all()
    assert (q[np.arange(len(q)), decide(probs, "multiclass", cut)] >= 0.5 - 1e-12).all()


def test_youden_cutoff_matches_a_brute_force_search_and_rescues_an_imbalanced_classifier():
    y, probs = _binary()
    cut = select_class_cutoffs(y, probs)
    assert cut.sum() == pytest.approx(1.0)
    grid = np.unique(probs[:, 1])
    best = max(balanced_accuracy(y, (probs[:, 1] >= t).astype(int), 2) for t in grid)
    assert balanced_accuracy(y, decide(probs, "multiclass", cut), 2) == pytest.approx(best)
    argmax_recall = recalls(y, probs.argmax(1), 2)
    assert argmax_recall[1] < 0.2  # argmax calls almost everything the majority class
    assert recalls(y, decide(probs, "multiclass", cut), 2)[1] > 0.5


def test_multiclass_cutoffs_raise_balanced_accuracy_on_the_data_they_were_chosen_on():
    rng = np.random.default_rng(2)
    y = rng.choice(3, size=600, p=[0.7, 0.2, 0.1])
    logits = rng.normal(size=(600, 3)) + np.eye(3)[y] * 1.5 + np.log([0.7, 0.2, 0.1])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cut = select_class_cutoffs(y, probs)
    assert cut.shape == (3,) and cut.sum() == pytest.approx(1.0)
    assert balanced_accuracy(y, decide(probs, "multiclass", cut), 3) > balanced_accuracy(y, probs.argmax(1), 3) + 0.05
    assert select_decision_thresholds(y, probs, "multiclass").tolist() == pytest.approx(cut.tolist())


def test_bad_cutoffs_are_refused_by_name():
    with pytest.raises(ValueError, match="sum to 1"):
        cutoffs("multiclass", 2, [0.5, 0.7])
    with pytest.raises(ValueError, match="one value per class"):
        cutoffs("multilabel", 3, [0.5, 0.5])
    with pytest.raises(ValueError, match="task"):
        cutoffs("regression", 2)


def test_sensitivity_and_specificity_per_class():
    y = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 1, 0, 1, 0])
    assert recalls(y, pred, 2).tolist() == pytest.approx([2 / 3, 1 / 2])
    assert specificities(y, pred, 2).tolist() == pytest.approx([1 / 2, 2 / 3])


def test_the_report_uses_the_stored_cutoffs():
    y, probs = _binary()
    cut = select_class_cutoffs(y, probs)
    summary, per_class = classification_report(y, probs, "multiclass", ["benign", "malignant"], thresholds=cut,
                                               n_resamples=20)
    values = summary.set_index("metric")["value"]
    assert values["balanced accuracy"] == pytest.approx(balanced_accuracy(y, decide(probs, "multiclass", cut), 2))
    assert per_class.set_index("class").loc["malignant", "predicted share"] == pytest.approx(
        (decide(probs, "multiclass", cut) == 1).mean())


def test_a_classifier_that_calls_every_image_benign_does_not_decide():
    """Issue 32: a classifier that predicts one class fails the check, and the verdict says "not a valid test"."""
    y, probs = _binary(shift=2.0, bias=-4.0)
    check = decides_check(y, probs, "multiclass", ["benign", "malignant"], n_resamples=100)
    assert check.predicted_share["malignant"] < 0.05
    assert not check.decides and any("recall below" in r for r in check.reasons)
    assert "not a valid test of SegU" in check.verdict()
    chosen = decides_check(y, probs, "multiclass", ["benign", "malignant"], thresholds=select_class_cutoffs(y, probs),
                           n_resamples=100)
    assert chosen.decides, chosen.reasons
    assert "valid test" in chosen.verdict() and "not" not in chosen.verdict()
    summary = chosen.summary()
    assert set(summary) >= {"decides", "thresholds", "predicted_share", "baseline_auroc"}


def test_a_classifier_no_better_than_one_feature_does_not_decide():
    rng = np.random.default_rng(3)
    y_val, y = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    area_val, area = y_val + rng.normal(0, 0.5, 300), y + rng.normal(0, 0.5, 300)
    weak = 1 / (1 + np.exp(-(y + rng.normal(0, 2.0, 300))))
    probs = np.stack([1 - weak, weak], 1)
    check = decides_check(y, probs, "multiclass", ["benign", "malignant"], thresholds=select_class_cutoffs(y, probs),
                          baselines={"lesion area": Baseline(area_val, area)}, validation_labels=y_val,
                          n_resamples=100)
    assert check.baseline_auroc["lesion area"] > 0.8
    assert not check.decides and any("lesion area" in r for r in check.reasons)


def test_a_baseline_is_oriented_on_validation_not_on_test():
    """A feature whose direction flips between validation and test (a trap set) scores below 0.5 on test."""
    y_val = np.array([0, 0, 1, 1] * 10)
    y_test = np.array([0, 0, 1, 1] * 10)
    feature_val = y_val.astype(float)
    feature_test = 1 - y_test.astype(float)
    assert oriented_auroc(feature_val, y_val, feature_test, y_test, 2) == pytest.approx(0.0)
    assert oriented_auroc(-feature_val, y_val, feature_test, y_test, 2) == pytest.approx(1.0)


def test_segu_within_predicted_classes_and_lesion_size_strata(make_tiny_dataset):
    """The real-data SegU tables: overall, per predicted class and per lesion-size stratum, with the size-aware
    c_IoU / max and lesion area alone as certainties of their own."""
    import pandas as pd

    from segx_helpers.data import load_dataset
    from segx_helpers.studies.artefacts import lesion_areas, segu_within, with_size_columns

    data = load_dataset(make_tiny_dataset(n=60, size=32))
    ids = data.table["image_id"].tolist()
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"image_id": ids, "class": [["a", "b"][i % 2] for i in range(len(ids))],
                          "correct": rng.random(len(ids)) < 0.6, "c_IoU": rng.random(len(ids)) * 0.05,
                          "c_AUITC": rng.random(len(ids)), "SegU share inside": rng.random(len(ids)),
                          "confidence": rng.random(len(ids))})
    predicted_area = pd.Series(0.1, index=ids)
    sized = with_size_columns(table, data, predicted_area)
    assert sized["c_IoU / max"].to_numpy() == pytest.approx(table["c_IoU"].to_numpy() / 0.5)  # 5 % vs 10 %: max 0.5
    assert sized["lesion area"].to_numpy() == pytest.approx(lesion_areas(data, ids).to_numpy())
    assert sized["size stratum"].nunique() == 3
    out = segu_within(sized, n_resamples=20)
    assert set(out["view"]) == {"all", "predicted class", "lesion size"}
    assert set(out.loc[out["view"] == "predicted class", "group"]) == {"a", "b"}
    assert set(out["certainty"]) == {"c_IoU", "c_AUITC", "SegU share inside", "c_IoU / max", "confidence",
                                     "lesion area"}  # no validation results: no predicted-class baseline
    whole = out[(out["view"] == "all") & (out["certainty"] == "c_IoU")].iloc[0]
    assert whole["n_correct"] + whole["n_incorrect"] == len(ids)


def test_the_predicted_class_alone_is_a_certainty_fitted_on_validation():
    """Class "b"'s calls are mostly wrong on validation and on test: the predicted class alone flags test errors
    (13.5 of 16 error/correct pairs ranked right), with its value the validation precision of the class; within one predicted class it is
    constant, so left blank; a class never predicted on validation gets the validation accuracy."""
    import pandas as pd

    from segx_helpers.studies.artefacts import segu_within, with_class_precision

    validation = pd.DataFrame({"class": ["a"] * 4 + ["b"] * 4, "correct": [True] * 4 + [True, False, False, False]})
    test = pd.DataFrame({"image_id": [f"t{i}" for i in range(8)], "class": ["a"] * 4 + ["b"] * 3 + ["c"],
                         "correct": [True] * 3 + [False] * 4 + [True], "c_IoU": np.linspace(0, 1, 8)})
    scored = with_class_precision(test, validation)
    assert scored["predicted class"].tolist() == pytest.approx([1.0] * 4 + [0.25] * 3 + [5 / 8])
    out = segu_within(scored.assign(**{"size stratum": "all"}), n_resamples=20,
                      certainties=("c_IoU", "predicted class"))
    row = out[(out["view"] == "all") & (out["certainty"] == "predicted class")].iloc[0]
    assert row["auroc"] == pytest.approx(13.5 / 16)  # errors 1, .25, .25, .25 against correct 1, 1, 1, .625
    inside = out[(out["view"] == "predicted class") & (out["group"] == "b") & (out["certainty"] == "predicted class")]
    assert inside["n_incorrect"].iloc[0] == 3 and inside["n_correct"].iloc[0] == 0
    within_a = out[(out["view"] == "predicted class") & (out["group"] == "a") & (out["certainty"] == "predicted class")]
    assert within_a["n_incorrect"].iloc[0] == 1 and within_a["n_correct"].iloc[0] == 3
    assert np.isnan(within_a["auroc"].iloc[0])  # constant within a class: nothing to rank, blank, not 0.5
    with pytest.raises(ValueError, match="validation has no column"):
        with_class_precision(test, validation.drop(columns="correct"))
