"""The torch Dataset: shapes, normalisation, and paired image/mask augmentation."""
from __future__ import annotations

import numpy as np
import torch

from segx_helpers.data import load_dataset
from segx_helpers.data.torch_dataset import Normalization, SegXDataset


def test_items_have_documented_shapes(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(n=30, size=40))
    ds = SegXDataset(data, "train", image_size=32)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["target"].dtype == torch.int64 and item["has_mask"]
    assert len(ds) == 21


def test_normalisation_round_trips(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    norm = Normalization()
    ds = SegXDataset(data, "val", image_size=32, normalization=norm)
    from segx_helpers.data.format import read_image
    raw = read_image(ds.rows.iloc[0]["image_path"]) / 255.0
    back = norm.denormalize(ds[0]["image"][None])[0]
    assert np.abs(back - raw).max() < 1e-5


def test_train_augmentation_moves_image_and_mask_together(make_tiny_dataset, tmp_path):
    """Write an image whose bright square *is* the mask; after random flips/rotations they must still coincide."""
    from segx_helpers.data.format import DatasetInfo, make_splits, write_dataset
    import pandas as pd

    rng = np.random.default_rng(0)
    samples, ids = [], []
    for i in range(30):
        mask = np.zeros((64, 64), bool)
        y, x = rng.integers(4, 30, 2)
        mask[y:y + 20, x:x + 12] = True
        image = np.where(mask[..., None], 250, 10).astype(np.uint8).repeat(3, axis=2)
        samples.append((f"s{i}", image, mask))
        ids.append(f"s{i}")
    info = DatasetInfo(name="paired", modality="t", task="multiclass", class_names=["a"], mask_description="square")
    root = write_dataset(tmp_path / "paired", info, samples, pd.DataFrame({"image_id": ids, "label": "a"}),
                         make_splits(ids, 0))
    torch.manual_seed(0)
    ds = SegXDataset(load_dataset(root), "train", image_size=64, train=True)
    for i in range(len(ds)):
        item = ds[i]
        bright = item["image"].mean(0) > 0.5
        mask = item["mask"][0] > 0.5
        agreement = (bright == mask).float().mean()
        assert agreement > 0.97


def test_grayscale_dataset_gives_one_channel(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(n=30, channels=1))
    item = SegXDataset(data, "test", image_size=32)[0]
    assert item["image"].shape == (1, 32, 32)
