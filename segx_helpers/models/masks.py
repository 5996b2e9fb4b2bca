"""Mask sources: the clinical-interest probabilities of a split from a trained segmenter, its
checkpoint, a folder of ``<id>.png`` masks or any callable (:func:`mask_probabilities`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segx_helpers.models.checkpoints import TrainedModel, load_trained, split_tensors
from segx_helpers.data.format import LoadedDataset, read_mask
from segx_helpers.models.training import predict_masks


def mask_probabilities(source, data: LoadedDataset, split: str, image_size: int,
                       images: torch.Tensor | None = None) -> np.ndarray:
    """Clinical-interest probabilities ``(N, image_size, image_size)`` for one split, from any mask source.

    ``source`` may be a :class:`~segx_helpers.models.checkpoints.TrainedModel` segmenter or a path to its checkpoint (run with its own
    image size and normalisation, then resized), a folder of ``<id>.png`` masks (e.g. the dataset's
    ``masks/`` or masks made by another tool), or any callable ``images (N, C, H, W) -> (N, H, W)``
    (then ``images`` must be given, prepared as the classifier expects).
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        ids = data.split(split)["image_id"]
        masks = []
        for image_id in ids:
            path = Path(source) / f"{image_id}.png"
            if not path.is_file():
                raise FileNotFoundError(f"No mask for {image_id!r} in {source} (expected {path})")
            masks.append(torch.from_numpy(read_mask(path).astype(np.float32))[None, None])
        return np.concatenate([F.interpolate(m, size=(image_size, image_size), mode="nearest")[:, 0].numpy()
                               for m in masks])
    if isinstance(source, (str, Path)):
        source = load_trained(source, "segmenter")
    if isinstance(source, TrainedModel):
        tensors = split_tensors(data, split, source.meta)
        prob = torch.from_numpy(predict_masks(source.model, tensors["image"]))[:, None]
        return F.interpolate(prob, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0].numpy()
    if callable(source):
        if images is None:
            raise ValueError("a callable mask source needs the images it should segment: pass images=")
        out = np.asarray(source(images), dtype=np.float32)
        if out.shape != (len(images), image_size, image_size):
            raise ValueError(f"the mask callable returned shape {out.shape}, expected {(len(images), image_size, image_size)}")
        return out
    raise TypeError(f"Unsupported mask source {type(source).__name__}: use a segmenter, checkpoint path, mask folder or callable")
