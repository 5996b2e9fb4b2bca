"""Validated attribution maps and masks, and saliency maps: the base that SegX, SegU and the metrics share.

Maps and masks are ``(N, H, W)`` arrays (a single ``(H, W)`` is accepted and treated as ``N = 1``).
Attribution maps must be finite and non-negative: CAMs are ReLU'd by construction and Gradient
SHAP maps are mean *absolute* values; :func:`check_maps` refuses NaN/inf and clips any negative
values to zero with a warning.
"""
from __future__ import annotations

import math
import warnings

import numpy as np


class DegenerateMapWarning(UserWarning):
    """A map or mask was empty or constant; a documented fallback value was used."""


def check_maps(maps: np.ndarray, name: str = "maps") -> np.ndarray:
    """Validate a batch of attribution maps: ``(N, H, W)`` float, finite; negatives clipped to 0 (warned)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {maps.shape}")
    low, high = (float(maps.min()), float(maps.max())) if maps.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = np.flatnonzero(~np.isfinite(maps).all(axis=(1, 2)))
        raise ValueError(f"{name} contain NaN or inf values (maps {bad[:5].tolist()}); refusing to score them")
    if low < 0:
        warnings.warn(f"{name} have negative values; they are clipped to 0 (use absolute values for signed attributions)",
                      UserWarning, stacklevel=3)
        maps = np.maximum(maps, 0)
    return maps


def check_masks(masks: np.ndarray, shape: tuple[int, ...] | None = None, name: str = "masks") -> np.ndarray:
    """Validate masks: ``(N, H, W)`` bool or probabilities in [0, 1], optionally of a given shape."""
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {masks.shape}")
    if shape is not None and masks.shape != tuple(shape):
        raise ValueError(f"{name} have shape {masks.shape} but the maps have shape {tuple(shape)}; "
                         "resize masks to the maps' resolution first")
    if masks.dtype != bool and (not np.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1):
        raise ValueError(f"{name} must be boolean or probabilities in [0, 1]")
    return masks


def top_percent(maps: np.ndarray, p: float = 5.0, rule: str = "ties-kept") -> np.ndarray:
    """Saliency maps: bool ``(N, H, W)`` marking each map's top ``p`` % pixels (the paper uses p = 5).

    ``rule="ties-kept"`` (default): ``k = ceil(p/100 * H*W)`` pixels are kept, plus any pixels tied
    with the k-th value, so a constant positive map keeps every pixel. Only positive pixels qualify:
    an all-zero map keeps none. ``rule="percentile"``: the reference code's
    ``map > np.percentile(map, 100 - p)``. The two agree on maps without ties at the cut; on tied
    maps the reference keeps fewer pixels (a constant map: none).
    """
    maps = check_maps(maps)
    if not 0 < p <= 100:
        raise ValueError(f"p must be in (0, 100], got {p}")
    if rule == "percentile":
        return maps > np.percentile(maps, 100 - p, axis=(1, 2), keepdims=True)
    if rule != "ties-kept":
        raise ValueError(f"rule must be 'ties-kept' or 'percentile', got {rule!r}")
    n, h, w = maps.shape
    if n == 0:
        return np.zeros(maps.shape, dtype=bool)
    flat = maps.reshape(n, h * w)
    k = max(1, math.ceil(p / 100.0 * h * w))
    return ((flat >= kth_largest_positive(flat, k)[:, None]) & (flat > 0)).reshape(n, h, w)


def kth_largest_positive(flat: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """Per row of ``flat`` ``(N, P)``: the k-th largest value when the row has at least k positive
    values, else 0 (so ``flat >= kth`` together with ``flat > 0`` keeps every positive pixel).

    ``k`` may differ per row. Zeros are replaced by distinct negative numbers before partitioning:
    numpy's partition is far slower on thousands of tied zeros (a SegX map is zero outside the mask; docs/NOTES.md,
    "Numbers that left the docstrings").
    """
    pixels = flat.shape[1]
    work = np.where(flat > 0, flat, -np.arange(1, pixels + 1, dtype=np.float32)[None, :])
    ks = np.broadcast_to(np.asarray(k), (len(flat),))
    if (ks == ks[0]).all():
        kth = np.partition(work, pixels - int(ks[0]), axis=1)[:, pixels - int(ks[0])]
    else:
        kth = np.array([np.partition(row, pixels - int(kk))[pixels - int(kk)] for row, kk in zip(work, ks)])
    return np.where(kth > 0, kth, 0).astype(flat.dtype)


def peak_in_border_cell(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Whether each map's peak ``(M, H, W)`` lies in a border cell of the ``grid`` ``(h, w)`` its explanation was
    computed on (a Grad-CAM's feature grid: 4 x 4 for a ResNet's or an EfficientNet's last block at 128 px):
    ``(M,)`` bool. By chance ``1 - (h - 2)(w - 2) / (h w)`` of the peaks do (3/4 on a 4 x 4 grid); far more means the
    maps mostly light up the image's edges (where rulers, dark corners and gel borders sit) and read little of
    the lesion."""
    maps = np.asarray(maps)
    h, w = grid
    m, rows, cols = maps.shape
    flat = maps.reshape(m, -1).argmax(axis=1)
    cell_row = (flat // cols) * h // rows
    cell_col = (flat % cols) * w // cols
    return (cell_row == 0) | (cell_row == h - 1) | (cell_col == 0) | (cell_col == w - 1)
