"""The torch Dataset: shapes, normalisation, and paired image/mask augmentation."""
from __future__ import annotations

import numpy as np
import pytest
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


@pytest.mark.parametrize("train", [False, True])
def test_cached_items_equal_uncached_ones_when_the_images_are_resized(make_tiny_dataset, train):
    """The cache holds images resized to image_size: every item is the same as one read and resized afresh."""
    data = load_dataset(make_tiny_dataset(n=30, size=48))
    cached, fresh = (SegXDataset(data, "train", image_size=32, train=train, cache=c) for c in (True, False))
    for epoch in range(2):  # the second epoch reads the cache
        for i in range(len(cached)):
            torch.manual_seed(100 * epoch + i)
            a = cached[i]
            torch.manual_seed(100 * epoch + i)
            b = fresh[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]), (epoch, i)
    assert cached._cache[0][0].shape == (32, 32, 3) and cached._cache[0][1].shape == (32, 32)


def test_normalisation_round_trips(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    norm = Normalization()
    ds = SegXDataset(data, "val", image_size=32, normalization=norm)
    from segx_helpers.data.format import read_image
    raw = read_image(ds.rows.iloc[0]["image_path"]) / 255.0
    back = norm.denormalize(ds[0]["image"][None])[0]
    assert np.abs(back - raw).max() < 1e-5


@pytest.mark.parametrize("recipe", ["dataset's own", "real dermoscopy"])
def test_train_augmentation_moves_image_and_mask_together(make_tiny_dataset, tmp_path, recipe):
    """Write an image whose bright square *is* the mask; after random flips/rotations (and, in the real-data
    recipe, resized crops, 90-degree turns and colour jitter) they must still coincide."""
    from segx_helpers.data.augmentation import REAL_DERMOSCOPY
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
    augmentation = REAL_DERMOSCOPY if recipe == "real dermoscopy" else None
    ds = SegXDataset(load_dataset(root), "train", image_size=32, train=True, augmentation=augmentation)
    assert ds.cached_size == (64 if augmentation is not None else 32)  # crops are taken from a larger image
    for i in range(len(ds)):
        item = ds[i]
        bright = item["image"].mean(0) > 0.5
        mask = item["mask"][0] > 0.5
        agreement = (bright == mask).float().mean()
        assert agreement > 0.95


def test_grayscale_dataset_gives_one_channel(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(n=30, channels=1))
    item = SegXDataset(data, "test", image_size=32)[0]
    assert item["image"].shape == (1, 32, 32)


# ------------------------------------------------------------------------------ augmentation per modality (issue 18)

def _set_json(root, **fields):
    import json

    path = root / "dataset.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, **fields}))


def test_augmentation_defaults_by_modality_and_reads_dataset_json(make_tiny_dataset):
    from segx_helpers.data.augmentation import MODALITY_AUGMENTATION, Augmentation, default_augmentation

    cxr = default_augmentation("chest X-ray (synthetic)")
    assert cxr == MODALITY_AUGMENTATION["chest x-ray"] and not cxr.vflip and not cxr.hflip and 0 < cxr.rotation <= 10
    assert default_augmentation("CXR") == cxr
    assert default_augmentation("Dermoscopy") == Augmentation(hflip=True, vflip=True, rotation=15.0)
    assert default_augmentation("histology") == Augmentation()  # unknown: the historical default

    root = make_tiny_dataset(n=30, size=32)  # modality "test", no augmentation field
    assert SegXDataset(load_dataset(root), "train", 32, train=True).augmentation == Augmentation()
    assert SegXDataset(load_dataset(root), "val", 32).augmentation is None
    _set_json(root, modality="chest X-ray")
    assert SegXDataset(load_dataset(root), "train", 32, train=True).augmentation == cxr
    _set_json(root, augmentation={"hflip": True, "vflip": False, "rotation": 0})
    data = load_dataset(root)
    assert data.info.augmentation == {"hflip": True, "vflip": False, "rotation": 0}
    assert SegXDataset(data, "train", 32, train=True).augmentation == Augmentation(True, False, 0.0)


@pytest.mark.parametrize("augmentation, message", [({"vflip": "no"}, "vflip must be true or false"),
                                                   ({"rotation": 400}, r"rotation must be .* \[0, 180\]"),
                                                   ({"hflip": True, "zoom": 2}, r"unknown keys \['zoom'\]"),
                                                   (["hflip"], "must be an object")])
def test_bad_augmentation_in_dataset_json_fails_at_load(make_tiny_dataset, augmentation, message):
    from segx_helpers.data import DatasetFormatError

    root = make_tiny_dataset(n=30, size=32)
    _set_json(root, augmentation=augmentation)
    with pytest.raises(DatasetFormatError, match=message):
        load_dataset(root)


def _augmented_views(ds, i, n=40):
    torch.manual_seed(0)
    return [ds[i] for _ in range(n)]


def test_training_transforms_follow_the_augmentation(make_tiny_dataset):
    """An asymmetric mask (a corner block) shows which flips happen: with hflip only it appears mirrored
    left-right and never top-bottom; with no augmentation it never moves; only train=True augments."""
    from segx_helpers.data.augmentation import Augmentation

    data = load_dataset(make_tiny_dataset(n=30, size=32))
    corner = torch.zeros(32, 32)
    corner[:8, :4] = 1
    for i in range(len(data.table)):  # replace each mask by the corner block
        from PIL import Image
        Image.fromarray((corner.numpy() * 255).astype(np.uint8)).save(data.table.iloc[i]["mask_path"])

    def placements(ds):
        seen = set()
        for item in _augmented_views(ds, 0):
            m = item["mask"][0]
            seen.add((bool(m[:16].sum() > m[16:].sum()), bool(m[:, :16].sum() > m[:, 16:].sum())))
        return seen  # (mask in the top half, mask in the left half)

    hflip_only = SegXDataset(data, "train", 32, train=True, augmentation=Augmentation(True, False, 0.0))
    assert placements(hflip_only) == {(True, True), (True, False)}
    both = SegXDataset(data, "train", 32, train=True, augmentation=Augmentation(True, True, 0.0))
    assert {top for top, _ in placements(both)} == {True, False}
    for ds in (SegXDataset(data, "train", 32, train=True, augmentation=Augmentation(hflip=False, vflip=False, rotation=0.0)),
               SegXDataset(data, "train", 32, augmentation=Augmentation())):
        assert all(torch.equal(item["mask"][0], corner) for item in _augmented_views(ds, 0, 5))


def test_synthetic_cxr_writes_its_modality_augmentation(tmp_path):
    from segx_helpers.data import SyntheticConfig, generate_synthetic_cxr
    from segx_helpers.data.augmentation import MODALITY_AUGMENTATION, Augmentation

    root = generate_synthetic_cxr(tmp_path / "cxr", SyntheticConfig(n_images=24, image_size=32, seed=0))
    data = load_dataset(root)
    assert Augmentation.from_dict(data.info.augmentation) == MODALITY_AUGMENTATION["chest x-ray"]
    assert SegXDataset(data, "train", 32, train=True).augmentation == MODALITY_AUGMENTATION["chest x-ray"]
