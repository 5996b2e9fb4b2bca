"""Training augmentation as part of a modality's settings.

A dataset's ``dataset.json`` may carry ``"augmentation": {"hflip": true, "vflip": false, "rotation": 5.0}``;
without it the modality decides (:func:`default_augmentation`): a chest X-ray has a left and a right
(the heart, the side markers) and a top and a bottom, so it gets a small rotation and no flips; a
dermoscopy image of a lesion has no orientation, so it gets both flips and a larger rotation; any other
modality keeps the package's historical default (both flips, +-15 degrees). Only training splits are
augmented (``SegXDataset(train=True)``); images and masks always move together.

No torch here: the dataset format validates the field with this module, and
:func:`segx_helpers.data.torch_dataset.make_transforms` turns it into transforms.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Augmentation:
    """Random changes applied to training images (geometric ones to their masks too).

    ``hflip`` / ``vflip``: mirror left-right / top-bottom with probability 0.5. ``rotation``: rotate by
    an angle drawn uniformly from ``[-rotation, rotation]`` degrees (0 = never). ``rotate90``: rotate by a
    multiple of 90 degrees drawn uniformly (no interpolation, no corners filled). ``crop_scale``: instead of
    resizing the whole image, a random resized crop covering ``[crop_scale, 1]`` of its area (aspect 3/4 to 4/3),
    taken from the image at up to twice the training size, so the crop keeps detail (``None`` = no crop).
    ``colour_jitter``: brightness, contrast and saturation each scaled by a factor drawn from
    ``[1 - colour_jitter, 1 + colour_jitter]``, hue shifted by up to ``colour_jitter / 4`` (0 = none).
    """

    hflip: bool = True
    vflip: bool = True
    rotation: float = 15.0
    rotate90: bool = False
    crop_scale: float | None = None
    colour_jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "rotate90"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"augmentation {name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.rotation, bool) or not isinstance(self.rotation, (int, float)) or not 0 <= self.rotation <= 180:
            raise ValueError(f"augmentation rotation must be a number of degrees in [0, 180], got {self.rotation!r}")
        object.__setattr__(self, "rotation", float(self.rotation))
        if self.crop_scale is not None and (
            isinstance(self.crop_scale, bool)
            or not isinstance(self.crop_scale, (int, float))
            or not 0 < self.crop_scale <= 1
        ):
            raise ValueError(
                f"augmentation crop_scale must be None or a share of the area in (0, 1], got {self.crop_scale!r}"
            )
        if isinstance(self.colour_jitter, bool) or not isinstance(self.colour_jitter, (int, float)) \
                or not 0 <= self.colour_jitter < 1:
            raise ValueError(f"augmentation colour_jitter must be a number in [0, 1), got {self.colour_jitter!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "Augmentation":
        """From ``dataset.json``'s ``augmentation`` object; missing keys take the class defaults, unknown keys fail."""
        if not isinstance(values, dict):
            raise ValueError(f"augmentation must be an object like {asdict(cls())}, got {values!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"augmentation has unknown keys {unknown}; its keys are {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = [name for name, on in (("horizontal flips", self.hflip), ("vertical flips", self.vflip),
                                       ("90-degree rotations", self.rotate90)) if on]
        if self.rotation:
            parts.append(f"rotations up to +-{self.rotation:g} degrees")
        if self.crop_scale is not None:
            parts.append(f"random resized crops of {self.crop_scale:g} to 1 of the area")
        if self.colour_jitter:
            parts.append(f"colour jitter {self.colour_jitter:g}")
        return ", ".join(parts) if parts else "none"


MODALITY_AUGMENTATION: dict[str, Augmentation] = {
    "chest x-ray": Augmentation(hflip=False, vflip=False, rotation=5.0),
    "dermoscopy": Augmentation(hflip=True, vflip=True, rotation=15.0),
}
"""Defaults per modality, found by name in ``dataset.json``'s ``modality`` (case-insensitive, e.g.
``"chest X-ray (synthetic)"``, ``"CXR"``, ``"dermoscopy"``)."""

REAL_DERMOSCOPY = Augmentation(hflip=True, vflip=True, rotation=0.0, rotate90=True, crop_scale=0.5, colour_jitter=0.1)
"""The augmentation of the real-data classifier recipe for dermoscopy (ISIC, HAM10000): random resized crops from
the full-size image, flips, 90-degree rotations and mild colour jitter (a lesion has no orientation, and
dermatoscopes differ in light and colour)."""

_ALIASES = {"chest x-ray": ("chest x-ray", "chest xray", "chest x ray", "cxr", "chest radiograph"),
            "dermoscopy": ("dermoscopy", "dermatoscopy", "dermoscopic", "skin lesion")}


def default_augmentation(modality: str) -> Augmentation:
    """The augmentation for ``modality`` when ``dataset.json`` names none (see :data:`MODALITY_AUGMENTATION`);
    an unknown modality keeps the historical default (both flips, +-15 degrees)."""
    text = (modality or "").strip().lower()
    for key, aliases in _ALIASES.items():
        if any(alias in text for alias in aliases):
            return MODALITY_AUGMENTATION[key]
    return Augmentation()


def augmentation_for(info) -> Augmentation:
    """A dataset's training augmentation: its ``dataset.json`` ``augmentation`` if set, else its modality's default."""
    if getattr(info, "augmentation", None) is not None:
        return Augmentation.from_dict(info.augmentation)
    return default_augmentation(info.modality)
