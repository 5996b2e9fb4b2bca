"""SegX: keep an explanation map where the clinical-interest mask allows (``segx``), in the paper's or the
reference code's order; the validators and ``top_percent`` (the saliency map) live in
:mod:`segx_helpers.scores.saliency`, shared with SegU and the metrics."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from segx_helpers.scores.saliency import check_maps, check_masks, top_percent


def dilate(masks: np.ndarray, margin: int) -> np.ndarray:
    """Grow binary masks ``(N, H, W)`` by ``margin`` pixels (a Euclidean disk)."""
    masks = np.asarray(masks, dtype=bool)
    if margin <= 0:
        return masks
    r = int(margin)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (yy ** 2 + xx ** 2 <= r * r)[None]
    return ndimage.binary_dilation(masks, structure=disk)


def segx(maps: np.ndarray, masks: np.ndarray, mode: str = "binary", threshold: float = 0.5, margin: int = 0,
         renormalize: bool = False, order: str = "mask-then-top", p: float = 5.0) -> np.ndarray:
    """SegX maps ``(N, H, W)``: the explanation kept only where the clinical-interest mask allows.

    The saliency map of SegX is ``top_percent(segx(...), p)``. ``order`` says which comes first:

    * ``"mask-then-top"`` (default, as the reference code ``algo_fn/segx_gradcam.py`` does): the map
      times the mask; its top ``p`` % then lies entirely inside the mask.
    * ``"top-then-mask"`` (the paper, Eq. 7: ``m_segX = m_seg · m_xai`` with ``m_xai`` the original
      top ``p`` %): the map on its *original* top-``p`` % region, times the mask. This can only remove
      pixels from the original saliency map, so the gains it shows are small.

    ``mode="binary"``: multiply by ``masks >= threshold`` (our default: the threshold the segmenter
    tuned on validation; the reference code uses ``> 0.5``), dilated by ``margin`` pixels. Boolean
    masks are used as they are. ``mode="soft"``: multiply by the segmenter's probabilities
    (``margin`` then takes the maximum probability within the margin). ``renormalize`` rescales each
    map so its maximum is 1 (all-zero maps stay zero).
    """
    if order not in ("mask-then-top", "top-then-mask"):
        raise ValueError(f"order must be 'mask-then-top' or 'top-then-mask', got {order!r}")
    maps = check_maps(maps)
    masks = check_masks(masks, maps.shape)
    if mode == "binary":
        weight = dilate(masks >= threshold if masks.dtype != bool else masks, margin).astype(np.float32)
    elif mode == "soft":
        weight = masks.astype(np.float32)
        if margin > 0:
            r = int(margin)
            yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
            weight = ndimage.grey_dilation(weight, footprint=(yy ** 2 + xx ** 2 <= r * r)[None])
    else:
        raise ValueError(f"mode must be 'binary' or 'soft', got {mode!r}")
    out = maps * weight
    if order == "top-then-mask":
        out = out * top_percent(maps, p)
    if renormalize:
        peak = out.max(axis=(1, 2), keepdims=True)
        out = np.where(peak > 0, out / np.where(peak > 0, peak, 1), 0)
    return out.astype(np.float32)
