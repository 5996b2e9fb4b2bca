"""Synthetic generators: determinism, mask/image alignment, shortcut correlation, reuse."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from segx_helpers.data import SyntheticConfig, ensure_synthetic, generate_synthetic_cxr, generate_synthetic_derm, load_dataset
from segx_helpers.data.format import read_image, read_mask
from segx_helpers.data.synthetic import measure_shortcut, phi_correlation, shortcut_indicator


@pytest.fixture(scope="module")
def derm(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "derm"
    return generate_synthetic_derm(root, SyntheticConfig(n_images=300, image_size=64, seed=1, shortcut_correlation=0.8,
                                                         test_shortcut_correlation=-0.5), progress=False)


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "cxr"
    return generate_synthetic_cxr(root, SyntheticConfig(n_images=300, image_size=64, seed=1, shortcut_correlation=0.7),
                                  progress=False)


@pytest.mark.parametrize("rho", [-1.0, -0.5, 0.0, 0.3, 0.8, 1.0])
def test_shortcut_indicator_realises_the_correlation(rho):
    rng = np.random.default_rng(0)
    has = rng.random(400) < 0.3
    assert phi_correlation(shortcut_indicator(has, rho, rng), has) == pytest.approx(rho, abs=0.06)


def test_derm_is_valid_and_deterministic(derm, tmp_path):
    data = load_dataset(derm)
    assert data.info.task == "multiclass" and data.info.class_names == ["nevus", "melanoma", "keratosis"]
    assert len(data.table) == 300 and data.table["mask_path"].notna().all()
    again = generate_synthetic_derm(tmp_path / "again", SyntheticConfig(n_images=300, image_size=64, seed=1,
                                                                        shortcut_correlation=0.8,
                                                                        test_shortcut_correlation=-0.5), progress=False)
    for image_id in ("derm_00000", "derm_00123"):
        assert (read_image(derm / "images" / f"{image_id}.png") == read_image(again / "images" / f"{image_id}.png")).all()
    assert (pd.read_csv(derm / "splits.csv")).equals(pd.read_csv(again / "splits.csv"))


def test_derm_seed_changes_the_data(derm, tmp_path):
    other = generate_synthetic_derm(tmp_path / "other", SyntheticConfig(n_images=30, image_size=64, seed=2), progress=False)
    assert not (read_image(derm / "images" / "derm_00000.png") == read_image(other / "images" / "derm_00000.png")).all()


def test_derm_lesion_is_aligned_with_its_mask(derm):
    """Inside the mask the colour is far from the skin; in a ring just outside it, it is skin again."""
    from scipy import ndimage

    for i in range(0, 300, 23):
        image = read_image(derm / "images" / f"derm_{i:05d}.png").astype(float)
        mask = read_mask(derm / "masks" / f"derm_{i:05d}.png")
        assert 0.02 < mask.mean() < 0.3
        ring = ndimage.binary_dilation(mask, iterations=5) & ~ndimage.binary_dilation(mask, iterations=2)
        skin = np.median(image[ring], axis=0)
        distance = np.linalg.norm(image - skin, axis=2)
        assert np.median(distance[mask]) > np.median(distance[ring]) + 15


def _blue(image: np.ndarray) -> np.ndarray:
    """Pixels of the colour patch (bold blue), bool ``(H, W)``."""
    image = image.astype(int)
    return (image[..., 2] - image[..., 0] > 60) & (image[..., 2] > 120)


def test_derm_patch_is_never_inside_the_lesion_and_lies_at_its_recorded_place(derm):
    from scipy import ndimage

    artefacts = pd.read_csv(derm / "artefacts.csv")
    assert load_dataset(derm).info.generator["shortcut_artefact"] == "patch"
    with_patch = artefacts[artefacts["patch"]].head(12)
    assert len(with_patch) == 12
    for row in with_patch.itertuples():
        blue = _blue(read_image(derm / "images" / f"{row.image_id}.png"))
        mask = read_mask(derm / "masks" / f"{row.image_id}.png")
        assert blue.sum() > 20 and not (blue & mask).any()
        ys, xs = np.nonzero(blue)
        assert abs(xs.mean() - row.x) < 2 and abs(ys.mean() - row.y) < 2
        gap = ndimage.distance_transform_edt(~mask)[blue].min() - 1
        assert abs(gap - row.distance_px) <= 2.5, row.image_id


def test_derm_patch_distance_follows_the_dial(tmp_path):
    """A narrow far range puts every patch far from the lesion (or as far as the image allows), a range at 0
    puts it against the lesion; absent patches still record where their twin has one."""
    def distances(low, high):
        root = generate_synthetic_derm(tmp_path / f"d{low}", SyntheticConfig(n_images=40, image_size=64, seed=4,
                                                                            artefact_distance=(low, high)), progress=False)
        return pd.read_csv(root / "artefacts.csv")
    near, far = distances(0.0, 0.02), distances(0.25, 0.3)
    assert near["distance_px"].max() <= 0.02 * 64 + 1.5
    assert far["distance_px"].median() > 10 and far["distance_px"].min() > near["distance_px"].max()
    assert (~far["patch"]).any() and far.loc[~far["patch"], "distance_px"].notna().all()


def test_derm_twin_differs_only_where_the_patch_is(derm):
    artefacts = pd.read_csv(derm / "artefacts.csv").merge(pd.read_csv(derm / "splits.csv"))
    for row in artefacts[artefacts["split"] == "test"].head(6).itertuples():
        image = read_image(derm / "images" / f"{row.image_id}.png").astype(int)
        twin = read_image(derm / "twins" / f"{row.image_id}__patch.png").astype(int)
        changed = np.abs(image - twin).sum(axis=2) > 0
        ys, xs = np.nonzero(changed)
        assert changed.any()
        assert np.hypot(xs - row.x, ys - row.y).max() < 0.07 * 64 + 4  # the patch and its smoothed rim, nothing else


def test_derm_ring_style_keeps_the_thin_ink_ring(tmp_path):
    root = generate_synthetic_derm(tmp_path / "ring", SyntheticConfig(n_images=40, image_size=64, seed=1,
                                                                      artefact_style="ring"), progress=False)
    artefacts = pd.read_csv(root / "artefacts.csv")
    assert load_dataset(root).info.generator["shortcut_artefact"] == "ink" and "patch" not in artefacts
    for image_id in artefacts.loc[artefacts["ink"], "image_id"][:6]:
        image = read_image(root / "images" / f"{image_id}.png").astype(int)
        purple = (image[..., 2] - image[..., 1] > 60) & (image[..., 0] - image[..., 1] > 20)
        mask = read_mask(root / "masks" / f"{image_id}.png")
        assert purple.sum() > 5 and not (purple & mask).any()
    assert (artefacts["distance_px"] >= 1.5).all()  # the ring keeps a margin of about 3 px from the lesion


def test_derm_shortcut_matches_the_parameters(derm):
    table = measure_shortcut(derm).set_index("split")
    assert table.loc["train", "measured"] == pytest.approx(0.8, abs=0.08)
    assert table.loc["test", "measured"] == pytest.approx(-0.5, abs=0.12)
    assert table.loc["test", "parameter"] == -0.5


def test_cxr_is_multilabel_grayscale_with_lung_masks(cxr):
    data = load_dataset(cxr)
    assert data.info.task == "multilabel" and data.info.channels == 1
    assert data.targets.shape == (300, 3)
    image = read_image(cxr / "images" / "cxr_00000.png", channels=1)
    mask = read_mask(cxr / "masks" / "cxr_00000.png")
    assert image.shape == (64, 64, 1)
    assert 0.1 < mask.mean() < 0.45
    assert image[..., 0][mask].mean() < image[..., 0][~mask & (image[..., 0] > 60)].mean()


def test_cxr_shortcut_matches_the_parameter(cxr):
    table = measure_shortcut(cxr)
    train = table[table["split"] == "train"]
    assert len(train) == 3
    assert np.allclose(train["measured"], 0.7, atol=0.1)
    reversed_in_test = SyntheticConfig().test_shortcut_correlation      # -0.4 by default: the trap-set design
    assert reversed_in_test < 0
    assert np.allclose(table.loc[table["split"] == "test", "measured"], reversed_in_test, atol=0.2)


def test_ensure_reuses_identical_and_refuses_foreign(tmp_path, make_tiny_dataset):
    config = SyntheticConfig(n_images=20, image_size=32, seed=0)
    root = ensure_synthetic("synthetic-derm", tmp_path / "d", config, progress=False)
    stamp = (root / "labels.csv").stat().st_mtime_ns
    ensure_synthetic("synthetic-derm", root, config, progress=False)
    assert (root / "labels.csv").stat().st_mtime_ns == stamp
    ensure_synthetic("synthetic-derm", root, SyntheticConfig(n_images=20, image_size=32, seed=5), progress=False)
    assert (root / "labels.csv").stat().st_mtime_ns != stamp
    foreign = make_tiny_dataset(name="foreign")
    import json
    info = json.loads((foreign / "dataset.json").read_text())
    info["generator"] = {}
    (foreign / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(FileExistsError):
        ensure_synthetic("synthetic-derm", foreign, config, progress=False)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="shortcut_correlation"):
        SyntheticConfig(shortcut_correlation=1.5)
    with pytest.raises(ValueError, match="n_images"):
        SyntheticConfig(n_images=3)
    with pytest.raises(ValueError, match="artefact_style"):
        SyntheticConfig(artefact_style="sticker")
    with pytest.raises(ValueError, match="artefact_distance"):
        SyntheticConfig(artefact_distance=(0.3, 0.1))


@pytest.mark.parametrize("name, artefact", [("synthetic-derm", "patch"), ("synthetic-cxr", "chest_tube")])
def test_artefact_maps_and_counterfactual_twins(tmp_path, name, artefact):
    """Twins differ from their image only where the flipped artefact is (up to 2 px of smoothing), the
    artefact maps lie outside the clinical region, and both are deterministic given the seed."""
    from PIL import Image
    from scipy import ndimage

    from segx_helpers.data.format import load_dataset
    from segx_helpers.data.synthetic import (CXR_ARTEFACTS, DERM_ARTEFACTS, GENERATORS, _draw_cxr, _draw_derm,
                                             artefact_masks, load_artefacts, twin_path)

    config = SyntheticConfig(n_images=60, image_size=64, seed=3)
    root = GENERATORS[name](tmp_path / "a", config, progress=False)
    again = GENERATORS[name](tmp_path / "b", config, progress=False)
    data = load_dataset(root)
    test = data.split("test")["image_id"].tolist()
    flags = load_artefacts(root).set_index("image_id")
    assert flags.loc[test, artefact].any() and not flags.loc[test, artefact].all()
    for image_id in test:
        original = np.asarray(Image.open(root / "images" / f"{image_id}.png")).astype(int)
        twin = np.asarray(Image.open(twin_path(root, image_id, artefact))).astype(int)
        assert (twin == np.asarray(Image.open(twin_path(again, image_id, artefact)))).all()
        diff = np.abs(original - twin).reshape(64, 64, -1).max(axis=-1)
        where = artefact_masks(root, [image_id], [artefact])[0]
        if not flags.loc[image_id, artefact]:   # the twin gained the artefact: take its map from the generator
            i = int(image_id.split("_")[1])
            rng = np.random.default_rng([3, i])
            if name == "synthetic-derm":
                label = data.table.set_index("image_id").loc[image_id, "label"]
                look = "nevus" if flags.loc[image_id, "subtle"] else None
                bits = _draw_derm(rng, 64, label, True, appearance=look)[3]
                where = (bits & (1 << DERM_ARTEFACTS.index(artefact))) > 0
            else:
                row = data.table.set_index("image_id").loc[image_id]
                findings = {f: bool(row[f]) for f in ("nodule", "opacity", "effusion")}
                tokens = {t: bool(flags.loc[image_id, t]) for t in ("ecg_lead", "text_marker", "chest_tube")}
                bits = _draw_cxr(rng, 64, findings, {**tokens, artefact: True})[3]
                where = (bits & (1 << CXR_ARTEFACTS.index(artefact))) > 0
        # outside the artefact (grown by the 2 px the final smoothing spreads it) at most uint8 rounding noise;
        # inside it the artefact itself
        assert where.any() and diff[~ndimage.binary_dilation(where, iterations=2)].max() <= 1, image_id
        assert diff[where].max() > 20, image_id
        lesion = np.asarray(Image.open(root / "masks" / f"{image_id}.png")) > 0
        assert not (artefact_masks(root, [image_id])[0] & lesion).any()
    with pytest.raises(FileNotFoundError, match="twin"):
        twin_path(root, data.split("train")["image_id"].iloc[0], artefact)
