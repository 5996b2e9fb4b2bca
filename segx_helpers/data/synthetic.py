"""Synthetic datasets that make the point of SegX visible (the tutorial's embedded default data).

Both generators draw a clinical-interest region (a skin lesion; the two lung fields) whose
*inside* alone decides the label, plus spurious artefacts placed strictly *outside* that region
whose presence is correlated with the label by a parameter. A classifier trained where the
shortcut holds can learn it; a test split generated with the correlation changed (or reversed)
then exposes the predictions that relied on it, which is what SegU is meant to catch.

The shortcut correlation is the Pearson (phi) correlation between the binary artefact indicator
and the binary "has the shortcut class" indicator, realised per split up to rounding (see
:func:`shortcut_indicator`).

Every image is drawn from its own random stream ``default_rng([seed, index])``: datasets are
deterministic given the seed and independent of generation order.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage
from tqdm.auto import tqdm

from segx_helpers.data.io import check_safe_id
from segx_helpers.data.format import DatasetExtras, DatasetInfo, image_file, load_info, make_splits, write_dataset

DERM_CLASSES = ("nevus", "melanoma", "keratosis")
CXR_FINDINGS = ("nodule", "opacity", "effusion")
CXR_TOKENS = {"nodule": "ecg_lead", "opacity": "text_marker", "effusion": "chest_tube"}
DEFAULT_PREVALENCE = {"synthetic-derm": (0.45, 0.3, 0.25), "synthetic-cxr": (0.3, 0.3, 0.25)}


@dataclass
class SyntheticConfig:
    """Parameters of a synthetic dataset; all of them are written to ``dataset.json``.

    ``shortcut_correlation`` applies to the train and val splits, ``test_shortcut_correlation`` to
    the test split (0 decorrelates it, negative values reverse the shortcut; the default, -0.4, reverses it as
    the ISIC "trap" test sets of Bissoto et al. 2020 do). ``subtle_share`` (synthetic-derm only): the share
    of melanomas drawn with a naevus's appearance, which nothing inside the lesion tells apart; for those the
    artefact is the only cue, so a classifier keeps relying on the shortcut however long it trains (as for
    featureless melanomas in real dermoscopy). The defaults (correlation 0.85, subtle share 0.2, a patch of
    0.08 times the image size up to 0.3 times it from the lesion) were chosen on datasets of seeds 11 to 14,
    never on the reported seeds 0 to 2, so that a quick-mode classifier leans on the patch (well over 10 % of
    test predictions flip with their counterfactual twin) and notebook 05 sees both regimes.

    ``artefact_style`` (synthetic-derm only) is the shortcut artefact: ``"patch"`` (the default), a bold filled
    disc of ``patch_radius`` times the image size, like the colour-calibration stickers of real dermoscopy,
    placed ``artefact_distance`` (a range of fractions of the image size, drawn per image) from the lesion's
    edge, from touching it to the far corner; or ``"ring"``, a thin purple ink arc around the lesion at
    ``ink_ring`` times its radius. Each image's artefact distance, size and position are written to
    ``artefacts.csv``, also where the artefact is absent (there they say where its counterfactual twin has it).
    """

    n_images: int = 1000
    image_size: int = 128
    seed: int = 0
    shortcut_correlation: float = 0.85
    test_shortcut_correlation: float = -0.4
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    class_prevalence: tuple[float, ...] = field(default_factory=tuple)
    subtle_share: float = 0.2
    artefact_style: str = "patch"
    artefact_distance: tuple[float, float] = (0.0, 0.3)
    patch_radius: float = 0.08
    ink_ring: tuple[float, float] = (1.45, 1.8)

    def __post_init__(self) -> None:
        if self.artefact_style not in ARTEFACT_STYLES:
            raise ValueError(f"artefact_style must be one of {sorted(ARTEFACT_STYLES)}, got {self.artefact_style!r}")
        low, high = self.artefact_distance
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError("artefact_distance must be (low, high) fractions of the image size with "
                             f"0 <= low <= high <= 1, got {self.artefact_distance}")
        if not 0.0 < self.patch_radius <= 0.25:
            raise ValueError(f"patch_radius must lie in (0, 0.25] (a fraction of the image size), got {self.patch_radius}")
        if not 1.0 < self.ink_ring[0] <= self.ink_ring[1]:
            raise ValueError(f"ink_ring must be (low, high) multiples of the lesion radius with 1 < low <= high, got {self.ink_ring}")
        if not 0.0 <= self.subtle_share <= 1.0:
            raise ValueError(f"subtle_share must lie in [0, 1], got {self.subtle_share}")
        if self.n_images < 10:
            raise ValueError(f"n_images must be at least 10, got {self.n_images}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        for name in ("shortcut_correlation", "test_shortcut_correlation"):
            value = getattr(self, name)
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [-1, 1], got {value}")


def shortcut_indicator(has_class: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Binary artefact indicators whose phi correlation with ``has_class`` is ``rho``.

    A random ``|rho|`` share of the images copies the class indicator; in the others the artefact
    is given to the same share of positives and negatives (exact counts, not coin flips), so it
    carries no information there. The realised correlation is then ``rho`` up to rounding.
    """
    has_class = np.asarray(has_class, dtype=bool)
    n = len(has_class)
    copy = np.zeros(n, dtype=bool)
    copy[rng.permutation(n)[:int(round(abs(rho) * n))]] = True
    artefact = has_class & copy
    rate = has_class.mean() if n else 0.0
    for group in (has_class & ~copy, ~has_class & ~copy):
        members = rng.permutation(np.flatnonzero(group))
        artefact[members[:int(round(rate * len(members)))]] = True
    return ~artefact if rho < 0 else artefact


