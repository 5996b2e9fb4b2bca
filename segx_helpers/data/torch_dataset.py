"""The torch ``Dataset`` over the folder format, with paired image/mask transforms.

Geometric transforms (resize, flips, rotations) go through ``torchvision.transforms.v2`` with the
mask wrapped as ``tv_tensors.Mask``: one call transforms both with identical parameters, and the
mask is resized with nearest-neighbour interpolation so it stays binary. Which flips and rotations a
training split gets is the dataset's :class:`~segx_helpers.data.augmentation.Augmentation` (its
``dataset.json``, else its modality's default).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from segx_helpers.data.augmentation import Augmentation, augmentation_for
from segx_helpers.data.format import LoadedDataset, read_image, read_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std applied after scaling pixels to [0, 1]; stored in checkpoints."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def for_channels(cls, channels: int) -> "Normalization":
        """ImageNet statistics for RGB; their channel average for single-channel images."""
        if channels == 3:
            return cls()
        return cls(mean=(float(np.mean(IMAGENET_MEAN)),), std=(float(np.mean(IMAGENET_STD)),))

    def denormalize(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` normalised tensor -> ``(N, H, W, C)`` float array in [0, 1] for display."""
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        mean = np.asarray(self.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(self.std, dtype=np.float32)[None, :, None, None]
        return np.clip(array * std + mean, 0, 1).transpose(0, 2, 3, 1)


class RandomRotate90(v2.Transform):
    """Rotate by 0, 90, 180 or 270 degrees, drawn uniformly, images and masks alike (exact: ``torch.rot90``)."""

    def make_params(self, flat_inputs: list) -> dict:
        return {"turns": int(torch.randint(4, ()).item())}

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, torch.Tensor) or params["turns"] == 0:
            return inpt
        return tv_tensors.wrap(torch.rot90(inpt, params["turns"], dims=(-2, -1)), like=inpt) \
            if isinstance(inpt, tv_tensors.TVTensor) else torch.rot90(inpt, params["turns"], dims=(-2, -1))


def make_transforms(image_size: int, normalization: Normalization, train: bool = False,
                    rotation_degrees: float = 15.0, augmentation: Augmentation | None = None) -> v2.Compose:
    """Paired transforms for ``(tv_tensors.Image uint8, tv_tensors.Mask)``; augmentation only when ``train``:
    ``augmentation``'s crop, flips, rotations and colour jitter (default: both flips and ``rotation_degrees``)."""
    augmentation = (
        (augmentation if augmentation is not None else Augmentation(rotation=rotation_degrees))
        if train
        else None
    )
    if augmentation is not None and augmentation.crop_scale is not None:
        steps: list = [
            v2.RandomResizedCrop(
                (image_size, image_size), scale=(augmentation.crop_scale, 1.0), antialias=True
            )
        ]
    else:
        steps = [v2.Resize((image_size, image_size), antialias=True)]
    if augmentation is not None:
        steps += [v2.RandomHorizontalFlip()] if augmentation.hflip else []
        steps += [v2.RandomVerticalFlip()] if augmentation.vflip else []
        steps += [RandomRotate90()] if augmentation.rotate90 else []
        steps += [v2.RandomRotation(augmentation.rotation)] if augmentation.rotation else []
        jitter = augmentation.colour_jitter
        steps += (
            [v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 4)]
            if jitter
            else []
        )
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.float32, "others": None}, scale=True),
              v2.Normalize(mean=list(normalization.mean), std=list(normalization.std))]
    return v2.Compose(steps)


