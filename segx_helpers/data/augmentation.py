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
    """Random geometric changes applied to training images (and their masks).

    ``hflip`` / ``vflip``: mirror left-right / top-bottom with probability 0.5. ``rotation``: rotate by
    an angle drawn uniformly from ``[-rotation, rotation]`` degrees (0 = never).
    """

    hflip: bool = True
    vflip: bool = True
    rotation: float = 15.0

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"augmentation {name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.rotation, bool) or not isinstance(self.rotation, (int, float)) or not 0 <= self.rotation <= 180:
            raise ValueError(f"augmentation rotation must be a number of degrees in [0, 180], got {self.rotation!r}")
        object.__setattr__(self, "rotation", float(self.rotation))

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
        parts = [name for name, on in (("horizontal flips", self.hflip), ("vertical flips", self.vflip)) if on]
        if self.rotation:
            parts.append(f"rotations up to +-{self.rotation:g} degrees")
        return ", ".join(parts) if parts else "none"


MODALITY_AUGMENTATION: dict[str, Augmentation] = {
    "chest x-ray": Augmentation(hflip=False, vflip=False, rotation=5.0),
    "dermoscopy": Augmentation(hflip=True, vflip=True, rotation=15.0),
}
"""Defaults per modality, found by name in ``dataset.json``'s ``modality`` (case-insensitive, e.g.
``"chest X-ray (synthetic)"``, ``"CXR"``, ``"dermoscopy"``)."""

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
