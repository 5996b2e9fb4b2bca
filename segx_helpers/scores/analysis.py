"""The one analysis path: SegX, SegU and localisation scores for a batch of explanation maps.

:func:`analyse` (what the notebooks, ``segx audit`` and the benchmark call) scores ``maps`` ``(M, H, W)``, one per
explained (image, class), against boolean masks ``(N, H, W)`` picked per map by ``image_index`` ``(M,)`` (or given
``(M, H, W)``), in batches on the maps' device, to 1e-6 of the numpy references in ``scores.segx``, ``segu`` and
``metrics``. How the engine works and what it costs on a CPU: docs/NOTES.md, "Benchmark of the analysis path".
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from segx_helpers.scores.metrics import paired_summary
from segx_helpers.scores.saliency import DegenerateMapWarning
from segx_helpers.scores.segu import distance_from_top

ORDERS = ("mask-then-top", "top-then-mask")
"""SegX orders. ``mask-then-top`` (the reference code): multiply the map by the mask, then take the
top p % of the product. ``top-then-mask`` (the paper, Eq. 7): take the original top p %, then keep
its part inside the mask."""

LOCALISATION = ("IoU@p", "AUITC", "relevance mass", "relevance rank", "pointing game")


def binarise_masks(prob: np.ndarray | torch.Tensor, threshold: float = 0.5, as_reference_code: bool = False):
    """The one place where segmenter probabilities become masks: ``prob >= threshold`` (our default,
    with the threshold tuned on validation and stored in the segmenter's checkpoint), or the reference
    code's ``prob > 0.5`` when ``as_reference_code=True``. Boolean arrays pass through unchanged."""
    if getattr(prob, "dtype", None) in (bool, np.bool_, torch.bool):
        return prob
    if as_reference_code:
        return prob > 0.5
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return prob >= threshold


def segx_label(order: str) -> str:
    """Column prefix of the SegX maps of one order."""
    check_order(order)
    return f"SegX {order}"


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


# ------------------------------------------------------------------------------ engine (torch)

def _tensor(x, device, dtype=None) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    return t.to(dtype) if dtype is not None else t


def _as_float(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as its 0.0/1.0 float32 indicator (through uint8: torch's bool-to-float cast is slower). The
    engine keeps every region and mask as such an indicator: counts are float sums, exact below 2**24 pixels, where
    summing booleans copies them to integers first, and comparisons write floats, faster than writing booleans
    (docs/NOTES.md, "How the engine works", has the measurements)."""
    return mask.view(torch.uint8).float() if mask.dtype == torch.bool else mask.float()


def _count(indicator: torch.Tensor) -> torch.Tensor:
    """Per-row number of ones ``(M,)`` float64 of a 0/1 float32 indicator ``(M, P)`` (exact)."""
    return indicator.sum(dim=1).double()


def _overlap(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row ``sum(a * b)`` ``(M,)`` float64 of two float32 ``(M, P)``: the pixels two indicators share,
    or the attribution of a map on an indicator. ``scratch``: an ``(M, P)`` buffer for the product (``a``
    itself when the caller no longer needs it); on the CPU a fresh buffer for every product costs more
    than the product."""
    return _total(torch.mul(a, b, out=scratch))


def _test(compare, values: torch.Tensor, reference, out: torch.Tensor | None = None) -> torch.Tensor:
    """``compare(values, reference)`` (``torch.ge``, ``gt``, ``eq``...) as a 0/1 float32 indicator (into
    ``out``, a scratch buffer of ``values``' shape, when given)."""
    return compare(values, reference, out=torch.empty_like(values) if out is None else out)


def _total(values: torch.Tensor) -> torch.Tensor:
    """Per-row sum ``(M,)`` float64 of a float32 ``(M, P)``: accumulated in float32 by torch's pairwise
    (cascade) summation, relative error about 1e-7, where ``sum(dtype=float64)`` copies the whole array."""
    return values.sum(dim=1).double()


def _check_maps(maps: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(maps (M, H, W) float32, per-map min (M,), per-map max (M,))``; NaN/inf refused (naming the maps,
    numbered from ``first``), negatives clipped."""
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (M, H, W), got {tuple(maps.shape)}")
    maps = maps.float()
    if not maps.numel():
        return maps, maps.new_zeros(len(maps)), maps.new_zeros(len(maps))
    flat = maps.flatten(1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)  # NaN and inf propagate into these (aminmax is slower on a CPU)
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        bad = (torch.nonzero(~(torch.isfinite(low) & torch.isfinite(high))).flatten()[:5] + first).tolist()
        raise ValueError(f"maps contain NaN or inf values (maps {bad}); refusing to score them")
    if low.min() < 0:
        warnings.warn("maps have negative values; they are clipped to 0 (use absolute values for signed attributions)",
                      UserWarning, stacklevel=3)
        maps, low, high = maps.clamp_min(0), low.clamp_min(0), high.clamp_min(0)
    huge = high * flat.shape[1] >= torch.finfo(torch.float32).max / 16  # a sum over the map could overflow
    if huge.any():
        warnings.warn(f"{int(huge.sum())} map(s) have values up to {float(high.max()):.3g}, so large that float32 sums "
                      "over a map overflow; they are divided by their maximum (no score depends on a map's scale)",
                      UserWarning, stacklevel=3)
        scale = torch.where(huge, high, torch.ones_like(high))
        maps, low, high = maps / scale[:, None, None], low / scale, high / scale
    return maps, low, high


def kth_largest(flat: torch.Tensor, k: torch.Tensor, positive: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k``-th largest value ``(M,)`` of each row of the non-negative ``flat`` ``(M, P)``, ``k``
    ``(M,)`` in ``1 .. P``: one selection (not a sort) per row, since ``k`` differs between rows (on the
    CPU numpy's ``partition`` where it is fast, :func:`_numpy_selects`); 0 without any work for a row with
    fewer than ``k`` positive values (``positive`` ``(M,)``, when the caller knows them: SegX maps are
    zero outside the mask). With ``positive``, ``flat`` may be a :class:`Support`'s packed rows and ``k``
    count the whole map."""
    pixels = flat.shape[1]
    k = torch.as_tensor(k, device=flat.device).long().clamp_min(1)
    if flat.device.type != "cpu":  # on a GPU one batched sort beats a launch per row
        return _kth_largest_by_sort(flat, k, positive)
    k = k.clamp_max(pixels) if positive is None else k
    out = np.zeros(len(flat), dtype=np.float32)
    values = flat.detach().numpy()
    rows = range(len(flat)) if positive is None else torch.nonzero(positive >= k).flatten().tolist()
    by_numpy = _numpy_selects(flat, positive)
    for row in rows:
        at = pixels - int(k[row])
        out[row] = np.partition(values[row], at)[at] if by_numpy[row] else torch.kthvalue(flat[row], at + 1).values
    return torch.from_numpy(out)


def _numpy_selects(flat: torch.Tensor, positive: torch.Tensor | None = None) -> list[bool]:
    """Per row of the non-negative ``flat`` ``(M, P)`` (``positive`` its positive counts, if known): whether
    to select with numpy's ``partition``, faster than torch's selection on the CPU but far slower when most of a
    row is one value (a SegX map's zeros off the mask; docs/NOTES.md, "How the engine works"): yes when at most
    half the row is zero."""
    positive = _count(_test(torch.gt, flat, 0.0)) if positive is None else positive
    return (positive * 2 >= flat.shape[1]).tolist()


def _kth_largest_by_sort(flat: torch.Tensor, k: torch.Tensor, positive: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`kth_largest` with one sort of the batch (the GPU path)."""
    k = torch.as_tensor(k, device=flat.device).long().clamp_min(1)
    kth = torch.sort(flat, dim=1, descending=True).values.gather(1, (k.clamp_max(flat.shape[1]) - 1)[:, None])[:, 0]
    return kth if positive is None else torch.where(positive >= k, kth, torch.zeros_like(kth))


def top_p_count(p: float, pixels: int) -> int:
    """``k = ceil(p % · pixels)``, at least 1: the size of the top-``p`` % region before ties."""
    if not 0 < p <= 100:
        raise ValueError(f"p must be in (0, 100], got {p}")
    return max(1, math.ceil(p / 100.0 * pixels))


def top_p_cut(flat: torch.Tensor, p: float, positive: torch.Tensor | None = None,
              pixels: int | None = None) -> torch.Tensor:
    """Per row of ``flat`` ``(M, P)``: the value ``v`` such that ``(flat >= v) & (flat > 0)`` is the
    top-``p`` % region (the k-th largest value, or 0 when a row has fewer than k positive values:
    known without a selection for rows whose count of positive values ``positive`` ``(M,)`` is given).
    ``pixels``: the maps' size when ``flat`` holds a :class:`Support`'s packed rows (then ``positive`` is
    required)."""
    k = top_p_count(p, flat.shape[1] if pixels is None else pixels)
    if positive is None or bool((positive >= k).all()):
        return _kth_of_rows(flat, k, positive).clamp_min(0)
    cut = flat.new_zeros(len(flat))
    rows = torch.nonzero(positive >= k).flatten()
    if len(rows):
        cut[rows] = _kth_of_rows(flat[rows], k, positive[rows])
    return cut


def _kth_of_rows(flat: torch.Tensor, k: int, positive: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k``-th largest value ``(M,)`` of every row of the non-negative ``flat`` ``(M, P)``: batched
    selections, numpy's ``partition`` on the CPU for the rows where it is fast (:func:`_numpy_selects`),
    ``torch.topk`` for the others and on a GPU."""
    if flat.device.type != "cpu":
        return torch.topk(flat, k, dim=1, sorted=False).values.amin(dim=1)
    by_numpy = _numpy_selects(flat, positive)
    at = flat.shape[1] - k
    if all(by_numpy):
        return torch.from_numpy(np.partition(flat.detach().numpy(), at, axis=1)[:, at].copy())
    out = flat.new_empty(len(flat))
    values = flat.detach().numpy()
    for row in np.flatnonzero(by_numpy):   # row by row: no copy of these rows out of the batch
        out[row] = float(np.partition(values[row], at)[at])
    rows = torch.as_tensor(np.flatnonzero(~np.asarray(by_numpy)))
    out[rows] = torch.topk(flat[rows], k, dim=1, sorted=False).values.amin(dim=1)
    return out


def _region(flat: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """The indicator of ``(flat >= cut) & (flat > 0)`` ``(M, P)``, one pass when every cut is positive."""
    region = _test(torch.ge, flat, cut[:, None])
    return region if bool((cut > 0).all()) else region.mul_(_test(torch.gt, flat, 0.0))


def top_p_indicator(flat: torch.Tensor, p: float, positive: torch.Tensor | None = None,
                    pixels: int | None = None) -> torch.Tensor:
    """The top-``p`` % region of ``flat`` ``(M, P)`` as a 0/1 float32 indicator ``(M, P)`` (``positive``,
    ``pixels`` as in :func:`top_p_cut`)."""
    return _region(flat, top_p_cut(flat, p, positive, pixels))


@dataclass(frozen=True)
class Support:
    """The pixels where a boolean ``(M, P)`` support is true, packed row by row to the front of ``(M, L)``
    rows (``L`` the largest row count, at least 1; the rest of a row is padding: 0).

    SegX maps are zero outside the predicted mask (a fifth of the image in the synthetic sets), so the
    engine scores them on the mask's pixels only. Every score of a non-negative map needs the pixels
    outside only as a count of zeros (and how many of them lie in the ground-truth mask), which the
    scoring functions take as ``pixels`` and ``outside`` arguments."""

    source: torch.Tensor    # (S,) flat index of each support pixel in the (M, P) input, row by row
    target: torch.Tensor    # (S,) its flat index in the packed (M, L) rows
    shape: tuple[int, int]  # (M, P)
    width: int              # L

    @classmethod
    def of(cls, support: torch.Tensor) -> "Support":
        counts = _count(_as_float(support)).long()
        width = max(1, int(counts.max())) if len(counts) else 1
        slots = torch.arange(width, device=support.device)[None] < counts[:, None]
        return cls(_flat_nonzero(support), _flat_nonzero(slots), tuple(support.shape), width)

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``(M, P)`` on the support, packed ``(M, L)``."""
        packed = values.new_zeros(self.shape[0], self.width)
        packed.view(-1).index_copy_(0, self.target, values.reshape(-1).index_select(0, self.source))
        return packed

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed rows ``(M, L)`` back in place ``(M, P)``, zero (False) off the support."""
        values = packed.new_zeros(self.shape)
        values.view(-1).index_copy_(0, self.source, packed.reshape(-1).index_select(0, self.target))
        return values


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices ``(S,)`` int64 of the true values of a boolean tensor, in order (numpy's ``flatnonzero``
    on the CPU, where it is faster than ``torch.nonzero``)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask.reshape(-1)).squeeze(1)


def threshold_grid(n_thresholds: int) -> np.ndarray:
    """The thresholds ``tau_j = j / (n - 1)``, ``j = 0 .. n - 1``, in float32 (correctly rounded)."""
    if n_thresholds < 2:
        raise ValueError(f"n_thresholds must be at least 2, got {n_thresholds}")
    return np.arange(n_thresholds, dtype=np.float32) / np.float32(n_thresholds - 1)


def auitc_from_flat(flat: torch.Tensor, masks: Sequence[torch.Tensor], n_thresholds: int = 101,
                    low: torch.Tensor | None = None, high: torch.Tensor | None = None, *,
                    pixels: int | None = None, outside: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Area under the IoU–threshold curve ``(M,)`` of each map of ``flat`` ``(M, P)`` against each mask
    set in ``masks`` (each an ``(M, P)`` 0/1 float32 indicator), as :func:`segx_helpers.scores.metrics.auitc`
    defines it.

    ``flat`` may instead be a :class:`Support`'s packed rows of non-negative maps of ``pixels`` pixels,
    against one packed mask, ``outside`` ``(M,)`` counting the mask's pixels off the support: the
    ``pixels - L`` zeros not stored join the lowest bin (the highest for an all-zero map, which scales
    to all ones).

    Each map is min-max scaled to [0, 1] (a constant positive map becomes all ones). Every pixel gets
    the index of the highest threshold it reaches (``#{j: tau_j <= v} - 1``, exact, also for values on
    a threshold, without a pass per threshold), combined with its mask bits into one code; one
    ``bincount`` then counts, per map, threshold bin and mask pattern. Reversed cumulative sums give, at
    every threshold at once, the selected pixels and those inside each mask, hence the IoU curve,
    integrated with the trapezoid rule.
    """
    rows, stored = flat.shape
    pixels = stored if pixels is None else pixels
    if outside is not None and len(masks) != 1:
        raise ValueError("packed rows are scored against one mask")
    last = n_thresholds - 1
    threshold_grid(n_thresholds)
    if low is None or high is None:
        low, high = flat.amin(dim=1), flat.amax(dim=1)
    if pixels > stored:  # zeros off the support
        low = low.clamp_max(0)
    span = high - low
    constant = span <= 0
    span = torch.where(constant, torch.ones_like(span), span)
    # the bin of each pixel, #{j: tau_j <= v} - 1, with v = (x - low) / span the reference's float32
    # value and tau_j = fl32(j / last): floor(v * last) is that bin or off by one where the product
    # rounds across an integer; two comparisons with the grid's own thresholds correct it
    scaled = torch.sub(flat, low[:, None]).div_(span[:, None]) if bool((low != 0).any()) else flat / span[:, None]
    bins = torch.mul(scaled, last).floor_()
    edge = torch.div(bins, last)
    bins.sub_(torch.lt(scaled, edge, out=edge))            # v < tau_b: one bin lower
    edge = torch.add(bins, 1, out=edge).div_(last)
    bins.add_(torch.ge(scaled, edge, out=edge))            # v >= tau_(b+1): one bin higher
    del scaled, edge
    if constant.any():
        bins[torch.nonzero(constant).flatten()] = float(last)  # a constant map scales to all ones
    width = n_thresholds * 2 ** len(masks)
    code = bins  # in [0, last] by construction; one code per pixel: row, mask pattern, bin (float32: exact below 2**24)
    for k, mask in enumerate(masks):
        code.add_(mask, alpha=n_thresholds * 2 ** k)
    if rows * width < 2 ** 24:
        code = code.add_(torch.arange(rows, device=flat.device, dtype=code.dtype)[:, None] * width).int()
    else:
        code = code.long() + torch.arange(rows, device=flat.device)[:, None] * width
    counts = torch.bincount(code.flatten(), minlength=rows * width)
    counts = counts.reshape(rows, 2 ** len(masks), n_thresholds)
    if outside is not None:  # the zeros off the support (a negative count when padding stood in for them)
        at = torch.where(constant, last, 0)
        every = torch.arange(rows, device=flat.device)
        counts[every, 1, at] += outside.long()
        counts[every, 0, at] += pixels - stored - outside.long()
    counts = counts.flip(2).cumsum(2).flip(2).double()
    selected = counts.sum(dim=1)
    pattern = torch.arange(2 ** len(masks), device=flat.device)
    areas = []
    for k, mask in enumerate(masks):
        inside = counts[:, (pattern >> k) & 1 == 1].sum(dim=1)
        size = _count(mask) if outside is None else _count(mask) + outside.double()
        union = selected + size[:, None].double() - inside
        iou = torch.where(union > 0, inside / union.clamp_min(1), torch.zeros_like(union))
        areas.append(((iou[:, 1:] + iou[:, :-1]) / 2).sum(dim=1) / last)
    return areas


def _iou(region: torch.Tensor, mask: torch.Tensor, mask_size: torch.Tensor | None = None,
         scratch: torch.Tensor | None = None, inter: torch.Tensor | None = None) -> torch.Tensor:
    """IoU ``(M,)`` of two indicators ``(M, P)`` (``mask_size`` the mask's whole size, for packed rows;
    ``inter`` their overlap, when known)."""
    inter = _overlap(region, mask, scratch) if inter is None else inter
    mask_size = _count(mask) if mask_size is None else mask_size
    union = _count(region) + mask_size - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def _mass(flat: torch.Tensor, mask: torch.Tensor, total: torch.Tensor | None = None,
          scratch: torch.Tensor | None = None) -> torch.Tensor:
    total = _total(flat) if total is None else total
    inside = _overlap(flat, mask, scratch)
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total))


def _pointing(flat: torch.Tensor, mask: torch.Tensor, peak: torch.Tensor | None = None,
              scratch: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 where the map's peak (``peak``, the row maxima) lies in the mask: the largest value inside the
    mask reaches it (values are non-negative)."""
    peak = flat.amax(dim=1) if peak is None else peak
    hit = (torch.mul(flat, mask, out=scratch).amax(dim=1) == peak) & (peak > 0)
    return hit.double()


def _rank(flat: torch.Tensor, mask: torch.Tensor, kth: torch.Tensor, sizes: torch.Tensor,
          peak: torch.Tensor, pixels: int | None = None, outside: torch.Tensor | None = None,
          scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance rank accuracy: share of the ``K = |mask|`` highest pixels inside the mask, ties in
    expectation (as :func:`segx_helpers.scores.metrics.relevance_rank_accuracy`); ``kth`` the K-th largest
    value of each row (:func:`kth_largest`), ``sizes`` K, ``peak`` the row maxima. Values are
    non-negative, so the pixels above the K-th value are ``flat > kth`` and its ties ``flat == kth``
    (the zeros, when fewer than K pixels are positive). Packed rows (:class:`Support`, with ``pixels``
    and ``outside`` ``(M,)`` the mask's pixels off the support) add the zeros not stored to the ties at 0.
    ``scratch``: a buffer of ``flat``'s shape for the indicators."""
    valid = (sizes > 0) & (peak > 0)
    k = sizes.double().clamp_min(1)
    above = _test(torch.gt, flat, kth[:, None], scratch)
    from_ties = k - _count(above)
    hits = _overlap(above, mask, above)
    tied = _test(torch.eq, flat, kth[:, None], above)
    ties, ties_inside = _count(tied), _overlap(tied, mask, tied)
    if outside is not None:
        at_zero = kth == 0
        ties = ties + torch.where(at_zero, pixels - flat.shape[1], 0)
        ties_inside = ties_inside + torch.where(at_zero, outside, 0)
    hits = hits + from_ties * ties_inside / ties.clamp_min(1)
    return torch.where(valid, hits / k, torch.zeros_like(k))


def segx_saliency(maps, masks, p: float = 5.0, order: str = "mask-then-top", device=None,
                  batch_size: int | None = None) -> torch.Tensor:
    """SegX saliency maps, bool ``(M, H, W)`` on ``device``: the top-``p`` % of the SegX map of ``order``
    (the engine's counterpart of ``top_percent(segx(maps, masks, order=order), p)``); masks boolean ``(M, H, W)``.
    Computed ``batch_size`` maps at a time, as :func:`analyse`."""
    maps = torch.as_tensor(maps)
    device = torch.device(device) if device is not None else maps.device
    maps, _, _ = _check_maps(maps.to(device))
    masks = torch.as_tensor(masks, device=device)
    if masks.dtype != torch.bool or masks.shape != maps.shape:
        raise ValueError(f"masks must be boolean of the maps' shape {tuple(maps.shape)}")
    m = len(maps)
    batch_size = batch_size or (16 if device.type == "cpu" else 1024)
    flat, flat_masks = maps.reshape(m, -1), masks.reshape(m, -1)
    parts = [_segx_region(flat[rows], flat_masks[rows], order, p)
             for rows in (slice(start, start + batch_size) for start in range(0, m, batch_size))]
    return (torch.cat(parts) if parts else flat_masks.clone()).reshape(maps.shape)


def _segx_region(flat: torch.Tensor, masks: torch.Tensor, order: str, p: float) -> torch.Tensor:
    """The top-``p`` % region ``(M, P)`` bool of the SegX maps of ``flat`` ``(M, P)`` and boolean ``masks``,
    selected among the masks' pixels only (:class:`Support`): the map inside the mask (``mask-then-top``),
    or the map on its original top-``p`` % region inside the mask (``top-then-mask``)."""
    check_order(order)
    with torch.no_grad():
        support = Support.of(masks)
        values = support.pack(flat)
        if order == "top-then-mask":
            values.mul_(support.pack(top_p_indicator(flat, p)))
        positive = _count(_test(torch.gt, values, 0.0))
        return support.unpack(top_p_indicator(values, p, positive, flat.shape[1]).bool())


@dataclass(frozen=True)
class AnalysisOptions:
    """What :func:`analyse` scores and how.

    ``p``: the top-percentage of a saliency map (5 in the paper). ``n_thresholds``: the evenly spaced thresholds of
    the AUITC's trapezoid rule. ``orders``: the SegX orders whose maps are localised (:data:`ORDERS`).
    ``localisation``: score against the true masks when they are given. ``distance``: add ``SegU distance``
    (scipy's exact distance transform on the CPU, once per distinct mask). ``device``: where to compute (default:
    the maps' own). ``batch_size``: maps per batch (default 16 on the CPU, 1,024 on a GPU; docs/NOTES.md says
    why); the scores do not depend on it. Bad values are refused here, naming the field."""

    p: float = 5.0
    n_thresholds: int = 101
    orders: Sequence[str] = ORDERS
    localisation: bool = True
    distance: bool = False
    device: str | torch.device | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        top_p_count(self.p, 1)
        threshold_grid(self.n_thresholds)
        for order in self.orders:
            check_order(order)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def _on_device(masks, device: torch.device) -> torch.Tensor | None:
    """Masks (numpy or torch, ``(N, H, W)`` or one ``(H, W)``) as a tensor on ``device``, once for every batch."""
    if masks is None:
        return None
    masks = _tensor(masks if torch.is_tensor(masks) else np.asarray(masks), device)
    return masks[None] if masks.ndim == 2 else masks


def _rows_of(masks: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The masks of a batch's maps when masks are given one per map (None stays None)."""
    return None if masks is None else masks[rows]


def analyse(maps, predicted_masks, true_masks=None, image_index=None, has_true_mask=None, artefact_masks=None, *,
            options: AnalysisOptions | None = None) -> pd.DataFrame:
    """Every SegU and localisation score, one row per map.

    ``maps`` ``(M, H, W)`` the *original* explanations (numpy or torch). ``predicted_masks`` the segmenter's
    *binary* masks (see :func:`binarise_masks`), ``true_masks`` the ground truth (optional), both ``(N, H, W)``
    picked per map by ``image_index`` ``(M,)``, or ``(M, H, W)`` when ``image_index`` is None. ``has_true_mask``
    ``(N,)``: images without a ground-truth mask get NaN localisation scores. ``artefact_masks`` (where spurious
    artefacts are, e.g. the synthetic sets' artefact maps, picked like the other masks): adds ``artefact mass``,
    the share of the original map's attribution on them. ``options``: :class:`AnalysisOptions` (``p``, the
    thresholds, the SegX orders, which scores, device and batch size).

    Columns: the paper's SegU scores ``c_IoU`` (IoU of the original top-``p`` % region with the predicted
    mask, Eq. 9) and ``c_AUITC`` (area under the IoU–threshold curve, Eq. 10, trapezoid over
    ``n_thresholds`` evenly spaced thresholds), then our variants ``SegU share inside`` (share of the top
    ``p`` % inside the mask), ``SegU mass`` (share of all attribution inside) and, with
    ``distance=True``, ``SegU distance``. Given ``true_masks`` (and ``localisation``): ``IoU@p``, ``AUITC``,
    relevance mass, relevance rank and pointing game of the original map and of the SegX map of each order, as
    ``"<original|SegX <order>> <metric>"`` with ``IoU@p`` written ``IoU@5%`` for ``p = 5``; then ``artefact mass``.

    Degenerate inputs (an all-zero map, an empty mask) score 0.0 with a :class:`DegenerateMapWarning`;
    an empty batch gives an empty frame with the same columns.
    """
    options = options if options is not None else AnalysisOptions()
    maps = torch.as_tensor(maps)
    maps = maps[None] if maps.ndim == 2 else maps  # one map (H, W)
    device = torch.device(options.device) if options.device is not None else maps.device
    batch_size = options.batch_size or (16 if device.type == "cpu" else 1024)
    localised = true_masks is not None and options.localisation
    columns = score_columns(options.p, options.orders, localised, options.distance) + \
        (["artefact mass"] if artefact_masks is not None else [])
    if len(maps) == 0:
        warnings.warn("no maps to analyse: returning an empty table", DegenerateMapWarning, stacklevel=2)
        return pd.DataFrame({c: pd.Series(dtype=float) for c in columns})
    masks = _BatchMasks(_on_device(predicted_masks, device), _on_device(true_masks, device) if localised else None,
                        _on_device(artefact_masks, device))
    per_map = image_index is None  # masks are given per map: cut them like the maps
    if not per_map:
        image_index = check_image_index(image_index, len(maps), len(masks.predicted))
    parts, degenerate = [], 0
    for start in range(0, len(maps), batch_size):
        rows = slice(start, start + batch_size)
        batch_masks = masks.rows(rows) if per_map else masks
        scores, flags = _analyse_batch(maps[rows], batch_masks, None if per_map else image_index[rows], options,
                                       device, start)
        parts.append(scores)
        degenerate += flags
    if degenerate:
        warnings.warn(f"{degenerate} map(s) have no positive value or an empty predicted mask; their SegU scores are "
                      "set to 0.0", DegenerateMapWarning, stacklevel=2)
    frame = pd.DataFrame({name: np.concatenate([part[name] for part in parts]) for name in parts[0]})
    if localised and has_true_mask is not None:
        known = np.asarray(has_true_mask, dtype=bool)
        known = known[np.asarray(image_index)] if image_index is not None else known
        located = [c for c in frame.columns if c.startswith(("original ", "SegX "))]
        frame.loc[~known, located] = np.nan
    return frame[columns]


@dataclass
class _BatchMasks:
    """The masks :func:`analyse` scores against, on the device: ``predicted`` (always), ``true`` (None: no
    localisation) and ``artefacts`` (None: no artefact mass), each ``(N, H, W)`` bool per image or per map."""

    predicted: torch.Tensor
    true: torch.Tensor | None
    artefacts: torch.Tensor | None

    def rows(self, rows: slice) -> "_BatchMasks":
        """The masks of a batch of maps, when they are given one per map."""
        return _BatchMasks(self.predicted[rows], _rows_of(self.true, rows), _rows_of(self.artefacts, rows))


def check_image_index(image_index, n_maps: int, n_images: int) -> np.ndarray:
    """``image_index`` as int64 ``(n_maps,)``: one integer per map, each a position in ``[0, n_images)``
    of the masks. Anything else (a float such as 0.9, a negative index, one past the end, a wrong
    length) is a ``ValueError`` naming the first bad position: it would silently pick another mask."""
    index = image_index.detach().cpu().numpy() if torch.is_tensor(image_index) else np.asarray(image_index)
    if index.shape != (n_maps,):
        raise ValueError(f"image_index has shape {index.shape} but there are {n_maps} maps: give one image index per map")
    if index.dtype.kind not in "iu":
        whole = index.dtype.kind == "f" and np.isfinite(index).all() and (index == np.round(index)).all()
        bad = np.flatnonzero(index != np.round(index))[:1] if index.dtype.kind == "f" else [0]
        where = f"image_index[{int(bad[0])}] is {index[int(bad[0])].item()!r}" if len(bad) else f"its dtype is {index.dtype}"
        raise ValueError(f"image_index must hold integers (positions of the images in the masks), but {where}"
                         + ("; convert it with .astype(int) if these floats are meant as indices" if whole else ""))
    outside = np.flatnonzero((index < 0) | (index >= n_images))
    if len(outside):
        first = int(outside[0])
        raise ValueError(f"image_index[{first}] is {int(index[first])}, outside [0, {n_images}): the masks hold "
                         f"{n_images} images (negative indices are not allowed)")
    return index.astype(np.int64)


def _analyse_batch(maps, masks: _BatchMasks, image_index: np.ndarray | None, options: AnalysisOptions, device,
                   first: int) -> tuple[dict[str, np.ndarray], int]:
    """The scores of one batch of maps ``(B, H, W)`` as ``{column: (B,) float64}``, and the number of
    degenerate maps (no positive value or an empty predicted mask) in it; ``image_index`` ``(B,)`` picks each map's
    masks (None: ``masks`` are the batch's own), ``first`` is the batch's first map. The steps: the SegU scores
    (:func:`_segu_scores`), ``SegU distance``, ``artefact mass``, then the localisation of the original map and of
    the SegX map of each order (:func:`_localisation_scores`)."""
    p, n_thresholds = options.p, options.n_thresholds
    maps, low, high = _check_maps(maps.to(device), first)
    m, h, w = maps.shape
    index = None if image_index is None else _tensor(np.asarray(image_index, dtype=np.int64), device)
    batch = _Maps(maps.reshape(m, h * w), low, high, (m, h, w))
    predicted_bits = _masks_per_map(masks.predicted, index, batch.shape, device)
    predicted = _as_float(predicted_bits)
    truth = _Truth.of(_as_float(_masks_per_map(masks.true, index, batch.shape, device)), batch.pixels) \
        if masks.true is not None else None
    with torch.no_grad():
        out, shared = _segu_scores(batch, predicted, truth, p, n_thresholds)
        if options.distance:
            out["SegU distance"] = _distance_scores(shared.top, predicted_bits, batch.shape)
        if masks.artefacts is not None:
            artefacts = _as_float(_masks_per_map(masks.artefacts, index, batch.shape, device))
            out["artefact mass"] = _mass(batch.flat, artefacts, shared.total, shared.scratch)
        if truth is not None:
            out.update(_localisation_scores(batch, truth, predicted_bits, shared, options.orders, p, n_thresholds))
    return {name: value.cpu().numpy().astype(np.float64) for name, value in out.items()}, int((~shared.usable).sum())


@dataclass
class _Maps:
    """One batch of maps on the device: ``flat`` ``(B, H·W)`` float32, non-negative, with each map's ``low``
    and ``high`` value ``(B,)`` and the batch's ``shape`` ``(B, H, W)``."""

    flat: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    shape: tuple[int, int, int]

    @property
    def pixels(self) -> int:
        """``H·W``."""
        return self.shape[1] * self.shape[2]


@dataclass
class _Truth:
    """The ground-truth masks on the pixels a kind of map is scored on: ``inside`` ``(B, L)`` its 0/1 float32
    indicator there, ``size`` ``(B,)`` float64 its whole size, ``pixels`` the maps' ``H·W`` and ``outside``
    ``(B,)`` its pixels off the scored ones (None when every pixel is scored, ``L = H·W``)."""

    inside: torch.Tensor
    size: torch.Tensor
    pixels: int
    outside: torch.Tensor | None = None

    @classmethod
    def of(cls, truth: torch.Tensor, pixels: int) -> "_Truth":
        """The truth ``(B, H·W)`` on every pixel."""
        return cls(truth, _count(truth), pixels)


@dataclass
class _Shared:
    """What the SegU scores compute and the other scores of the batch reuse: ``scratch`` a ``(B, H·W)``
    buffer for products and comparisons that are only summed, ``positive`` ``(B,)`` each map's positive
    pixels, ``top`` ``(B, H·W)`` the indicator of its top-``p`` % region, ``hits`` ``(B,)`` that region's
    pixels in the predicted mask, ``total`` ``(B,)`` the map's sum, ``truth_auitc`` ``(B,)`` the AUITC
    against the ground truth (None without it), ``usable`` ``(B,)`` bool: a positive map and a non-empty
    predicted mask."""

    scratch: torch.Tensor
    positive: torch.Tensor
    top: torch.Tensor
    hits: torch.Tensor
    total: torch.Tensor
    truth_auitc: torch.Tensor | None
    usable: torch.Tensor


@dataclass
class _MapKind:
    """One kind of map to localise (the original, or the SegX map of one order) on the pixels it is scored
    on: ``values`` ``(B, L)`` non-negative, ``region`` its top-``p`` % indicator, ``auitc`` ``(B,)`` its area
    under the IoU–threshold curve against the truth, ``kth`` ``(B,)`` its K-th largest value (K the truth's
    size), ``peak`` ``(B,)`` its maxima, ``total`` ``(B,)`` its sums."""

    values: torch.Tensor
    region: torch.Tensor
    auitc: torch.Tensor
    kth: torch.Tensor
    peak: torch.Tensor
    total: torch.Tensor


def _masks_per_map(masks, index: torch.Tensor | None, shape: tuple[int, int, int], device) -> torch.Tensor:
    """Boolean ``masks`` ``(N, H, W)`` (or one ``(H, W)``) on ``device``, picked per map by ``index`` ``(B,)``
    (None: already one per map), as ``(B, H·W)``; a ``TypeError`` unless boolean, a ``ValueError`` unless
    they give the maps' ``shape`` ``(B, H, W)``."""
    m, h, w = shape
    masks = _tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks, device)
    if masks.dtype != torch.bool:
        raise TypeError("masks must be boolean: binarise probabilities once with binarise_masks(prob, threshold)")
    if masks.ndim == 2:
        masks = masks[None]
    if index is not None:
        masks = masks[index] if len(index) else masks[:0]
    if masks.shape != (m, h, w):
        raise ValueError(f"masks give shape {tuple(masks.shape)} per map but the maps have shape {(m, h, w)}")
    return masks.reshape(m, h * w)


def _segu_scores(batch: _Maps, predicted: torch.Tensor, truth: _Truth | None, p: float,
                 n_thresholds: int) -> tuple[dict[str, torch.Tensor], _Shared]:
    """``c_IoU``, ``c_AUITC``, ``SegU share inside`` and ``SegU mass`` ``(B,)`` against the ``predicted``
    masks ``(B, H·W)`` 0/1 float32 (0.0 where the map or the mask is degenerate), and what the other
    scores reuse; the AUITC against ``truth`` is computed in the same pass."""
    flat, m = batch.flat, batch.shape[0]
    scratch = torch.empty_like(flat)
    positive = _count(_test(torch.gt, flat, 0.0, scratch))
    top = top_p_indicator(flat, p, positive)
    usable = (batch.high > 0) & (_count(predicted) > 0)
    auitc = auitc_from_flat(flat, [predicted] + ([truth.inside] if truth is not None else []), n_thresholds,
                            batch.low, batch.high)
    total = _total(flat)
    top_size = _count(top)
    hits = _overlap(top, predicted, scratch)
    zero = torch.zeros(m, dtype=torch.float64, device=flat.device)
    out = {
        "c_IoU": torch.where(usable, _iou(top, predicted, inter=hits), zero),
        "c_AUITC": torch.where(usable, auitc[0], zero),
        "SegU share inside": torch.where(usable, hits / top_size.clamp_min(1), zero),
        "SegU mass": torch.where(usable, _mass(flat, predicted, total, scratch), zero),
    }
    shared = _Shared(scratch, positive, top, hits, total, auitc[1] if truth is not None else None, usable)
    return out, shared


def _distance_scores(top: torch.Tensor, predicted_bits: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``SegU distance`` ``(B,)`` of the top-``p`` % regions ``top`` against the predicted masks, both
    ``(B, H·W)``: :func:`segx_helpers.scores.segu.distance_from_top` on the CPU (its degenerate-map warnings
    silenced: :func:`analyse` counts those maps once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.as_tensor(distance_from_top(top.bool().reshape(shape).cpu().numpy(),
                                                 predicted_bits.reshape(shape).cpu().numpy()))


def _localisation_scores(batch: _Maps, truth: _Truth, predicted_bits: torch.Tensor, shared: _Shared,
                         orders: Sequence[str], p: float, n_thresholds: int) -> dict[str, torch.Tensor]:
    """The localisation columns (:data:`LOCALISATION`) of the original maps, then of the SegX maps of each
    order, each ``(B,)``. SegX maps are zero off the predicted mask, so they are scored on its pixels only
    (:class:`Support`), the truth's pixels off it entering as a count."""
    original = _MapKind(batch.flat, shared.top, shared.truth_auitc,
                        kth_largest(batch.flat, truth.size, shared.positive), batch.high, shared.total)
    out = _localise("original", original, truth, p, shared.scratch)
    if not orders:
        return out
    support = Support.of(predicted_bits)
    on_mask, inside, on_top = support.pack(batch.flat), support.pack(truth.inside), support.pack(shared.top)
    packed_scratch = torch.empty_like(on_mask)
    on_support = _Truth(inside, truth.size, batch.pixels, truth.size - _count(inside))
    for order in orders:
        aligned = on_mask if order == "mask-then-top" else on_mask * on_top
        segx_map = _segx_kind(aligned, shared.hits if order == "top-then-mask" else None, on_support, p,
                              n_thresholds, packed_scratch)
        out.update(_localise(segx_label(order), segx_map, on_support, p, packed_scratch))
    return out


def _segx_kind(aligned: torch.Tensor, positive: torch.Tensor | None, truth: _Truth, p: float, n_thresholds: int,
               scratch: torch.Tensor) -> _MapKind:
    """A SegX map ``aligned`` ``(B, L)`` packed on the predicted masks' pixels as a :class:`_MapKind`.
    ``positive`` ``(B,)`` its positive pixels when known (``top-then-mask``: the top region's hits in the
    mask), else counted into ``scratch``. It is zero off the mask (and, top-then-mask, off the top ``p`` %):
    often fewer positive pixels than the region sizes, and then the k-th largest value is 0 without a
    selection."""
    low, high = aligned.amin(dim=1), aligned.amax(dim=1)
    positive = _count(_test(torch.gt, aligned, 0.0, scratch)) if positive is None else positive
    return _MapKind(aligned, top_p_indicator(aligned, p, positive, truth.pixels),
                    auitc_from_flat(aligned, [truth.inside], n_thresholds, low, high, pixels=truth.pixels,
                                    outside=truth.outside)[0],
                    kth_largest(aligned, truth.size, positive), high, _total(aligned))


def _localise(name: str, kind: _MapKind, truth: _Truth, p: float, scratch: torch.Tensor) -> dict[str, torch.Tensor]:
    """``IoU@p``, ``AUITC``, relevance mass, relevance rank and pointing game ``(B,)`` of one kind of map
    against the truth, as ``"<name> <metric>"`` columns; ``scratch`` a buffer of ``kind.values``' shape."""
    return {f"{name} IoU@{p:g}%": _iou(kind.region, truth.inside, truth.size, scratch),
            f"{name} AUITC": kind.auitc,
            f"{name} relevance mass": _mass(kind.values, truth.inside, kind.total, scratch),
            f"{name} relevance rank": _rank(kind.values, truth.inside, kind.kth, truth.size, kind.peak, truth.pixels,
                                            truth.outside, scratch),
            f"{name} pointing game": _pointing(kind.values, truth.inside, kind.peak, scratch)}


def score_columns(p: float = 5.0, orders: Sequence[str] = ORDERS, localisation: bool = True,
                  distance: bool = False) -> list[str]:
    """The score columns :func:`analyse` returns for these options, in order (e.g. for an empty table)."""
    columns = ["c_IoU", "c_AUITC", "SegU share inside", "SegU mass"] + (["SegU distance"] if distance else [])
    if localisation:
        for name in ["original"] + [segx_label(o) for o in orders]:
            columns += [f"{name} {metric.replace('IoU@p', f'IoU@{p:g}%')}" for metric in LOCALISATION]
    return columns


def localisation_columns(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """The localisation scores of one map kind (``"original"`` or ``"SegX <order>"``) with plain metric names."""
    prefix = f"{name} "
    picked = [c for c in table.columns if c.startswith(prefix)]
    return table[picked].rename(columns=lambda c: c[len(prefix):])


def localisation_summary(tables: dict[str, pd.DataFrame], orders: Sequence[str] = ORDERS, n_resamples: int = 1000,
                         seed: int = 0) -> pd.DataFrame:
    """Mean (95 % bootstrap CI) of each localisation metric, original vs SegX of each order, with the
    paired difference; ``tables`` maps a method name to its per-prediction table from :func:`analyse`.
    Predictions without a ground-truth mask (NaN rows) are left out."""
    frames = []
    for method, table in tables.items():
        original = localisation_columns(table, "original")
        if original.empty:
            raise ValueError(f"the {method} table has no localisation columns: pass true_masks to analyse()")
        known = original.notna().all(axis=1).to_numpy()
        for order in orders:
            aligned = localisation_columns(table, segx_label(order))
            summary = paired_summary(original[known], aligned[known], n_resamples=n_resamples, seed=seed)
            frames.append(summary.assign(method=method, order=order, predictions=int(known.sum())))
    table = pd.concat(frames, ignore_index=True)
    return table[["method", "order", "metric", "predictions", "original", "SegX", "difference", "original_mean",
                  "SegX_mean", "difference_mean"]]
