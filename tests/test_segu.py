"""SegU scores on hand-made maps and masks, and the selective-prediction statistics on known cases."""
from __future__ import annotations

import numpy as np
import pytest

from segx_helpers.scores.segu import segu_auitc, segu_distance, segu_iou, segu_mass, segu_share_inside, segu_scores
from segx_helpers.scores.selective import aurc, combined_confidence, fit_combination, risk_coverage, separation
from segx_helpers.scores.saliency import DegenerateMapWarning

SIZE = 20


def _mask():
    mask = np.zeros((1, SIZE, SIZE), bool)
    mask[0, :, :10] = True  # left half
    return mask


def _map(region):
    m = np.zeros((1, SIZE, SIZE), np.float32)
    m[0][region] = 1.0
    return m


INSIDE = (slice(0, 4), slice(0, 5))       # 20 pixels = 5 % of 400, all inside
OUTSIDE = (slice(0, 4), slice(15, 20))    # 20 pixels, all outside
HALF = (slice(0, 4), slice(8, 13))        # 20 pixels, 8 inside


@pytest.mark.parametrize("region, overlap", [(INSIDE, 1.0), (OUTSIDE, 0.0), (HALF, 0.4)])
def test_overlap_mass_and_iou(region, overlap):
    maps, masks = _map(region), _mask()
    assert segu_share_inside(maps, masks)[0] == pytest.approx(overlap)
    assert segu_mass(maps, masks)[0] == pytest.approx(overlap)
    assert segu_iou(maps, masks)[0] == pytest.approx(overlap * 20 / (200 + 20 - overlap * 20))


def test_distance_score():
    masks = _mask()
    assert segu_distance(_map(INSIDE), masks)[0] == pytest.approx(1.0)
    far = segu_distance(_map(OUTSIDE), masks)[0]
    # columns 15..19 are 6..10 px from column 9: mean 8 px over the diagonal
    assert far == pytest.approx(1 - 8 / np.hypot(SIZE, SIZE))
    assert segu_distance(_map(HALF), masks)[0] > far


def test_empty_mask_and_empty_map_give_zero_with_warning():
    empty_mask = np.zeros((1, SIZE, SIZE), bool)
    for fn in (segu_share_inside, segu_mass, segu_iou, segu_auitc, segu_distance):
        with pytest.warns(DegenerateMapWarning):
            assert fn(_map(INSIDE), empty_mask)[0] == 0.0
        with pytest.warns(DegenerateMapWarning):
            assert fn(np.zeros((1, SIZE, SIZE)), _mask())[0] == 0.0


def test_constant_map_scores_the_mask_share():
    assert segu_share_inside(np.full((1, SIZE, SIZE), 0.7), _mask())[0] == pytest.approx(0.5)


def test_scores_frame_has_every_variant():
    frame = segu_scores(np.concatenate([_map(INSIDE), _map(OUTSIDE)]), np.repeat(_mask(), 2, axis=0))
    assert list(frame.columns) == ["c_IoU", "c_AUITC", "SegU share inside", "SegU mass", "SegU distance"]
    assert (frame.iloc[0] > frame.iloc[1]).all()


def test_separation_on_known_auroc():
    correct = np.array([1, 1, 1, 0, 0], bool)
    certainty = np.array([0.9, 0.8, 0.3, 0.4, 0.1])
    result = separation(correct, certainty, n_resamples=50)
    # incorrect detected by low certainty: pairs (wrong, right) ordered correctly: 0.1 < all 3; 0.4 < 0.9, 0.8 -> 5/6
    assert result["auroc"] == pytest.approx(5 / 6)
    assert result["rank_biserial"] == pytest.approx(2 * 5 / 6 - 1)
    assert result["n_incorrect"] == 2 and 0 <= result["p_value"] <= 1
    with pytest.warns(UserWarning, match="both correct and incorrect"):
        one_outcome = separation(np.ones(3, bool), np.ones(3))
    assert np.isnan(one_outcome["auroc"]) and one_outcome["n_correct"] == 3


def test_error_taxonomy_and_its_separation():
    from segx_helpers.scores.selective import error_types, separation_by_error_type

    correct = np.array([True, True, False, False, False, True])
    predicted = np.array(["nevus", "melanoma", "melanoma", "nevus", "nevus", "nevus"])
    truth = np.array(["nevus", "melanoma", "nevus", "melanoma", "keratosis", "nevus"])
    ink = np.array([False, True, True, False, True, False])
    kinds = error_types(correct, predicted, truth, ink, "melanoma")
    assert kinds.tolist() == ["correct", "correct", "artefact present", "artefact absent", "other error", "correct"]
    import pandas as pd

    table = pd.DataFrame({"correct": correct, "error_type": kinds, "s": [0.9, 0.8, 0.1, 0.85, 0.5, 0.7]})
    with pytest.warns(UserWarning):   # a bootstrap over 4 predictions
        rows = separation_by_error_type(table, ["s"], n_resamples=50).set_index("errors")
    assert rows.loc["artefact present", "auroc"] == 1.0 and rows.loc["artefact absent", "auroc"] == pytest.approx(1 / 3)


