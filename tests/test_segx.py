"""SegX alignment and top-p binarisation: shapes, invariants, ties and degenerate maps."""
from __future__ import annotations

import numpy as np
import pytest

from segx_helpers.scores.segx import dilate, segx, top_percent


def _square_mask(size=10, lo=3, hi=7):
    mask = np.zeros((1, size, size), bool)
    mask[0, lo:hi, lo:hi] = True
    return mask


def test_segx_is_zero_outside_the_dilated_mask_and_unchanged_inside():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 10, 10)).astype(np.float32)
    masks = np.repeat(_square_mask(), 3, axis=0)
    for margin in (0, 1, 2):
        out = segx(maps, masks, margin=margin)
        grown = dilate(masks, margin)
        assert (out[~grown] == 0).all()
        assert np.allclose(out[grown], maps[grown])
    assert dilate(masks, 1).sum() == 3 * (16 + 16)


def test_segx_thresholds_probability_masks_and_soft_mode():
    maps = np.ones((1, 2, 2), np.float32)
    probs = np.array([[[0.2, 0.6], [0.5, 0.9]]])
    assert segx(maps, probs).tolist() == [[[0, 1], [1, 1]]]
    assert segx(maps, probs, threshold=0.7).tolist() == [[[0, 0], [0, 1]]]
    assert np.allclose(segx(maps, probs, mode="soft"), probs)


def test_segx_renormalise_and_zero_maps():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[1, 1, 1] = 0.25
    out = segx(maps, np.ones((2, 4, 4), bool), renormalize=True)
    assert out[0].max() == 0 and out[1].max() == 1.0
    assert np.isfinite(out).all()


def test_segx_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        segx(np.full((1, 2, 2), np.nan), np.ones((1, 2, 2), bool))
    with pytest.raises(ValueError, match="resize masks"):
        segx(np.ones((1, 4, 4)), np.ones((1, 2, 2), bool))
    with pytest.raises(ValueError, match="mode must be"):
        segx(np.ones((1, 2, 2)), np.ones((1, 2, 2), bool), mode="fuzzy")
    with pytest.warns(UserWarning, match="negative values"):
        assert segx(-np.ones((1, 2, 2)), np.ones((1, 2, 2), bool)).max() == 0


def test_top_percent_keeps_p_percent_of_distinct_values():
    maps = np.arange(400, dtype=np.float32).reshape(1, 20, 20) + 1
    top = top_percent(maps, 5)
    assert top.sum() == 20
    assert top[0].ravel()[-20:].all()
    assert top_percent(maps, 0.01).sum() == 1


def test_top_percent_keeps_ties_constant_and_zero_maps():
    ties = np.zeros((1, 10, 10), np.float32)
    ties[0, :2] = 1.0
    assert top_percent(ties, 5).sum() == 20
    assert top_percent(np.full((1, 10, 10), 0.3), 5).all()
    assert not top_percent(np.zeros((1, 10, 10)), 5).any()


def test_top_percent_rejects_bad_p():
    with pytest.raises(ValueError, match="p must be"):
        top_percent(np.ones((1, 2, 2)), 0)