def phi_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two binary arrays (0.0 when either is constant)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------------------- drawing helpers

def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1], ``(size, size)``, with about ``cells`` blobs per side."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)).clip(-1, 1)


def _polar_blob(size: int, cx: float, cy: float, radius: float, amplitudes: np.ndarray, phases: np.ndarray,
                aspect: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """Star-shaped region ``r(theta) = R (1 + sum_k a_k cos(k theta + phi_k))``; bool ``(size, size)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    rot_x = dx * np.cos(angle) + dy * np.sin(angle)
    rot_y = (-dx * np.sin(angle) + dy * np.cos(angle)) * aspect
    theta = np.arctan2(rot_y, rot_x)
    boundary = np.ones_like(theta)
    for k, (a, p) in enumerate(zip(amplitudes, phases), start=2):
        boundary += a * np.cos(k * theta + p)
    return np.hypot(rot_x, rot_y) < radius * boundary


def _disc(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _stroke_layer(size: int, draw_fn) -> np.ndarray:
    """Rasterise PIL drawing calls into a float coverage layer in [0, 1]."""
    layer = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(layer))
    return np.asarray(layer, dtype=np.float32) / 255.0


def _paint(image: np.ndarray, coverage: np.ndarray, colour) -> None:
    """Alpha-blend ``colour`` into ``image`` (float, ``(H, W, C)``) in place where ``coverage`` > 0."""
    alpha = np.clip(coverage, 0, 1)[..., None]
    image[:] = image * (1 - alpha) + np.asarray(colour, dtype=np.float32) * alpha


def _outside(coverage: np.ndarray, region: np.ndarray, margin: int) -> np.ndarray:
    """Zero ``coverage`` inside ``region`` dilated by ``margin`` pixels (artefacts stay outside)."""
    grown = ndimage.binary_dilation(region, iterations=margin) if margin > 0 else region
    return np.where(grown, 0.0, coverage)


# ------------------------------------------------------------------------------- synthetic-derm

DERM_ARTEFACTS = ("ink", "ruler", "vignette", "hair", "patch")
ARTEFACT_STYLES = {"ring": "ink", "patch": "patch"}  # style -> the artefact's column in artefacts.csv
CXR_ARTEFACTS = ("ecg_lead", "text_marker", "chest_tube", "laterality")


def _bit(coverage: np.ndarray, kind: str, kinds: tuple[str, ...]) -> np.ndarray:
    """The bit of artefact ``kind`` where it covers a pixel (coverage above 0.05), uint8 ``(S, S)``."""
    return np.where(coverage > 0.05, 1 << kinds.index(kind), 0).astype(np.uint8)


def _draw_derm(rng: np.random.Generator, size: int, label: str, shortcut: bool, appearance: str | None = None,
               config: SyntheticConfig | None = None) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """One dermoscopy-like image ``(S, S, 3)`` uint8, its lesion mask ``(S, S)``, the artefacts drawn (with the
    shortcut artefact's ``distance_px``, ``size_px``, ``x``, ``y``: where it is or, when absent, would be) and
    where (bit flags of :data:`DERM_ARTEFACTS`, uint8 ``(S, S)``). ``appearance`` draws the lesion of
    another class (a subtle melanoma looks like a naevus). The shortcut artefact (``config.artefact_style``) is
    placed last and always, and painted only when ``shortcut`` is set, so an image rendered again from the same
    generator with ``shortcut`` flipped differs only where the artefact is."""
    config = config or SyntheticConfig(image_size=size)
    label = appearance or label
    s = float(size)
    skin = np.array([[233, 190, 160], [215, 165, 130], [190, 140, 105], [160, 110, 80]], dtype=np.float32)
    base = skin[rng.integers(len(skin))] + rng.normal(0, 6, 3)
    texture = _smooth_noise(rng, size, 6)[..., None] * 10 + _smooth_noise(rng, size, 24)[..., None] * 5
    image = base + texture + rng.normal(0, 3, (size, size, 1))

    cx, cy = s / 2 + rng.uniform(-0.1, 0.1, 2) * s
    radius = rng.uniform(0.15, 0.22) * s
    if label == "melanoma":
        amps = rng.uniform(0.03, 0.1, 6)
        mask = _polar_blob(size, cx, cy, radius, amps, rng.uniform(0, 2 * np.pi, 6))
    elif label == "nevus":
        amps = np.concatenate([rng.uniform(0.0, 0.05, 2), rng.uniform(0.0, 0.03, 2)])
        mask = _polar_blob(size, cx, cy, radius, amps, rng.uniform(0, 2 * np.pi, 4))
    else:
        amps = rng.uniform(0.0, 0.03, 2)
        mask = _polar_blob(size, cx, cy, radius, amps, rng.uniform(0, 2 * np.pi, 2),
                           aspect=rng.uniform(1.3, 1.6), angle=rng.uniform(0, np.pi))
    soft = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)
    inner = ndimage.binary_erosion(mask, iterations=2)
    ys, xs = np.nonzero(inner)

    if label == "keratosis":
        colour = base * rng.uniform(0.66, 0.76) + np.array([18, 16, -8], dtype=np.float32)
        stripes = np.sin(np.mgrid[0:size, 0:size][0] * rng.uniform(0.8, 1.2) + _smooth_noise(rng, size, 6) * 3)
        lesion = colour + stripes[..., None] * 14
        dots, dot_colour = rng.integers(5, 10), (245, 240, 225)
    else:
        melanoma = label == "melanoma"
        colour = np.array([115, 70, 42] if not melanoma else [100, 60, 38], dtype=np.float32) * rng.uniform(0.8, 1.15)
        lesion = np.broadcast_to(colour + _smooth_noise(rng, size, 5)[..., None] * 8, (size, size, 3)).copy()
        n_blotches = rng.integers(1, 3) if melanoma else int(rng.random() < 0.3)
        palette = rng.permutation(np.array([[35, 25, 25], [90, 100, 130], [150, 60, 60]]))
        for blotch_colour in palette[:n_blotches]:
            blotch = _polar_blob(size, cx + rng.uniform(-0.5, 0.5) * radius, cy + rng.uniform(-0.5, 0.5) * radius,
                                 radius * rng.uniform(0.3, 0.5), rng.uniform(0, 0.2, 3), rng.uniform(0, 6.3, 3))
            strength = rng.uniform(0.45, 0.85) if melanoma else rng.uniform(0.2, 0.4)
            _paint(lesion, ndimage.gaussian_filter(blotch.astype(np.float32), 1.0) * strength, blotch_colour)
        dots = rng.integers(3, 11) if melanoma else rng.integers(0, 3)
        dot_colour = (20, 15, 15)
    for i in rng.choice(len(ys), size=min(len(ys), dots), replace=False):
        _paint(lesion, _disc(size, xs[i], ys[i], rng.uniform(0.8, 1.6)).astype(np.float32), dot_colour)
    _paint(image, soft, np.zeros(3))
    image += soft[..., None] * lesion

    name = ARTEFACT_STYLES[config.artefact_style]
    artefacts = {name: bool(shortcut), "ruler": bool(rng.random() < 0.2), "vignette": bool(rng.random() < 0.25),
                 "hair": bool(rng.random() < 0.3)}
    where = np.zeros((size, size), np.uint8)
    if artefacts["vignette"]:
        yy, xx = np.mgrid[0:size, 0:size]
        dist = np.hypot(xx - s / 2, yy - s / 2) / (s / 2)
        corners = _outside(np.clip((dist - 1.05) * 4, 0, 1), mask, 3)
        _paint(image, corners, (15, 12, 12))
        where |= _bit(corners, "vignette", DERM_ARTEFACTS)
    if artefacts["hair"]:
        def hairs(draw):
            for _ in range(rng.integers(2, 6)):
                pts = np.cumsum(rng.normal(0, s / 10, (6, 2)), axis=0) + rng.uniform(0, s, 2)
                draw.line([tuple(p) for p in pts], fill=255, width=1)
        strands = _outside(_stroke_layer(size, hairs), mask, 2) * 0.8
        _paint(image, strands, (40, 30, 25))
        where |= _bit(strands, "hair", DERM_ARTEFACTS)
    if artefacts["ruler"]:
        def ruler(draw):
            draw.rectangle([0, s * 0.9, s, s], fill=255)
        band = _outside(_stroke_layer(size, ruler), mask, 2)
        _paint(image, band, (225, 225, 215))
        ticks = _stroke_layer(size, lambda d: [d.line([(x, s * 0.9), (x, s * 0.95)], fill=255, width=1)
                                              for x in np.arange(2, s, s / 16)])
        _paint(image, _outside(ticks, mask, 2), (30, 30, 30))
        where |= _bit(band, "ruler", DERM_ARTEFACTS)
    if config.artefact_style == "ring":
        marker = _ink_ring(rng, size, cx, cy, radius, config.ink_ring, mask)
        colour = (95, 40, 150)
    else:
        marker = _patch(rng, size, mask, config.artefact_distance, config.patch_radius)
        colour = (30, 120, 215)
    artefacts.update(_placement(marker, mask))
    if shortcut:
        _paint(image, marker, colour)
        where |= _bit(marker, name, DERM_ARTEFACTS)
    image = np.asarray(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH))
    return image, mask, artefacts, where


def _ink_ring(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float,
              ink_ring: tuple[float, float], mask: np.ndarray) -> np.ndarray:
    """Coverage ``(S, S)`` of a thin purple ink arc (with a few dots) around the lesion at ``ink_ring`` radii."""
    ring = radius * rng.uniform(*ink_ring)
    start = rng.uniform(0, 360)
    sweep = rng.uniform(90, 200)

    def ink_mark(draw):
        draw.arc([cx - ring, cy - ring, cx + ring, cy + ring], start, start + sweep, fill=255, width=max(2, size // 40))
        for _ in range(rng.integers(1, 4)):
            angle = np.deg2rad(rng.uniform(0, 360))
            px, py = cx + ring * 1.1 * np.cos(angle), cy + ring * 1.1 * np.sin(angle)
            draw.ellipse([px - size / 40, py - size / 40, px + size / 40, py + size / 40], fill=255)
    return _outside(_stroke_layer(size, ink_mark), mask, 3) * 0.9


def _patch(rng: np.random.Generator, size: int, mask: np.ndarray, distance: tuple[float, float],
           radius: float) -> np.ndarray:
    """Coverage ``(S, S)`` of a bold filled disc (``radius`` times the image size) whose gap to the lesion's
    edge is drawn uniformly from ``distance`` (fractions of the image size), the disc kept inside the image.
    Where no centre gives that gap (a lesion near the middle leaves at most the way to a corner), the
    largest gap the image allows is taken."""
    r = max(2.0, radius * size)
    target = rng.uniform(*distance) * size
    gap = ndimage.distance_transform_edt(~mask) - r
    inside = np.zeros_like(mask)
    lo, hi = int(np.ceil(r)), int(np.floor(size - 1 - r))
    inside[lo:hi + 1, lo:hi + 1] = True
    gap = np.where(inside & (gap >= 0), gap, -np.inf)
    goal = min(target, gap.max())
    ys, xs = np.nonzero(np.abs(gap - goal) <= 1.0)
    k = rng.integers(len(ys))
    disc = _stroke_layer(size, lambda d: d.ellipse([xs[k] - r, ys[k] - r, xs[k] + r, ys[k] + r], fill=255))
    return _outside(disc, mask, 1) * 0.95


def _placement(coverage: np.ndarray, mask: np.ndarray) -> dict:
    """Where an artefact's ``coverage`` lies: its gap to the lesion's edge (``distance_px``), its area
    (``size_px``) and its centre (``x``, ``y``), in pixels of the generated image."""
    drawn = coverage > 0.05
    if not drawn.any():
        return {"distance_px": float("nan"), "size_px": 0, "x": float("nan"), "y": float("nan")}
    ys, xs = np.nonzero(drawn)
    gap = ndimage.distance_transform_edt(~mask)[drawn].min()
    return {"distance_px": round(float(max(gap - 1.0, 0.0)), 2), "size_px": int(drawn.sum()),
            "x": round(float(xs.mean()), 1), "y": round(float(ys.mean()), 1)}


def generate_synthetic_derm(root: str | Path, config: SyntheticConfig | None = None, overwrite: bool = False,
                            progress: bool = True) -> Path:
    """Write ``synthetic-derm``: dermoscopy-like RGB images, one lesion each (mask = lesion).

    Classes depend only on the lesion: ``nevus`` (round, uniform brown), ``melanoma`` (irregular
    border, several colours, dark dots), ``keratosis`` (oval, light tan, bright milia-like dots).
    The spurious artefact (``config.artefact_style``: a bold colour patch at a distance from the lesion drawn per
    image, or a thin ink ring around it) never covers the lesion and is correlated with ``melanoma``; rulers, hairs
    and dark vignette corners appear at random as nuisance.
    """
    config = config or SyntheticConfig()
    prevalence = np.asarray(config.class_prevalence or DEFAULT_PREVALENCE["synthetic-derm"], dtype=float)
    if len(prevalence) != len(DERM_CLASSES) or not np.isclose(prevalence.sum(), 1):
        raise ValueError(f"class_prevalence must be {len(DERM_CLASSES)} numbers summing to 1, got {config.class_prevalence}")
    rng = np.random.default_rng([config.seed, 10_000_000])
    ids = [f"derm_{i:05d}" for i in range(config.n_images)]
    labels = rng.choice(len(DERM_CLASSES), size=config.n_images, p=prevalence)
    splits = make_splits(ids, seed=config.seed, fractions=config.split_fractions, stratify=labels)
    is_melanoma = labels == DERM_CLASSES.index("melanoma")
    artefact = ARTEFACT_STYLES[config.artefact_style]
    present = _split_shortcut(splits["split"].to_numpy(), is_melanoma, config, rng)
    subtle = is_melanoma & (np.random.default_rng([config.seed, 30_000_000]).random(config.n_images) < config.subtle_share)
    is_test = splits["split"].to_numpy() == "test"

    artefacts = _Artefacts()

    def draw(i: int, with_artefact: bool):
        return _draw_derm(np.random.default_rng([config.seed, i]), config.image_size, DERM_CLASSES[labels[i]],
                          with_artefact, appearance="nevus" if subtle[i] else None, config=config)

    def samples():
        for i, image_id in enumerate(tqdm(ids, desc="synthetic-derm", disable=not progress)):
            image, mask, drawn, where = draw(i, present[i])
            artefacts.records.append({"image_id": image_id, **drawn, "subtle": bool(subtle[i])})
            artefacts.maps[image_id] = where
            if is_test[i]:
                artefacts.twins[f"{image_id}__{artefact}"] = draw(i, not present[i])[0]
            yield image_id, image, mask

    info = DatasetInfo(
        name="synthetic-derm", modality="dermoscopy (synthetic)", task="multiclass", class_names=list(DERM_CLASSES),
        mask_description="the lesion", source="segx_helpers.data.synthetic.generate_synthetic_derm",
        licence="CC0-1.0 (generated)", channels=3,
        generator={**_config_dict(config, prevalence), "shortcut_class": "melanoma", "shortcut_artefact": artefact,
                   "nuisance_artefacts": ["ruler", "vignette", "hair"], "artefact_bits": list(DERM_ARTEFACTS)},
    )
    frame = pd.DataFrame({"image_id": ids, "label": [DERM_CLASSES[k] for k in labels]})
    write_dataset(root, info, samples(), frame, splits, overwrite=overwrite, extras=artefacts.extras())
    return Path(root)


# ------------------------------------------------------------------------------- synthetic-cxr

def _draw_cxr(rng: np.random.Generator, size: int, findings: dict,
              tokens: dict) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """One radiograph-like grayscale image ``(S, S)`` uint8, its lung mask ``(S, S)``, the tokens drawn
    and where (bit flags of :data:`CXR_ARTEFACTS`, uint8 ``(S, S)``)."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.full((size, size), 18.0, dtype=np.float32)
    body = ((xx - s / 2) / (0.46 * s)) ** 2 + ((yy - 0.62 * s) / (0.62 * s)) ** 2 < 1
    image[body] = 105
    image += _smooth_noise(rng, size, 5) * 8

    scale = rng.uniform(0.92, 1.05)
    lungs = np.zeros((size, size), dtype=bool)
    for side in (-1, 1):
        cx = s / 2 + side * 0.19 * s * scale
        ax, ay = 0.14 * s * scale, 0.29 * s * scale
        cy = 0.5 * s + rng.uniform(-0.02, 0.02) * s
        shape = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1
        shape &= yy > cy - ay * 0.92
        shape &= np.abs(xx - s / 2) > 0.06 * s
        lungs |= shape
    heart = ((xx - 0.56 * s) / (0.15 * s)) ** 2 + ((yy - 0.68 * s) / (0.12 * s)) ** 2 < 1
    lungs &= ~heart
    image[lungs] = 48
    image += np.where(lungs, _smooth_noise(rng, size, 8) * 6, 0)
    image[heart & body] = 140
    spine = np.abs(xx - s / 2) < 0.035 * s
    image[spine & (yy > 0.12 * s)] = 165 + 10 * np.sin(yy[spine & (yy > 0.12 * s)] * 0.8)
    diaphragm = (yy > 0.5 * s + 0.29 * s * scale) & body
    image[diaphragm & ~spine] = np.maximum(image[diaphragm & ~spine], 125)
    ribs = _stroke_layer(size, lambda d: [
        d.arc([s / 2 + side * 0.02 * s - 0.36 * s, y - 0.12 * s, s / 2 + side * 0.02 * s + 0.36 * s, y + 0.12 * s],
              200 if side < 0 else 270, 270 if side < 0 else 340, fill=255, width=max(1, size // 64))
        for y in np.arange(0.26 * s, 0.8 * s, 0.075 * s) for side in (-1, 1)])
    image += ribs * 28

    inner = ndimage.binary_erosion(lungs, iterations=max(2, size // 32))
    if findings["effusion"]:
        side = rng.choice([-1, 1])
        lung_side = inner & ((xx - s / 2) * side > 0)
        bottom = yy[lung_side].max()
        level = bottom - rng.uniform(0.1, 0.16) * s
        cx = xx[lung_side].mean()
        meniscus = level - ((xx - cx) / (0.14 * s)) ** 2 * 0.05 * s
        fluid = (lungs & ((xx - s / 2) * side > 0) & (yy > meniscus)).astype(np.float32)
        image += ndimage.gaussian_filter(fluid, 1.0) * 95
    if findings["opacity"]:
        ys, xs = np.nonzero(inner)
        k = rng.integers(len(ys))
        cloud = _disc(size, xs[k], ys[k], rng.uniform(0.08, 0.12) * s).astype(np.float32)
        cloud = ndimage.gaussian_filter(cloud, 0.03 * s) * (0.6 + 0.4 * _smooth_noise(rng, size, 12))
        image += np.where(lungs, cloud, 0) * 70
    if findings["nodule"]:
        ys, xs = np.nonzero(ndimage.binary_erosion(lungs, iterations=max(3, size // 20)))
        for k in rng.choice(len(ys), size=rng.integers(1, 3), replace=False):
            nodule = _disc(size, xs[k], ys[k], rng.uniform(0.025, 0.04) * s).astype(np.float32)
            image += ndimage.gaussian_filter(nodule, 0.6) * 70

    keep_out = lungs | heart
    where = np.zeros((size, size), np.uint8)
    # every token's position is drawn whether or not it is present, so that an image rendered again with
    # one token flipped (its counterfactual twin) differs only where that token is
    lead_side, lead_x, lead_y = rng.choice([-1, 1]), rng.uniform(0.3, 0.4), rng.uniform(0.12, 0.2)
    marker_x, marker_count = rng.choice([0.04, 0.62]), rng.integers(5, 8)
    tube_side = rng.choice([-1, 1])
    if tokens["ecg_lead"]:
        px, py = s / 2 + lead_side * lead_x * s, lead_y * s
        r = 0.035 * s
        lead = _outside(_stroke_layer(size, lambda d: (
            d.ellipse([px - r, py - r, px + r, py + r], outline=255, width=max(1, size // 64)),
            d.line([(px, py + r), (px + lead_side * 0.1 * s, py + 0.3 * s)], fill=255, width=1))), keep_out, 2)
        image = np.maximum(image, lead * 235)
        where |= _bit(lead, "ecg_lead", CXR_ARTEFACTS)
    if tokens["text_marker"]:
        corner_x = marker_x * s
        marker = _outside(_stroke_layer(size, lambda d: [
            d.rectangle([corner_x + j * 0.045 * s, 0.9 * s, corner_x + j * 0.045 * s + 0.03 * s, 0.95 * s], fill=255)
            for j in range(marker_count)]), keep_out, 2)
        image = np.maximum(image, marker * 230)
        where |= _bit(marker, "text_marker", CXR_ARTEFACTS)
    if tokens["chest_tube"]:
        x0 = s / 2 + tube_side * 0.47 * s
        tube = _outside(_stroke_layer(size, lambda d: d.line([(x0, 0.95 * s), (s / 2 + tube_side * 0.42 * s, 0.75 * s),
                                                             (s / 2 + tube_side * 0.38 * s, 0.45 * s)], fill=255,
                                                            width=max(2, size // 40))), keep_out, 2)
        image = np.maximum(image, tube * 220)
        where |= _bit(tube, "chest_tube", CXR_ARTEFACTS)
    letter = rng.choice(["L", "R"])
    text = _stroke_layer(size, lambda d: d.text((0.06 * s, 0.04 * s), letter, fill=255))
    image = np.maximum(image, text * 240)
    where |= _bit(text, "laterality", CXR_ARTEFACTS)
    image += rng.normal(0, 3, image.shape)
    image = ndimage.gaussian_filter(image, 0.5)
    return np.clip(image, 0, 255).astype(np.uint8), lungs, {**tokens, "laterality": letter}, where


def generate_synthetic_cxr(root: str | Path, config: SyntheticConfig | None = None, overwrite: bool = False,
                           progress: bool = True) -> Path:
    """Write ``synthetic-cxr``: grayscale chest-radiograph-like images (mask = both lung fields).

    Multi-label findings inside the lungs: ``nodule``, ``opacity``, ``effusion`` (fluid with a
    meniscus at a lung base). Each finding has a spurious token outside the lungs correlated with it
    (ECG lead, text marker, chest tube); the laterality letter is always present.
    """
    config = config or SyntheticConfig()
    prevalence = np.asarray(config.class_prevalence or DEFAULT_PREVALENCE["synthetic-cxr"], dtype=float)
    if len(prevalence) != len(CXR_FINDINGS) or not ((prevalence > 0) & (prevalence < 1)).all():
        raise ValueError(f"class_prevalence must be {len(CXR_FINDINGS)} probabilities in (0, 1), got {config.class_prevalence}")
    rng = np.random.default_rng([config.seed, 20_000_000])
    ids = [f"cxr_{i:05d}" for i in range(config.n_images)]
    labels = rng.random((config.n_images, len(CXR_FINDINGS))) < prevalence
    stratum = labels @ (2 ** np.arange(len(CXR_FINDINGS)))
    splits = make_splits(ids, seed=config.seed, fractions=config.split_fractions, stratify=stratum)
    token_flags = {CXR_TOKENS[f]: _split_shortcut(splits["split"].to_numpy(), labels[:, j], config, rng)
                   for j, f in enumerate(CXR_FINDINGS)}
    is_test = splits["split"].to_numpy() == "test"
    artefacts = _Artefacts()

    def samples():
        for i, image_id in enumerate(tqdm(ids, desc="synthetic-cxr", disable=not progress)):
            findings = {f: bool(labels[i, j]) for j, f in enumerate(CXR_FINDINGS)}
            tokens = {t: bool(flags[i]) for t, flags in token_flags.items()}
            image, mask, drawn, where = _draw_cxr(np.random.default_rng([config.seed, i]), config.image_size, findings,
                                                  tokens)
            artefacts.records.append({"image_id": image_id, **drawn})
            artefacts.maps[image_id] = where
            if is_test[i]:
                for token in tokens:
                    flipped = {**tokens, token: not tokens[token]}
                    artefacts.twins[f"{image_id}__{token}"] = _draw_cxr(np.random.default_rng([config.seed, i]), config.image_size,
                                                              findings, flipped)[0]
            yield image_id, image, mask

    info = DatasetInfo(
        name="synthetic-cxr", modality="chest X-ray (synthetic)", task="multilabel", class_names=list(CXR_FINDINGS),
        mask_description="both lung fields", source="segx_helpers.data.synthetic.generate_synthetic_cxr",
        licence="CC0-1.0 (generated)", channels=1,
        generator={**_config_dict(config, prevalence), "shortcut_tokens": CXR_TOKENS,
                   "nuisance_artefacts": ["laterality"], "artefact_bits": list(CXR_ARTEFACTS)},
        augmentation={"hflip": False, "vflip": False, "rotation": 5.0},  # = augmentation.MODALITY_AUGMENTATION["chest x-ray"]
    )
    frame = pd.DataFrame({"image_id": ids, **{f: labels[:, j].astype(int) for j, f in enumerate(CXR_FINDINGS)}})
    write_dataset(root, info, samples(), frame, splits, overwrite=overwrite, extras=artefacts.extras())
    return Path(root)


# ------------------------------------------------------------------------------- shared plumbing

def _split_shortcut(split: np.ndarray, has_class: np.ndarray, config: SyntheticConfig,
                    rng: np.random.Generator) -> np.ndarray:
    rho = np.where(split == "test", config.test_shortcut_correlation, config.shortcut_correlation)
    out = np.zeros(len(split), dtype=bool)
    for value in np.unique(rho):
        rows = rho == value
        out[rows] = shortcut_indicator(has_class[rows], float(value), rng)
    return out


def _config_dict(config: SyntheticConfig, prevalence: np.ndarray) -> dict:
    values = asdict(config)
    values["class_prevalence"] = [float(p) for p in prevalence]
    values["split_fractions"] = list(config.split_fractions)
    for name in ("ink_ring", "artefact_distance"):  # as JSON reads them back, so ensure_synthetic can compare
        values[name] = [float(v) for v in getattr(config, name)]
    return values


@dataclass
class _Artefacts:
    """What a generator records while it draws the images, written with the dataset (:meth:`extras`): one row
    per image of which spurious marks it carries (``artefacts.csv``), where they are (``artefacts/<id>.png``,
    uint8 bit flags ``(S, S)``) and the test split's counterfactual twins (``twins/<id>__<artefact>.png``)."""

    records: list[dict] = field(default_factory=list)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    twins: dict[str, np.ndarray] = field(default_factory=dict)

    def extras(self) -> DatasetExtras:
        """The table and files for :func:`~segx_helpers.data.format.write_dataset`, read once the samples are drawn."""
        return DatasetExtras(tables=self.tables, files=self.write_files)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"artefacts.csv": pd.DataFrame(self.records)}

    def write_files(self, folder: Path) -> None:
        (folder / "artefacts").mkdir()
        (folder / "twins").mkdir()
        for image_id, where in self.maps.items():
            Image.fromarray(where).save(folder / "artefacts" / f"{image_id}.png")
        for name, image in self.twins.items():
            image_file(image).save(folder / "twins" / f"{name}.png")


def load_artefacts(root: str | Path) -> pd.DataFrame:
    """The per-image artefact table of a synthetic dataset, merged with its splits."""
    root = Path(root)
    artefacts = pd.read_csv(root / "artefacts.csv", dtype={"image_id": str})
    splits = pd.read_csv(root / "splits.csv", dtype={"image_id": str})
    return artefacts.merge(splits, on="image_id")


GENERATORS = {"synthetic-derm": generate_synthetic_derm, "synthetic-cxr": generate_synthetic_cxr}


def ensure_synthetic(name: str, root: str | Path, config: SyntheticConfig | None = None, progress: bool = True) -> Path:
    """Generate a synthetic dataset unless an identical one (same generator parameters) is already there.

    Re-running a notebook is therefore cheap and safe. A folder holding different parameters is
    replaced only if this package generated it; anything else is refused.
    """
    if name not in GENERATORS:
        raise ValueError(f"Unknown synthetic dataset {name!r}; choose one of {sorted(GENERATORS)}")
    root = Path(root)
    config = config or SyntheticConfig()
    if root.exists():
        try:
            existing = load_info(root).generator
        except Exception:
            existing = None
        wanted = _config_dict(config, np.asarray(config.class_prevalence or DEFAULT_PREVALENCE[name]))
        if (existing and all(existing.get(k) == v for k, v in wanted.items()) and (root / "artefacts.csv").is_file()
                and (root / "twins").is_dir()):
            return root
        return GENERATORS[name](root, config, overwrite=True, progress=progress)
    return GENERATORS[name](root, config, progress=progress)


def measure_shortcut(root: str | Path) -> pd.DataFrame:
    """Measured phi correlation between each shortcut artefact and its class, per split.

    Columns: split, pair ("<artefact> ~ <class>"), measured, parameter (the generator's setting).
    """
    root = Path(root)
    info = load_info(root)
    artefacts = load_artefacts(root)
    labels = pd.read_csv(root / "labels.csv", dtype={"image_id": str})
    table = artefacts.merge(labels, on="image_id")
    pairs = shortcut_pairs(info)
    if info.task == "multiclass":
        has = {c: (table["label"] == c).to_numpy() for c in pairs}
    else:
        has = {c: table[c].to_numpy() == 1 for c in pairs}
    rows = []
    for split in ("train", "val", "test"):
        in_split = (table["split"] == split).to_numpy()
        parameter = info.generator["test_shortcut_correlation" if split == "test" else "shortcut_correlation"]
        for class_name, artefact in pairs.items():
            rows.append({"split": split, "pair": f"{artefact} ~ {class_name}", "parameter": parameter,
                         "measured": phi_correlation(table.loc[in_split, artefact].astype(bool), has[class_name][in_split])})
    return pd.DataFrame(rows)


def shortcut_pairs(info: DatasetInfo) -> dict[str, str]:
    """Class name -> the artefact column (in ``artefacts.csv``) correlated with it; empty for real data."""
    generator = info.generator or {}
    if "shortcut_class" in generator:
        return {generator["shortcut_class"]: generator["shortcut_artefact"]}
    return dict(generator.get("shortcut_tokens", {}))


def has_shortcut_artefact(root: str | Path, image_ids: list[str]) -> np.ndarray:
    """Per image id: does it carry any spurious artefact correlated with a class? (all False for real data)."""
    root = Path(root)
    pairs = shortcut_pairs(load_info(root))
    if not pairs or not (root / "artefacts.csv").is_file():
        return np.zeros(len(image_ids), dtype=bool)
    table = load_artefacts(root).set_index("image_id").loc[list(image_ids)]
    return table[sorted(set(pairs.values()))].astype(bool).any(axis=1).to_numpy()


def artefact_masks(root: str | Path, image_ids: list[str], kinds: list[str] | None = None) -> np.ndarray:
    """Where the artefacts are, bool ``(N, H, W)`` for ``image_ids``: the union of ``kinds`` (default every
    kind the generator drew, see ``dataset.json``'s ``artefact_bits``); all False for a dataset without
    artefact maps (real data)."""
    root = Path(root)
    bits = (load_info(root).generator or {}).get("artefact_bits", [])
    wanted = bits if kinds is None else kinds
    unknown = sorted(set(wanted) - set(bits))
    if unknown and bits:
        raise ValueError(f"unknown artefact kinds {unknown}; {root} has {bits}")
    flag = sum(1 << bits.index(k) for k in wanted if k in bits)
    out = []
    for image_id in image_ids:
        path = root / "artefacts" / f"{check_safe_id(image_id)}.png"
        if not path.is_file():
            size = Image.open(root / "masks" / f"{image_id}.png").size if (root / "masks" / f"{image_id}.png").is_file() else None
            if size is None:
                raise FileNotFoundError(f"{path} not found, and no mask to size an empty artefact map by")
            out.append(np.zeros(size[::-1], bool))
            continue
        out.append((np.asarray(Image.open(path)) & flag) > 0)
    return np.stack(out) if out else np.zeros((0, 0, 0), bool)


def twin_path(root: str | Path, image_id: str, artefact: str) -> Path:
    """The counterfactual twin of ``image_id`` with ``artefact`` flipped (test split of a synthetic set)."""
    path = Path(root) / "twins" / f"{check_safe_id(image_id)}__{check_safe_id(artefact, 'artefact')}.png"
    if not path.is_file():
        raise FileNotFoundError(f"No counterfactual twin {path}: twins exist for the test split of the synthetic "
                                "sets generated by this version (re-run notebook 01 to regenerate)")
    return path