def test_risk_coverage_hand_case():
    correct = np.array([1, 0, 1, 1], bool)
    confidence = np.array([0.9, 0.8, 0.7, 0.1])
    coverage, risk = risk_coverage(correct, confidence)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0, 0.5, 1 / 3, 0.25])
    assert aurc(correct, confidence) == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)


def test_risk_coverage_spreads_ties():
    correct = np.array([1, 0], bool)
    _, risk = risk_coverage(correct, np.array([0.5, 0.5]))
    assert risk.tolist() == pytest.approx([0.5, 0.5])
    perfect = aurc(np.array([1, 1, 0, 0], bool), np.array([0.9, 0.8, 0.2, 0.1]))
    worst = aurc(np.array([1, 1, 0, 0], bool), np.array([0.1, 0.2, 0.8, 0.9]))
    assert perfect < worst


def test_combination_is_fitted_and_scores_in_unit_interval():
    rng = np.random.default_rng(0)
    correct = rng.random(100) < 0.7
    certainty = np.where(correct, 0.8, 0.3) + rng.normal(0, 0.1, 100)
    confidence = rng.random(100)
    model = fit_combination(certainty, confidence, correct)
    combined = combined_confidence(model, certainty, confidence)
    assert combined.shape == (100,) and ((0 <= combined) & (combined <= 1)).all()
    assert aurc(correct, combined) < aurc(correct, confidence)


def test_mask_covering_the_whole_image_trusts_every_map():
    full = np.ones((2, SIZE, SIZE), bool)
    maps = np.concatenate([_map(INSIDE), _map(OUTSIDE)])
    frame = segu_scores(maps, full)
    assert np.allclose(frame["SegU share inside"], 1.0) and np.allclose(frame["SegU distance"], 1.0)
    assert np.allclose(frame["c_IoU"], 20 / 400)


def test_augrc_hand_case():
    from segx_helpers.scores.selective import augrc

    correct = np.array([True, False, True, True])
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    # accepted-and-wrong share at coverage 1/4..4/4: 0, 1/4, 1/4, 1/4
    assert augrc(correct, confidence) == pytest.approx(np.mean([0, 0.25, 0.25, 0.25]))
    assert augrc(correct, np.array([0.6, 0.1, 0.7, 0.9])) == pytest.approx(0.25 / 4)


def test_scoring_an_empty_set_of_maps_gives_an_empty_table_with_a_warning():
    """A multi-label run with no positive prediction has no maps: empty in, empty out (issue 13 item 7)."""
    with pytest.warns(DegenerateMapWarning, match="no maps"):
        frame = segu_scores(np.zeros((0, 8, 8)), np.zeros((0, 8, 8), bool))
    assert len(frame) == 0 and "c_IoU" in frame
    from segx_helpers.scores.segx import top_percent

    assert top_percent(np.zeros((0, 8, 8))).shape == (0, 8, 8)


def test_the_iou_ceiling_is_reached_by_a_top_region_inside_a_larger_mask_or_around_a_smaller_one():
    """``segu_iou_ceiling`` is the largest ``c_IoU`` a top-5 % region can have: reached when the region sits inside a
    larger mask, or covers a smaller one; a map elsewhere scores below it."""
    from segx_helpers.scores.segu import segu_iou, segu_iou_ceiling

    size = 40  # 1,600 pixels: the top 5 % is 80 pixels
    maps = np.zeros((2, size, size), np.float32)
    masks = np.zeros((2, size, size), bool)
    masks[0, :20, :20] = True                 # 400 pixels, larger than the region
    maps[0, :8, :10] = 1.0                     # the 80 top pixels, inside it
    masks[1, :5, :8] = True                    # 40 pixels, smaller than the region
    maps[1, :8, :10] = 1.0                     # the region covers the mask
    area = masks.mean(axis=(1, 2))
    assert segu_iou(maps, masks).tolist() == pytest.approx(segu_iou_ceiling(area).tolist())
    assert segu_iou_ceiling(area).tolist() == pytest.approx([80 / 400, 40 / 80])
    elsewhere = np.roll(maps, 20, axis=2)
    assert (segu_iou(elsewhere, masks) < segu_iou_ceiling(area)).all()
    assert segu_iou_ceiling(np.array([0.0])).tolist() == [0.0]


def test_peaks_in_border_cells_of_the_explanation_grid():
    from segx_helpers.scores.saliency import peak_in_border_cell

    maps = np.zeros((3, 128, 128), np.float32)
    maps[0, 5, 5] = 1        # top-left cell of a 4 x 4 grid
    maps[1, 64, 64] = 1      # a central cell
    maps[2, 100, 40] = 1     # row 3 of 4: the bottom border
    assert peak_in_border_cell(maps, (4, 4)).tolist() == [True, False, True]
    assert peak_in_border_cell(maps, (8, 8)).tolist() == [True, False, False]
