"""SegU by the artefact's distance from the region: bins in Grad-CAM cells, the per-bin table, the rate per
model, the paragraph written from the table, the figure, and the CAM grid it is measured in."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from segx_helpers.tutorial import viz
from segx_helpers.models.networks import build_classifier, feature_grid, find_target_layer, previous_block
from segx_helpers.workflows.report import distance_findings
from segx_helpers.studies.shortcut import DistanceBins, shortcut_by_distance, shortcut_rate_by_distance

matplotlib.use("Agg")


def test_bins_are_labelled_in_pixels_and_cells_and_assign_every_distance():
    bins = DistanceBins(cell_px=32)
    assert bins.labels == ["0-8 px (0-0.25 cell)", "8-20 px (0.25-0.62 cell)", "20+ px (0.62+ cell)"]
    codes = bins.assign(np.array([0.0, 7.9, 8.0, 19.99, 20.0, 300.0, np.nan])).codes
    assert list(codes) == [0, 0, 1, 1, 2, 2, -1]
    with pytest.raises(ValueError, match="edges_cells"):
        DistanceBins(cell_px=32, edges_cells=(0.0, 0.5, 0.25))
    with pytest.raises(ValueError, match="cell_px"):
        DistanceBins(cell_px=0)


def _predictions(seed: int = 0, n: int = 300) -> pd.DataFrame:
    """Shortcut-driven predictions whose c_IoU is low only where the artefact is far (>= 20 px)."""
    rng = np.random.default_rng(seed)
    distance = rng.uniform(0, 40, n)
    driven = rng.random(n) < 0.3
    far = distance >= 20
    c_iou = np.where(driven & far, rng.uniform(0.0, 0.05, n), rng.uniform(0.1, 0.4, n))
    correct = ~driven | (rng.random(n) < 0.2)
    return pd.DataFrame({"distance_px": distance, "shortcut_driven": driven, "correct": correct, "c_IoU": c_iou,
                         "c_AUITC": c_iou * 0.9, "confidence": rng.uniform(0.5, 1.0, n)})


def test_shortcut_by_distance_finds_segu_working_only_where_the_artefact_is_far():
    table = _predictions()
    out = shortcut_by_distance(table, DistanceBins(cell_px=32), n_resamples=50, seed=0).set_index("bin")
    far, near = out.loc["20+ px (0.62+ cell)"], out.loc["0-8 px (0-0.25 cell)"]
    assert far["c_iou_auroc"] == pytest.approx(1.0) and far["c_iou_auroc_low"] == pytest.approx(1.0)
    assert abs(near["c_iou_auroc"] - 0.5) < 0.2 and abs(far["confidence_auroc"] - 0.5) < 0.2
    assert out["n"].sum() == len(table)
    assert far["n_shortcut_driven"] == int((table["shortcut_driven"] & (table["distance_px"] >= 20)).sum())
    assert far["distance_px"] == [20.0, float(np.ceil(table["distance_px"].max()))]
    assert near["distance_cells"] == [0.0, 0.25]
    inside = table[table["distance_px"] >= 20]
    assert far["c_iou_correct"] == pytest.approx(inside.loc[inside["correct"], "c_IoU"].mean())
    assert far["c_iou_incorrect"] == pytest.approx(inside.loc[~inside["correct"], "c_IoU"].mean())


def test_shortcut_by_distance_gives_nan_for_a_bin_without_both_outcomes():
    table = _predictions()
    table.loc[table["distance_px"] < 8, "shortcut_driven"] = False
    out = shortcut_by_distance(table, DistanceBins(cell_px=32), n_resamples=20).set_index("bin")
    assert np.isnan(out.loc["0-8 px (0-0.25 cell)", "c_iou_auroc"])
    assert np.isfinite(out.loc["20+ px (0.62+ cell)", "c_iou_auroc"])


def test_the_predicted_class_alone_is_binned_beside_segu_and_shown_in_the_figure_and_the_report():
    """A baseline that knows only which class was called: where the shortcut makes one class's calls the
    shortcut-driven ones, it flags them by itself in every bin, and the table, the figure and the report show it."""
    from segx_helpers.workflows.report import distance_table

    table = _predictions()
    table["predicted class"] = np.where(table["shortcut_driven"], 0.3, 0.9)  # validation precision of the class called
    scores = ("c_IoU", "c_AUITC", "confidence", "predicted class")
    out = shortcut_by_distance(table, DistanceBins(cell_px=32), scores, n_resamples=20).set_index("bin")
    assert (out["predicted_class_auroc"] == 1.0).all()
    assert out.loc["20+ px (0.62+ cell)", "c_iou_auroc"] == pytest.approx(1.0)  # the other keys are unchanged
    fig = viz.plot_auroc_by_distance({"last block": out.reset_index()}, "test")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "the predicted class alone" in labels and len(fig.axes[0].containers) == 4
    markdown = distance_table(out.reset_index().to_dict(orient="records"))
    assert "predicted class AUROC" in markdown.splitlines()[0] and "1.000 [1.000, 1.000]" in markdown
    assert "predicted class" not in distance_table(shortcut_by_distance(table, DistanceBins(cell_px=32), n_resamples=20)
                                                   .to_dict(orient="records"))


def test_shortcut_rate_by_distance_counts_per_model_and_bin():
    predictions = {"baseline": pd.DataFrame({"image_id": ["a", "b", "c", "d"], "shortcut_driven": [True, True, False, True]}),
                   "fixed": pd.DataFrame({"image_id": ["a", "b", "c", "d"], "shortcut_driven": [False, True, False, False]})}
    distance = pd.Series([2.0, 30.0, 5.0, 25.0], index=["a", "b", "c", "d"])
    rates = shortcut_rate_by_distance(predictions, distance, DistanceBins(cell_px=32)).set_index(["model", "bin"])
    assert rates.loc[("baseline", "0-8 px (0-0.25 cell)"), "rate"] == 0.5
    assert rates.loc[("baseline", "20+ px (0.62+ cell)"), "rate"] == 1.0
    assert rates.loc[("fixed", "20+ px (0.62+ cell)"), "shortcut-driven"] == 1
    assert rates.loc[("fixed", "8-20 px (0.25-0.62 cell)"), "n"] == 0


def test_distance_findings_says_where_segu_beat_confidence_and_where_the_table4_pattern_held():
    table = _predictions()
    by_distance = {"last block": shortcut_by_distance(table, DistanceBins(cell_px=32), n_resamples=50)}
    text = distance_findings(by_distance)
    far_line = next(line for line in text.splitlines() if line.startswith("- **20+ px"))
    assert "beats confidence" in far_line
    near_line = next(line for line in text.splitlines() if line.startswith("- **0-8 px"))
    assert "beats" not in near_line
    assert "farthest bin" in text and "pattern holds" in text.split("farthest bin")[1]
    flipped = by_distance["last block"].assign(c_iou_auroc=0.2, c_iou_auroc_low=0.1, c_iou_auroc_high=0.3)
    assert "below chance" in distance_findings({"last block": flipped}) and "beats" not in distance_findings(
        {"last block": flipped})


def test_auroc_by_distance_figure_draws_a_line_per_score_and_layer_plus_confidence():
    table = shortcut_by_distance(_predictions(), DistanceBins(cell_px=32), n_resamples=20)
    fig = viz.plot_auroc_by_distance({"last block": table, "block before": table}, "test")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sorted(labels) == sorted(["c_IoU (last block)", "c_AUITC (last block)", "c_IoU (block before)",
                                     "c_AUITC (block before)", "classifier confidence", "chance"])
    assert len(fig.axes[0].containers) == 5  # one error-bar line per score and layer, and confidence


def test_feature_grid_is_the_cam_resolution():
    model = build_classifier("resnet18", num_classes=3)
    model.train()
    assert feature_grid(model, find_target_layer(model), 128) == (4, 4)
    assert feature_grid(model, previous_block(model), 128) == (8, 8)
    assert model.training
