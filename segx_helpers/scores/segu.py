"""SegU: how far a prediction's *original* explanation lies from the clinical-interest region,
read as a certainty score. Whether a score separates right from wrong predictions, and what it buys
in selective prediction, is measured with :mod:`segx_helpers.scores.selective`.

The paper (Zhang, Zhu, Luo 2025, Eq. 9-10) defines two scores: ``c_IoU``, the IoU of the original
map's top-5 % region with the segmenter's mask (:func:`segu_iou`), and ``c_AUITC``, the area under the
IoU-threshold curve (:func:`segu_auitc`). :func:`segu_share_inside`, :func:`segu_mass` and
:func:`segu_distance` are our variants. These are the plain numpy reference implementations; the
notebooks use :func:`segx_helpers.scores.analysis.analyse`, which gives the same values batched.

Scores take ``(maps, masks) -> (N,)`` with maps the un-masked explanations ``(N, H, W)`` and masks
the segmenter's binary prediction ``(N, H, W)``. Higher means more certain. For an empty mask
(no clinical region found) or a map with no positive value (nothing explained) every score is
0.0, the least certain value, and a :class:`~segx_helpers.scores.segx.DegenerateMapWarning` says how
many samples were affected. A constant positive map selects every pixel as its "top" region,
so its share-inside score is the mask's share of the image.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import ndimage

from segx_helpers.scores.metrics import localisation_inputs, warn_degenerate, auitc, relevance_mass, top_percent_iou
from segx_helpers.scores.saliency import DegenerateMapWarning, top_percent


def segu_share_inside(maps: np.ndarray, masks: np.ndarray, p: float = 5.0) -> np.ndarray:
    """Our variant (not the paper's score): the share of the original top-``p`` % saliency region that
    lies inside the predicted clinical-interest mask, ``|top_p(map) ∩ mask| / |top_p(map)|``.

    Unlike the paper's :func:`segu_iou` it does not penalise a small saliency region inside a large
    mask, so it reads "did the explanation stay inside the region?" rather than "does it cover it?".
    """
    maps, masks = localisation_inputs(maps, masks)
    return overlap_from_top(top_percent(maps, p), masks)


def overlap_from_top(top: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """:func:`segu_share_inside` from an already computed top-p region ``(N, H, W)`` bool."""
    size = top.sum(axis=(1, 2))
    inside = (top & masks).sum(axis=(1, 2))
    degenerate = (size == 0) | ~masks.any(axis=(1, 2))
    warn_degenerate(degenerate, "an all-zero map or an empty mask")
    return np.where(degenerate, 0.0, inside / np.maximum(size, 1))


def segu_mass(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Continuous variant without a threshold: the share of all attribution inside the mask."""
    maps, masks = localisation_inputs(maps, masks)
    empty = ~masks.any(axis=(1, 2))
    warn_degenerate(empty, "an empty mask")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = relevance_mass(maps, masks)
    warn_degenerate(~empty & (maps.max(axis=(1, 2)) <= 0), "an all-zero map")
    return np.where(empty, 0.0, score)


def segu_iou(maps: np.ndarray, masks: np.ndarray, p: float = 5.0) -> np.ndarray:
    """The paper's ``c_IoU`` (Eq. 9): IoU of the *original* map's top-``p`` % region with the predicted mask."""
    maps, masks = localisation_inputs(maps, masks)
    warn_degenerate(~masks.any(axis=(1, 2)) | (maps.max(axis=(1, 2)) <= 0), "an all-zero map or an empty mask")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.where(masks.any(axis=(1, 2)), top_percent_iou(maps, masks, p), 0.0)


def segu_iou_ceiling(mask_area: np.ndarray, p: float = 5.0) -> np.ndarray:
    """The largest ``c_IoU`` a top-``p`` % region can reach against a mask covering ``mask_area`` of the image
    (``(N,)`` shares in [0, 1]): ``(p / 100) / area`` when the mask is larger than the region, ``area / (p / 100)``
    when it is smaller, 0 for an empty mask. The paper's ``c_IoU`` is bounded by it, so on data whose lesion size
    differs between classes (ISIC: malignant lesions are larger) ``c_IoU`` follows lesion size; ``c_IoU`` over this
    ceiling (``c_IoU / max``) is a size-aware variant."""
    area = np.asarray(mask_area, dtype=float)
    region = p / 100.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area <= 0, 0.0, np.minimum(area, region) / np.maximum(area, region))


