"""The one analysis path (segx_helpers.scores.analysis): the paper's SegU and localisation scores on hand-made
cases, and equality with the plain numpy reference implementations on random and tied maps."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from segx_helpers.scores.analysis import (AnalysisOptions, DegenerateMapWarning, analyse, binarise_masks, localisation_summary,
                                   threshold_grid)
from segx_helpers.scores.metrics import auitc, localisation_scores
from segx_helpers.scores.segu import segu_auitc, segu_iou, segu_scores, segu_share_inside
from segx_helpers.scores.segx import segx, top_percent

SIZE = 20


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def square(lo, hi, size=SIZE):
    mask = np.zeros((size, size), bool)
    mask[lo:hi, lo:hi] = True
    return mask


def blob(region, size=SIZE):
    """A map that is 1 on ``region`` and a faint ramp elsewhere (so its top 5 % is exactly ``region``
    when the region holds 5 % of the pixels)."""
    ramp = np.linspace(0, 0.1, size * size, dtype=np.float32).reshape(size, size)
    return np.where(region, 1.0, ramp).astype(np.float32)


def test_c_iou_on_hand_made_cases():
    mask = square(5, 15)                                   # 100 pixels
    top = np.zeros((SIZE, SIZE), bool)
    top[5:7, 5:15] = True                                  # 20 pixels = 5 % of 400, inside the mask
    outside = np.zeros((SIZE, SIZE), bool)
    outside[0:2, 0:10] = True                              # 20 pixels outside
    half = np.zeros((SIZE, SIZE), bool)
    half[4:6, 5:15] = True                                 # 10 inside, 10 outside
    maps = np.stack([blob(top), blob(outside), blob(half)])
    masks = np.stack([mask] * 3)
    assert segu_iou(maps, masks) == pytest.approx([20 / 100, 0.0, 10 / 110])
    assert segu_share_inside(maps, masks) == pytest.approx([1.0, 0.0, 0.5])
    table = analyse(maps, masks)
    assert table["c_IoU"].to_numpy() == pytest.approx([0.2, 0.0, 10 / 110])
    assert table["SegU share inside"].to_numpy() == pytest.approx([1.0, 0.0, 0.5])


def test_c_iou_nested_regions_and_degenerate_inputs():
    mask = square(8, 12)                                   # 16 pixels nested inside the 20-pixel top region
    top = np.zeros((SIZE, SIZE), bool)
    top[7:12, 8:12] = True                                 # 20 pixels, holds the mask
    maps = np.stack([blob(top), np.zeros((SIZE, SIZE), np.float32), np.full((SIZE, SIZE), 0.3, np.float32),
                     blob(top)])
    masks = np.stack([mask, mask, mask, np.zeros((SIZE, SIZE), bool)])
    with pytest.warns(DegenerateMapWarning):
        table = analyse(maps, masks)
    # nested: 16 / 20; zero map: 0; constant map keeps every pixel: 16 / 400; empty mask: 0
    assert table["c_IoU"].to_numpy() == pytest.approx([16 / 20, 0.0, 16 / 400, 0.0])
    assert table["c_AUITC"].to_numpy()[[1, 3]] == pytest.approx([0.0, 0.0])
    assert quiet(segu_iou, maps, masks) == pytest.approx(table["c_IoU"].to_numpy())


def test_auitc_of_a_map_equal_to_its_mask_is_one_up_to_the_grid():
    mask = square(4, 12)
    for n in (11, 101, 1001):
        value = auitc(mask[None].astype(np.float32), mask[None], n)[0]
        # only the first trapezoid (tau = 0 selects the whole image) falls short of 1
        share = mask.mean()
        assert value == pytest.approx(1 - (1 - share) / (2 * (n - 1)))
        assert analyse(mask[None].astype(np.float32), mask[None], options=AnalysisOptions(n_thresholds=n))["c_AUITC"][0] == pytest.approx(value)


def test_auitc_converges_as_the_grid_gets_finer():
    rng = np.random.default_rng(1)
    maps = rng.random((6, SIZE, SIZE)).astype(np.float32) ** 3
    masks = rng.random((6, SIZE, SIZE)) > 0.7
    values = {n: auitc(maps, masks, n) for n in (11, 101, 1001, 10001)}
    gaps = [np.abs(values[a] - values[10001]).max() for a in (11, 101, 1001)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[1] < 0.01 and gaps[2] < 0.001


def test_auitc_grows_as_the_map_moves_onto_the_mask():
    mask = square(5, 15)
    outside = ~square(3, 17)
    previous = -1.0
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        heat = np.where(outside, 1 - share, 0.05).astype(np.float32) + np.where(mask, share, 0.0).astype(np.float32)
        value = segu_auitc(heat[None], mask[None])[0]
        assert value > previous
        previous = value


def test_engine_equals_the_reference_functions_on_random_and_tied_maps():
    rng = np.random.default_rng(0)
    maps = rng.random((30, 24, 24)).astype(np.float32)
    maps[:10] = np.round(maps[:10] * 4) / 4               # heavy ties, also at the thresholds
    maps[10] = 0.0
    maps[11] = 0.3
    predicted = rng.random((30, 24, 24)) > 0.6
    predicted[12] = False
    truth = rng.random((30, 24, 24)) > 0.5
    table = quiet(analyse, maps, predicted, truth, options=AnalysisOptions(distance=True))
    reference = quiet(segu_scores, maps, predicted)
    for column in reference.columns:
        assert np.abs(table[column].to_numpy() - reference[column].to_numpy()).max() < 1e-6, column
    kinds = {"original": maps, "SegX mask-then-top": segx(maps, predicted),
             "SegX top-then-mask": segx(maps, predicted, order="top-then-mask")}
    names = {"IoU@5%": "top-5% IoU", "relevance mass": "relevance mass", "relevance rank": "relevance rank",
             "pointing game": "pointing game"}
    for kind, values in kinds.items():
        loc = quiet(localisation_scores, values, truth)
        for ours, theirs in names.items():
            assert np.abs(table[f"{kind} {ours}"].to_numpy() - loc[theirs].to_numpy()).max() < 1e-6, (kind, ours)
        assert np.abs(table[f"{kind} AUITC"].to_numpy() - quiet(auitc, values, truth)).max() < 1e-6


def test_engine_works_per_image_with_an_index_and_marks_missing_ground_truth():
    rng = np.random.default_rng(2)
    maps = rng.random((5, 16, 16)).astype(np.float32)
    per_image = rng.random((3, 16, 16)) > 0.5
    index = np.array([0, 0, 1, 2, 2])
    table = analyse(maps, per_image, per_image, image_index=index, has_true_mask=np.array([True, False, True]))
    direct = analyse(maps, per_image[index], per_image[index])
    assert np.allclose(table["c_IoU"], direct["c_IoU"])
    assert table["original AUITC"].isna().tolist() == [False, False, True, False, False]
    from_tensors = analyse(torch.as_tensor(maps), torch.as_tensor(per_image[index]))
    assert np.array_equal(from_tensors["c_AUITC"].to_numpy(), direct["c_AUITC"].to_numpy())


def test_empty_batch_gives_an_empty_table_with_a_warning():
    with pytest.warns(DegenerateMapWarning, match="no maps"):
        table = analyse(np.zeros((0, 8, 8), np.float32), np.zeros((0, 8, 8), bool), np.zeros((0, 8, 8), bool))
    assert len(table) == 0 and "c_IoU" in table and "original AUITC" in table


def test_probability_masks_are_refused_and_binarised_in_one_place():
    prob = np.array([[[0.2, 0.5], [0.7, 0.9]]])
    with pytest.raises(TypeError, match="binarise_masks"):
        analyse(np.ones((1, 2, 2), np.float32), prob)
    assert binarise_masks(prob, 0.7).tolist() == [[[False, False], [True, True]]]
    assert binarise_masks(prob, as_reference_code=True).tolist() == [[[False, False], [True, True]]]
    assert binarise_masks(prob, 0.5).tolist() == [[[False, True], [True, True]]]
    with pytest.raises(ValueError, match="threshold"):
        binarise_masks(prob, 1.5)


def test_bad_maps_are_refused():
    maps = np.ones((2, 4, 4), np.float32)
    maps[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        analyse(maps, np.ones((2, 4, 4), bool))
    with pytest.raises(ValueError, match="shape"):
        analyse(np.ones((2, 4, 4), np.float32), np.ones((3, 4, 4), bool))
    with pytest.raises(ValueError, match="order"):
        analyse(np.ones((2, 4, 4), np.float32), np.ones((2, 4, 4), bool),
                options=AnalysisOptions(orders=("mask-first",)))


def test_threshold_grid_is_evenly_spaced_and_includes_both_ends():
    grid = threshold_grid(5)
    assert grid.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and grid.dtype == np.float32
    with pytest.raises(ValueError):
        threshold_grid(1)


def test_segx_orders_on_a_hand_made_case():
    heat = np.zeros((10, 10), np.float32)
    heat[0, :5] = [10, 9, 8, 7, 6]                       # the original top 5 %: outside the mask
    heat[5, 5:10] = [5, 4, 3, 2, 1]                      # lower values inside the mask
    mask = np.zeros((10, 10), bool)
    mask[5:, 5:] = True
    code_order = top_percent(segx(heat[None], mask[None], order="mask-then-top"))[0]
    paper_order = top_percent(segx(heat[None], mask[None], order="top-then-mask"))[0]
    assert code_order.sum() == 5 and code_order[5, 5:10].all()   # moved inside the mask
    assert not paper_order.any()                                  # the original top 5 % had nothing inside


def test_top_percent_matches_the_reference_percentile_rule_on_continuous_maps():
    rng = np.random.default_rng(3)
    maps = rng.random((4, 128, 128)).astype(np.float32)
    assert np.array_equal(top_percent(maps, 5.0), top_percent(maps, 5.0, rule="percentile"))
    tied = np.full((1, 20, 20), 0.5, np.float32)
    assert top_percent(tied).all() and not top_percent(tied, rule="percentile").any()


def test_localisation_summary_pairs_each_order_with_the_original():
    rng = np.random.default_rng(4)
    maps = rng.random((12, 16, 16)).astype(np.float32)
    masks = rng.random((12, 16, 16)) > 0.5
    table = analyse(maps, masks, masks)
    summary = localisation_summary({"gradcam": table}, n_resamples=20)
    assert set(summary["order"]) == {"mask-then-top", "top-then-mask"}
    assert set(summary["metric"]) == {"IoU@5%", "AUITC", "relevance mass", "relevance rank", "pointing game"}
    row = summary[(summary["order"] == "mask-then-top") & (summary["metric"] == "relevance mass")].iloc[0]
    assert row["SegX_mean"] == pytest.approx(1.0)   # SegX against the mask it was cut with


def test_engine_segx_saliency_equals_the_reference_in_both_orders():
    from segx_helpers.scores.analysis import segx_saliency

    rng = np.random.default_rng(5)
    maps = rng.random((8, 32, 32)).astype(np.float32)
    maps[:3] = np.round(maps[:3] * 3) / 3
    masks = rng.random((8, 32, 32)) > 0.5
    for order in ("mask-then-top", "top-then-mask"):
        expected = top_percent(segx(maps, masks, order=order))
        assert np.array_equal(segx_saliency(maps, masks, order=order).numpy(), expected), order
        assert np.array_equal(segx_saliency(maps, masks, order=order, batch_size=3).numpy(), expected), order


def test_artefact_mass_is_the_share_of_attribution_on_the_artefact():
    heat = np.zeros((1, 10, 10), np.float32)
    heat[0, 0, :4] = 1.0          # on the artefact
    heat[0, 5, 5] = 2.0           # on the lesion
    artefact = np.zeros((1, 10, 10), bool)
    artefact[0, 0, :] = True
    lesion = np.zeros((1, 10, 10), bool)
    lesion[0, 4:7, 4:7] = True
    table = analyse(heat, lesion, artefact_masks=artefact)
    assert table["artefact mass"][0] == pytest.approx(4 / 6) and table["SegU mass"][0] == pytest.approx(2 / 6)


@pytest.mark.parametrize("n_thresholds", [11, 37, 101, 1000])
def test_engine_auitc_is_exact_for_values_on_the_thresholds(n_thresholds):
    """Values equal to a threshold (after scaling) are where float rounding could put a pixel in the wrong bin."""
    rng = np.random.default_rng(n_thresholds)
    grid = threshold_grid(n_thresholds)
    maps = rng.choice(grid, size=(12, 20, 20)).astype(np.float32)
    maps[:, 0, 0], maps[:, 0, 1] = 0.0, 1.0          # min 0 and max 1: scaling leaves the values on the grid
    masks = rng.random((12, 20, 20)) > 0.5
    engine = analyse(maps, masks, options=AnalysisOptions(n_thresholds=n_thresholds, localisation=False))["c_AUITC"].to_numpy()
    assert np.abs(engine - auitc(maps, masks, n_thresholds)).max() < 1e-9
    shifted = (maps + np.float32(1.0)).astype(np.float32)   # minimum 1: the engine's other scaling path,
    engine = analyse(shifted, masks, options=AnalysisOptions(n_thresholds=n_thresholds, localisation=False))["c_AUITC"].to_numpy()
    assert np.abs(engine - auitc(shifted, masks, n_thresholds)).max() < 1e-9  # values within an ulp of a threshold


def test_scoring_in_batches_gives_the_same_table():
    rng = np.random.default_rng(6)
    maps = rng.random((11, 16, 16)).astype(np.float32)
    per_image = rng.random((4, 16, 16)) > 0.5
    index = rng.integers(0, 4, 11)
    whole = analyse(maps, per_image, per_image, image_index=index, artefact_masks=per_image,
                    options=AnalysisOptions(batch_size=64))
    batched = analyse(maps, per_image, per_image, image_index=index, artefact_masks=per_image,
                      options=AnalysisOptions(batch_size=3))
    per_map = analyse(maps, per_image[index], per_image[index], artefact_masks=per_image[index],
                      options=AnalysisOptions(batch_size=4))
    import pandas as pd

    pd.testing.assert_frame_equal(whole, batched)
    pd.testing.assert_frame_equal(whole, per_map)


def test_batches_warn_once_and_name_bad_maps_by_their_place_in_the_whole_input():
    rng = np.random.default_rng(7)
    maps = rng.random((10, 12, 12)).astype(np.float32)
    maps[[1, 6, 9]] = 0.0                                   # degenerate maps in three different batches
    masks = rng.random((10, 12, 12)) > 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = analyse(maps, masks, options=AnalysisOptions(localisation=False, batch_size=4))
    degenerate = [w for w in caught if issubclass(w.category, DegenerateMapWarning)]
    assert len(degenerate) == 1 and str(degenerate[0].message).startswith("3 map(s)")
    assert (table.loc[[1, 6, 9], "c_IoU"] == 0).all() and len(table) == 10
    maps[6, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"maps \[6\]"):
        quiet(analyse, maps, masks, options=AnalysisOptions(batch_size=4))


def test_one_map_of_shape_h_w_is_one_row_whatever_the_batch_size():
    heat = blob(square(5, 7))
    mask = square(4, 8)
    one = analyse(heat, mask, mask, options=AnalysisOptions(batch_size=2))
    assert len(one) == 1
    assert one["c_IoU"][0] == pytest.approx(analyse(heat[None], mask[None], mask[None])["c_IoU"][0])


def test_kth_largest_by_selection_equals_the_gpu_path_by_sort_ties_and_zeros_included():
    from segx_helpers.scores.analysis import _kth_largest_by_sort, kth_largest

    rng = np.random.default_rng(8)
    flat = torch.as_tensor(np.round(rng.random((9, 50)) * 5) / 5, dtype=torch.float32)   # ties and zeros
    flat[3] = 0.0
    k = torch.as_tensor(rng.integers(1, 51, 9))
    positive = (flat > 0).sum(dim=1)
    by_sort = _kth_largest_by_sort(flat, k)
    assert torch.equal(kth_largest(flat, k), by_sort)
    assert torch.equal(kth_largest(flat, k, positive), by_sort)
    assert torch.equal(by_sort, torch.as_tensor([sorted(row, reverse=True)[kk - 1] for row, kk in
                                                 zip(flat.tolist(), k.tolist())], dtype=torch.float32))


def test_large_batches_with_fine_threshold_grids_count_in_int64_and_give_the_same_table():
    """Codes of row, mask pattern and threshold bin stop being exact in float32 from 2**24 on (a GPU batch
    of 1,024 maps on 10,001 thresholds): the engine then counts in int64."""
    rng = np.random.default_rng(10)
    maps = rng.random((440, 6, 6)).astype(np.float32)
    predicted, truth = rng.random((440, 6, 6)) > 0.5, rng.random((440, 6, 6)) > 0.5
    large = quiet(analyse, maps, predicted, truth, options=AnalysisOptions(n_thresholds=10001, batch_size=440))   # 440 * 40,004 > 2**24
    small = quiet(analyse, maps, predicted, truth, options=AnalysisOptions(n_thresholds=10001, batch_size=16))
    import pandas as pd

    pd.testing.assert_frame_equal(large, small)


@pytest.mark.parametrize("widest", ["whole image", "part of the image"])
def test_segx_scores_on_the_masks_pixels_only_equal_the_reference_at_the_edges(widest):
    """The engine scores SegX maps on the predicted mask's pixels only (the rest are zeros, counted):
    masks covering the whole image, one pixel or none, truth off the mask, all-zero and constant maps,
    and ties at zero must give the reference values."""
    rng = np.random.default_rng(11)
    maps = rng.random((10, 12, 12)).astype(np.float32)
    maps[:4] = np.round(maps[:4] * 3) / 3                  # ties, zeros among them
    maps[4] = 0.0
    maps[5] = 0.7
    predicted = rng.random((10, 12, 12)) > 0.7
    predicted[6] = False
    predicted[7] = False
    predicted[7, 3, 3] = True                              # one pixel
    predicted[8] = widest == "whole image"
    predicted[9] = ~predicted[9]
    truth = rng.random((10, 12, 12)) > 0.6
    truth[3] = False                                       # empty ground truth
    truth[9] = predicted[9]
    table = quiet(analyse, maps, predicted, truth, options=AnalysisOptions(p=10.0))
    names = {"IoU@10%": "top-10% IoU", "relevance mass": "relevance mass", "relevance rank": "relevance rank",
             "pointing game": "pointing game"}
    for order in ("mask-then-top", "top-then-mask"):
        values = segx(maps, predicted, order=order, p=10.0)
        loc = quiet(localisation_scores, values, truth, p=10.0)
        for ours, theirs in names.items():
            column = f"SegX {order} {ours}"
            assert np.abs(table[column].to_numpy() - loc[theirs].to_numpy()).max() < 1e-6, column
        assert np.abs(table[f"SegX {order} AUITC"].to_numpy() - quiet(auitc, values, truth)).max() < 1e-6, order
        from segx_helpers.scores.analysis import segx_saliency

        saliency = quiet(segx_saliency, maps, predicted, p=10.0, order=order).numpy()
        assert np.array_equal(saliency, quiet(top_percent, values, 10.0)), order


@pytest.mark.parametrize("zero_share", [0.0, 0.3, 0.7, 0.95, "mixed"])
def test_numpy_and_torch_selections_give_the_k_th_largest_value_whatever_the_share_of_zeros(zero_share):
    """On the CPU the engine selects with numpy's partition for rows at most half zero (faster there) and
    with torch otherwise (numpy's introselect slows down 20-fold on a SegX map's zeros): both must give
    the k-th largest value, ties included."""
    from segx_helpers.scores.analysis import _kth_largest_by_sort, _kth_of_rows, _numpy_selects, kth_largest

    rng = np.random.default_rng(12)
    flat = torch.as_tensor(rng.random((6, 400)), dtype=torch.float32)
    flat[:3] = torch.round(flat[:3] * 50) / 50                                   # ties
    shares = np.array([0.1, 0.8, 0.2, 0.9, 0.0, 0.7] if zero_share == "mixed" else [zero_share] * 6)
    flat[torch.as_tensor(rng.random((6, 400)) < shares[:, None])] = 0.0
    assert _numpy_selects(flat) == [bool(share <= 0.5) for share in shares]   # a batch may take both paths
    expected = torch.sort(flat, dim=1, descending=True).values
    assert torch.equal(_kth_of_rows(flat, 20), expected[:, 19])
    positive = (flat > 0).sum(dim=1)
    k = torch.as_tensor([rng.integers(1, n + 1) for n in positive.tolist()])   # the k-th largest is positive
    assert torch.equal(kth_largest(flat, k), _kth_largest_by_sort(flat, k))
    assert torch.equal(kth_largest(flat, k), expected.gather(1, (k - 1)[:, None])[:, 0])
    # packed rows (a SegX map's pixels on its mask, 150 of 400): k may count past them, into the zeros
    width = int(positive.max())
    packed = expected[:, :width]
    for k_packed in (k, torch.full((6,), width), torch.full((6,), 399)):
        reference = torch.where(positive >= k_packed, expected.gather(1, (k_packed - 1)[:, None])[:, 0], 0.0)
        assert torch.equal(kth_largest(packed, k_packed, positive), reference)
        assert torch.equal(_kth_largest_by_sort(packed, k_packed, positive), reference)


def test_engine_equals_the_reference_on_maps_mostly_zero():
    """Grad-CAM maps are often zero on most of the image (ReLU): the engine's torch selection path."""
    rng = np.random.default_rng(13)
    maps = rng.random((12, 20, 20)).astype(np.float32)
    maps[rng.random((12, 20, 20)) < 0.8] = 0.0
    predicted, truth = rng.random((12, 20, 20)) > 0.5, rng.random((12, 20, 20)) > 0.6
    table = quiet(analyse, maps, predicted, truth)
    reference = quiet(segu_scores, maps, predicted)
    for column in ("c_IoU", "c_AUITC", "SegU share inside", "SegU mass"):
        assert np.abs(table[column].to_numpy() - reference[column].to_numpy()).max() < 1e-6, column
    loc = quiet(localisation_scores, maps, truth)
    for ours, theirs in {"IoU@5%": "top-5% IoU", "relevance rank": "relevance rank", "relevance mass": "relevance mass",
                         "pointing game": "pointing game"}.items():
        assert np.abs(table[f"original {ours}"].to_numpy() - loc[theirs].to_numpy()).max() < 1e-6, ours
