"""Property tests (hypothesis) for the metric, SegX and SegU functions."""
from __future__ import annotations

import warnings

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segx_helpers.scores.metrics import energy_pointing_game, pointing_game, relevance_mass, relevance_rank_accuracy
from segx_helpers.scores.segu import segu_auitc, segu_distance, segu_iou, segu_mass, segu_share_inside
from segx_helpers.scores.segx import segx, top_percent

SHAPE = (2, 8, 8)
maps_strategy = arrays(np.float32, SHAPE, elements=st.floats(0, 10, width=32))
masks_strategy = arrays(np.bool_, SHAPE)
SCORES = [relevance_mass, relevance_rank_accuracy, pointing_game, energy_pointing_game, segu_share_inside, segu_mass,
          segu_iou, segu_auitc, segu_distance]


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


@settings(max_examples=60, deadline=None)
@given(maps_strategy, masks_strategy)
def test_scores_stay_in_unit_interval_without_nan(maps, masks):
    for fn in SCORES:
        values = quiet(fn, maps, masks)
        assert values.shape == (2,)
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1 + 1e-9).all(), fn.__name__


@settings(max_examples=60, deadline=None)
@given(maps_strategy, masks_strategy, st.floats(0.01, 100))
def test_scores_are_invariant_to_map_scaling(maps, masks, factor):
    scaled = (maps.astype(np.float64) * factor).astype(np.float32)
    # float32 rounding may merge or split ties; the invariance is about the order, so such draws do not count
    assume(np.array_equal(np.argsort(maps.ravel(), kind="stable"), np.argsort(scaled.ravel(), kind="stable")))
    for fn in (relevance_mass, segu_share_inside, segu_iou, pointing_game):
        assert np.allclose(quiet(fn, maps, masks), quiet(fn, scaled, masks), atol=1e-5), fn.__name__


@settings(max_examples=60, deadline=None)
@given(maps_strategy, masks_strategy, st.floats(0.1, 5))
def test_moving_attribution_into_the_mask_never_lowers_mass(maps, masks, amount):
    moved = maps.copy()
    moved[masks] += amount
    assert (quiet(relevance_mass, moved, masks) >= quiet(relevance_mass, maps, masks) - 1e-6).all()
    assert (quiet(segu_mass, moved, masks) >= quiet(segu_mass, maps, masks) - 1e-6).all()


@settings(max_examples=60, deadline=None)
@given(maps_strategy, masks_strategy, st.integers(0, 3))
def test_segx_is_zero_outside_the_dilated_mask(maps, masks, margin):
    from segx_helpers.scores.segx import dilate

    out = segx(maps, masks, margin=margin)
    assert (out[~dilate(masks, margin)] == 0).all()
    assert np.allclose(out[masks], maps[masks])


@settings(max_examples=60, deadline=None)
@given(maps_strategy, st.floats(1, 100))
def test_top_percent_keeps_at_least_k_positive_pixels(maps, p):
    top = top_percent(maps, p)
    k = int(np.ceil(p / 100 * 64))
    for i in range(len(maps)):
        positive = (maps[i] > 0).sum()
        assert top[i].sum() >= min(k, positive)
        assert (maps[i][top[i]] > 0).all()
        if top[i].any() and (~top[i]).any():
            assert maps[i][top[i]].min() >= maps[i][~top[i]].max()