def segu_auitc(maps: np.ndarray, masks: np.ndarray, n_thresholds: int = 101) -> np.ndarray:
    """The paper's ``c_AUITC`` (Eq. 10): the area under the IoU–threshold curve of the *original* map
    against the predicted mask, ``∫_0^1 c_IoU(τ) dτ`` (see :func:`segx_helpers.scores.metrics.auitc` for the
    grid and the scaling). 0.0 for an all-zero map or an empty mask, with a warning."""
    maps, masks = localisation_inputs(maps, masks)
    degenerate = ~masks.any(axis=(1, 2)) | (maps.max(axis=(1, 2)) <= 0)
    warn_degenerate(degenerate, "an all-zero map or an empty mask")
    return np.where(degenerate, 0.0, auitc(maps, masks, n_thresholds))


def segu_distance(maps: np.ndarray, masks: np.ndarray, p: float = 5.0) -> np.ndarray:
    """Distance-based certainty ``1 - mean_dist / diagonal`` in [0, 1].

    ``mean_dist`` is the mean Euclidean distance (pixels) from the top-``p`` % saliency pixels to
    the nearest mask pixel (0 inside the mask), ``diagonal`` the image diagonal: 1.0 when the whole
    saliency region is inside the mask, lower the farther away it lies.
    """
    maps, masks = localisation_inputs(maps, masks)
    return distance_from_top(top_percent(maps, p), masks)


def distance_from_top(top: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """:func:`segu_distance` from an already computed top-p region; each distinct mask's distance
    transform is computed once (maps of several classes of one image share it)."""
    n, h, w = top.shape
    diagonal = float(np.hypot(h, w))
    degenerate = ~top.any(axis=(1, 2)) | ~masks.any(axis=(1, 2))
    warn_degenerate(degenerate, "an all-zero map or an empty mask")
    out = np.zeros(n)
    distances: dict[bytes, np.ndarray] = {}
    for i in np.flatnonzero(~degenerate):
        key = np.packbits(masks[i]).tobytes()
        if key not in distances:
            distances[key] = ndimage.distance_transform_edt(~masks[i])
        out[i] = 1.0 - distances[key][top[i]].mean() / diagonal
    return out


SEGU_SCORES = {"c_IoU": segu_iou, "c_AUITC": segu_auitc, "SegU share inside": segu_share_inside,
               "SegU mass": segu_mass, "SegU distance": segu_distance}
"""The paper's two scores (``c_IoU``, ``c_AUITC``) and our variants, by column name. These numpy
functions are the reference implementations; :func:`segx_helpers.scores.analysis.analyse` computes the
same columns batched on the maps' device and is what the notebooks call."""


def segu_scores(maps: np.ndarray, masks: np.ndarray, p: float = 5.0, n_thresholds: int = 101) -> pd.DataFrame:
    """All SegU scores per sample with the reference functions: one column per score, ``N`` rows."""
    options = {segu_mass: {}, segu_auitc: {"n_thresholds": n_thresholds}}
    if len(maps) == 0:
        warnings.warn("no maps to score: returning an empty table", DegenerateMapWarning, stacklevel=2)
        return pd.DataFrame({name: pd.Series(dtype=float) for name in SEGU_SCORES})
    return pd.DataFrame({name: fn(maps, masks, **options.get(fn, {"p": p})) for name, fn in SEGU_SCORES.items()})