class SegXDataset(Dataset):
    """One split of a dataset as torch samples.

    Each item is a dict: ``image`` float ``(C, H, W)`` normalised, ``mask`` float ``(1, H, W)`` in
    {0, 1} (all zeros and ``has_mask`` False when the image has no mask), ``target`` (int64 class
    index for multiclass, float ``(C,)`` 0/1 for multilabel) and ``image_id``.
    With ``cache=True`` decoded images and masks are kept in memory already resized to ``image_size`` (twice it
    when the augmentation crops), which makes epochs after the first much faster: a large photograph
    is decoded and resized once, not every epoch (the resize is the transforms' first, deterministic step). ``train=True`` augments with
    ``augmentation`` (default: the dataset's own, :func:`~segx_helpers.data.augmentation.augmentation_for`);
    ``self.augmentation`` says what is applied (``None`` when not training).
    """

    def __init__(self, data: LoadedDataset, split: str | None, image_size: int,
                 normalization: Normalization | None = None, train: bool = False, cache: bool = True,
                 augmentation: Augmentation | None = None) -> None:
        self.data = data
        self.rows = data.table if split is None else data.split(split)
        if len(self.rows) == 0:
            raise ValueError(f"Split {split!r} of {data.root} has no images.")
        self.channels = data.info.channels
        self.normalization = normalization or Normalization.for_channels(self.channels)
        if len(self.normalization.mean) != self.channels:
            raise ValueError(f"normalization has {len(self.normalization.mean)} channels but {data.root} images have {self.channels}.")
        self.augmentation = (augmentation if augmentation is not None else augmentation_for(data.info)) if train else None
        self.transform = make_transforms(image_size, self.normalization, train=train, augmentation=self.augmentation)
        # the cache keeps images resized to what the transforms' first step reads: the training size (a no-op
        # resize then), or twice it for random resized crops, so that a crop keeps detail
        self.cached_size = (
            image_size * 2
            if self.augmentation is not None and self.augmentation.crop_scale is not None
            else image_size
        )
        all_targets = data.targets
        index = {image_id: i for i, image_id in enumerate(data.table["image_id"])}
        self.targets = all_targets[[index[i] for i in self.rows["image_id"]]]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_ids(self) -> list[str]:
        return self.rows["image_id"].tolist()

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        row = self.rows.iloc[i]
        image = read_image(row["image_path"], channels=self.channels)
        mask = read_mask(row["mask_path"], expected_size=image.shape[:2]) if row["mask_path"] is not None else None
        if self._cache is not None:
            size = min(self.cached_size, max(image.shape[:2]))  # never larger than the image itself
            resize = v2.Resize((size, size), antialias=True)
            image_t, mask_t = resize(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
                                          tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))[None])
                                          if mask is not None else None)
            image = image_t.permute(1, 2, 0).numpy()
            mask = mask_t[0].numpy() > 0 if mask is not None else None
            self._cache[i] = (image, mask)
        return image, mask

    def __getitem__(self, i: int) -> dict:
        image, mask = self._load(i)
        has_mask = mask is not None
        mask_array = mask if has_mask else np.zeros(image.shape[:2], dtype=bool)
        image_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        mask_t = tv_tensors.Mask(torch.from_numpy(mask_array.astype(np.uint8))[None])
        image_t, mask_t = self.transform(image_t, mask_t)
        target = self.targets[i]
        target_t = torch.as_tensor(target, dtype=torch.int64 if self.data.info.task == "multiclass" else torch.float32)
        return {"image": image_t.as_subclass(torch.Tensor), "mask": (mask_t.as_subclass(torch.Tensor) > 0.5).float(),
                "target": target_t, "has_mask": has_mask, "image_id": self.rows.iloc[i]["image_id"]}

    def tensors(self) -> dict:
        """The whole split as stacked tensors (handy for explanation and analysis on small splits)."""
        items = [self[i] for i in range(len(self))]
        return {"image": torch.stack([x["image"] for x in items]), "mask": torch.stack([x["mask"] for x in items]),
                "target": torch.stack([x["target"] for x in items]), "has_mask": np.array([x["has_mask"] for x in items]),
                "image_id": [x["image_id"] for x in items]}


def estimate_normalization(data: LoadedDataset, max_images: int = 200) -> Normalization:
    """Per-channel mean and std of the training images (for modalities far from ImageNet, e.g. microscopy)."""
    rows = data.split("train").head(max_images)
    pixels = np.concatenate([read_image(p, channels=data.info.channels).reshape(-1, data.info.channels) / 255.0
                             for p in rows["image_path"]])
    return Normalization(mean=tuple(float(v) for v in pixels.mean(axis=0)),
                         std=tuple(float(max(v, 1e-3)) for v in pixels.std(axis=0)))
