"""Localisation metrics against hand-computed cases (and Quantus' conventions)."""
from __future__ import annotations

import numpy as np
import pytest

from segx_helpers.scores.metrics import (energy_pointing_game, localisation_scores, paired_summary, pointing_game,
                                  relevance_mass, relevance_rank_accuracy, top_percent_iou)
from segx_helpers.scores.saliency import DegenerateMapWarning


@pytest.fixture
def case():
    """A 4x4 map with mass 10 in total, 6 of it in the top-left 2x2 mask."""
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 3, 3], maps[0, 2, 2] = 4, 2, 3, 1
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    return maps, masks


def test_relevance_mass(case):
    assert relevance_mass(*case)[0] == pytest.approx(0.6)


def test_relevance_rank_accuracy(case):
    # K = 4 mask pixels; top-4 pixels: 4 (in), 3 (out), 2 (in), 1 (out) -> 2/4
    assert relevance_rank_accuracy(*case)[0] == pytest.approx(0.5)


def test_pointing_game(case):
    maps, masks = case
    assert pointing_game(maps, masks)[0] == 1.0
    maps2 = maps.copy()
    maps2[0, 3, 3] = 5
    assert pointing_game(maps2, masks)[0] == 0.0


def test_top_percent_iou(case):
    maps, masks = case
    # top 25 % of 16 pixels = 4 pixels: values 4, 3, 2, 1 -> 2 inside the 4-pixel mask: IoU 2/6
    assert top_percent_iou(maps, masks, p=25)[0] == pytest.approx(2 / 6)


def test_energy_pointing_game_uses_min_max_normalised_map(case):
    maps, masks = case
    shifted = maps + 1.0
    assert energy_pointing_game(maps, masks)[0] == pytest.approx(0.6)
    assert energy_pointing_game(shifted, masks)[0] == pytest.approx(0.6)
    assert relevance_mass(shifted, masks)[0] == pytest.approx(10 / 26)


def test_degenerate_maps_get_zero_and_a_warning(case):
    _, masks = case
    zeros = np.zeros((1, 4, 4), np.float32)
    for fn in (relevance_mass, relevance_rank_accuracy, pointing_game, energy_pointing_game):
        with pytest.warns(DegenerateMapWarning):
            assert fn(zeros, masks)[0] == 0.0


def test_metrics_refuse_nan(case):
    maps, masks = case
    maps = maps.copy()
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        relevance_mass(maps, masks)


def test_summary_table_has_paired_difference(case):
    maps, masks = case
    original = localisation_scores(np.repeat(maps, 5, axis=0), np.repeat(masks, 5, axis=0))
    better = original.assign(**{"relevance mass": 1.0})
    table = paired_summary(original, better, n_resamples=20).set_index("metric")
    assert table.loc["relevance mass", "difference_mean"] == pytest.approx(0.4)
    assert list(original.columns)[0] == "relevance mass" and len(original) == 5


def test_against_quantus_on_random_maps():
    """Our reference functions and the analysis engine give Quantus 0.6's values: relevance mass accuracy,
    relevance rank accuracy, pointing game, and top-k intersection (our share of the top 5 % inside the mask)."""
    quantus = pytest.importorskip("quantus")
    import warnings

    from segx_helpers.scores.analysis import analyse
    from segx_helpers.scores.segx import top_percent

    rng = np.random.default_rng(0)
    n, size = 12, 16
    maps = rng.random((n, size, size)).astype(np.float32)
    masks = rng.random((n, size, size)) > 0.6
    batch = dict(model=None, x_batch=rng.random((n, 1, size, size)).astype(np.float32), y_batch=np.zeros(n, int),
                 a_batch=maps[:, None], s_batch=masks[:, None].astype(float))
    k = int(np.ceil(0.05 * size * size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = {name: np.array(metric(**batch), float) for name, metric in {
            "mass": quantus.RelevanceMassAccuracy(disable_warnings=True),
            "rank": quantus.RelevanceRankAccuracy(disable_warnings=True),
            "pointing": quantus.PointingGame(disable_warnings=True),
            "top-k": quantus.TopKIntersection(k=k, disable_warnings=True)}.items()}
    engine = analyse(maps, masks, masks)
    assert np.allclose(relevance_mass(maps, masks), theirs["mass"], atol=1e-6)
    assert np.allclose(engine["original relevance mass"], theirs["mass"], atol=1e-6)
    assert np.allclose(relevance_rank_accuracy(maps, masks), theirs["rank"])
    assert np.allclose(engine["original relevance rank"], theirs["rank"])
    assert np.array_equal(pointing_game(maps, masks), theirs["pointing"])
    assert np.array_equal(engine["original pointing game"], theirs["pointing"])
    assert np.allclose((top_percent(maps) & masks).sum(axis=(1, 2)) / k, theirs["top-k"])
    assert np.allclose(engine["SegU share inside"], theirs["top-k"])
