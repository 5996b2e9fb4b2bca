"""Real-data converters, run on tiny fixture folders that mimic each raw download layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from segx_helpers.data import DatasetFormatError, load_dataset, read_image, read_mask
from segx_helpers.data.converters import (CHESTX_DET10_CLASSES, HAM_CLASSES, MissingMaskWarning, convert_chestx_det10,
                                    convert_ham10000, convert_isic2018_trap, convert_montgomery, convert_segx_kaggle,
                                    convert_shenzhen, find_layout)
from segx_helpers.cli.convert import main
from segx_helpers.studies.artefacts import (artefact_label_correlation, lesion_size_auroc, score_by_artefact, shortcut_breakdown,
                                   size_strata)

SIZE = 32


def save_rgb(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)


def save_gray(path, seed, value=None):
    """An 8-bit grayscale PNG, or a 16-bit one filled with ``value`` when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(path)
    else:
        Image.fromarray(np.full((SIZE, SIZE), value, dtype=np.uint16)).save(path)


def save_mask(path, rows=slice(8, 24), cols=slice(8, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[rows, cols] = 255
    Image.fromarray(mask).save(path)


# ------------------------------------------------------------------------------------------ HAM10000

def make_ham(raw, image_dirs=("HAM10000_images_part_1", "HAM10000_images_part_2"),
             mask_dir="HAM10000_segmentations_lesion_tschandl", mask_name="{}_segmentation.png", lesions=True):
    """7 classes x 10 lesions; the first lesion of every class has two images; the last image has no mask."""
    rows = []
    for c, dx in enumerate(HAM_CLASSES):
        for lesion in range(10):
            for shot in range(2 if lesion == 0 else 1):
                rows.append({"lesion_id": f"HAM_{c}{lesion:02d}", "image_id": f"ISIC_{len(rows):07d}", "dx": dx,
                             "dx_type": "histo", "age": 50, "sex": "male", "localization": "back"})
    meta = pd.DataFrame(rows)
    for n, image_id in enumerate(meta["image_id"]):
        save_rgb(raw / image_dirs[n % len(image_dirs)] / f"{image_id}.jpg", n)
        if n < len(meta) - 1:
            save_mask(raw / mask_dir / mask_name.format(image_id))
    raw.mkdir(parents=True, exist_ok=True)
    (meta if lesions else meta.drop(columns="lesion_id")).to_csv(raw / "HAM10000_metadata.csv", index=False)
    return meta


def test_ham10000_labels_masks_and_splits(tmp_path):
    meta = make_ham(tmp_path / "raw")
    with pytest.warns(MissingMaskWarning, match=r"1 of 77 images have no mask"):
        out = convert_ham10000(tmp_path / "raw", tmp_path / "ham")
    ds = load_dataset(out)
    table = ds.table.set_index("image_id")
    assert len(table) == 77
    assert ds.info.class_names == list(HAM_CLASSES)
    assert ds.info.task == "multiclass" and ds.info.channels == 3
    assert ds.info.generator == {} and "DBW86T" in ds.info.source and "CC BY-NC" in ds.info.licence
    mel = meta.loc[meta["dx"] == "mel", "image_id"].iloc[0]
    assert table.loc[mel, "label"] == "mel" and table.loc[mel, "target"] == HAM_CLASSES.index("mel")
    last = meta["image_id"].iloc[-1]
    assert table.loc[last, "mask_path"] is None
    assert table["mask_path"].notna().sum() == 76
    image = read_image(table.loc[mel, "image_path"])
    mask = read_mask(table.loc[mel, "mask_path"])
    assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
    assert mask[16, 16] and not mask[0, 0]
    assert set(table["split"]) == {"train", "val", "test"}


def test_ham10000_keeps_each_lesion_in_one_split(tmp_path):
    meta = make_ham(tmp_path / "raw")
    with pytest.warns(MissingMaskWarning):
        out = convert_ham10000(tmp_path / "raw", tmp_path / "ham", seed=3)
    table = load_dataset(out).table.merge(meta[["image_id", "lesion_id"]], on="image_id")
    assert (table.groupby("lesion_id")["split"].nunique() == 1).all()
    assert (table.groupby("lesion_id").size() == 2).sum() == 7
    per_class = table.drop_duplicates("lesion_id").groupby(["label", "split"]).size().unstack()
    assert (per_class[["train", "val", "test"]] == [7, 1, 2]).all().all()


def test_ham10000_splits_depend_only_on_seed(tmp_path):
    make_ham(tmp_path / "raw")
    with pytest.warns(MissingMaskWarning):
        first = load_dataset(convert_ham10000(tmp_path / "raw", tmp_path / "a", seed=1)).table
        again = load_dataset(convert_ham10000(tmp_path / "raw", tmp_path / "b", seed=1)).table
        other = load_dataset(convert_ham10000(tmp_path / "raw", tmp_path / "c", seed=2)).table
    assert first["split"].tolist() == again["split"].tolist()
    assert first["split"].tolist() != other["split"].tolist()


def test_ham10000_alternative_layout_and_resize(tmp_path):
    make_ham(tmp_path / "raw", image_dirs=("images",), mask_dir="ISIC2018_Task1_Training_GroundTruth", lesions=False)
    with pytest.warns(MissingMaskWarning):
        out = convert_ham10000(tmp_path / "raw", tmp_path / "ham", image_size=16)
    row = load_dataset(out).table.iloc[0]
    assert read_image(row["image_path"]).shape == (16, 16, 3)
    mask = read_mask(row["mask_path"])
    assert mask.shape == (16, 16) and mask[8, 8] and not mask[0, 0]


def test_ham10000_missing_metadata_is_named(tmp_path):
    make_ham(tmp_path / "raw")
    (tmp_path / "raw" / "HAM10000_metadata.csv").unlink()
    with pytest.raises(DatasetFormatError, match="HAM10000_metadata.csv not found"):
        convert_ham10000(tmp_path / "raw", tmp_path / "ham")
    assert not (tmp_path / "ham").exists()


def test_ham10000_missing_image_or_folder_is_an_error(tmp_path):
    meta = make_ham(tmp_path / "raw")
    (tmp_path / "raw" / "HAM10000_images_part_1" / f"{meta['image_id'][0]}.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"1 of 77 images .* missing"):
        convert_ham10000(tmp_path / "raw", tmp_path / "ham")
    for folder in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        shutil.rmtree(tmp_path / "raw" / folder)
    with pytest.raises(DatasetFormatError, match="No image folder"):
        convert_ham10000(tmp_path / "raw", tmp_path / "ham")


def test_ham10000_unknown_diagnosis_is_an_error(tmp_path):
    meta = make_ham(tmp_path / "raw")
    meta.loc[0, "dx"] = "xyz"
    meta.to_csv(tmp_path / "raw" / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DatasetFormatError, match="unknown dx values"):
        convert_ham10000(tmp_path / "raw", tmp_path / "ham")


def test_converted_real_data_is_never_overwritten(tmp_path):
    make_ham(tmp_path / "raw")
    with pytest.warns(MissingMaskWarning):
        out = convert_ham10000(tmp_path / "raw", tmp_path / "ham")
    before = (out / "labels.csv").read_bytes()
    with pytest.warns(MissingMaskWarning), pytest.raises(FileExistsError, match="never replaced, with or without overwrite"):
        convert_ham10000(tmp_path / "raw", out)  # not a hint to pass overwrite=True, which would be refused too
    with pytest.warns(MissingMaskWarning), pytest.raises(FileExistsError, match="not written by segx_helpers"):
        convert_ham10000(tmp_path / "raw", out, overwrite=True)
    assert (out / "labels.csv").read_bytes() == before


# --------------------------------------------------------------------------------- Shenzhen, Montgomery

def make_tb(raw, prefix, masks="masks"):
    """10 normal + 10 TB images (the first one 16-bit); masks for all but the last image."""
    names = [f"{prefix}_{i:04d}_{i % 2}" for i in range(20)]
    for i, name in enumerate(names):
        save_gray(raw / "CXR_png" / f"{name}.png", i, value=2048 if i == 0 else None)
        if i == len(names) - 1:
            continue
        if masks == "masks":
            save_mask(raw / "masks" / (f"{name}_mask.png" if i % 3 else f"{name}.png"))
        else:
            save_mask(raw / "ManualMask" / "leftMask" / f"{name}.png", cols=slice(2, 12))
            save_mask(raw / "ManualMask" / "rightMask" / f"{name}.png", cols=slice(20, 30))
    return names


def test_shenzhen_labels_masks_and_16_bit(tmp_path):
    names = make_tb(tmp_path / "raw", "CHNCXR")
    with pytest.warns(MissingMaskWarning, match="1 of 20"):
        out = convert_shenzhen(tmp_path / "raw", tmp_path / "shenzhen")
    ds = load_dataset(out)
    table = ds.table.set_index("image_id")
    assert len(table) == 20
    assert ds.info.task == "multilabel" and ds.info.class_names == ["tb"] and ds.info.channels == 1
    assert table.loc["CHNCXR_0003_1", "tb"] == 1 and table.loc["CHNCXR_0004_0", "tb"] == 0
    assert ds.targets.sum() == 10
    sixteen = read_image(table.loc[names[0], "image_path"], channels=1)
    assert sixteen.shape == (SIZE, SIZE, 1) and (sixteen == 128).all()
    assert table.loc[names[-1], "mask_path"] is None and table["mask_path"].notna().sum() == 19
    assert read_mask(table.loc[names[3], "mask_path"]).sum() == 16 * 16
    assert set(table["split"]) == {"train", "val", "test"}
    assert (table.groupby("split")["tb"].sum()[["train", "val", "test"]] == [7, 1, 2]).all()


def test_shenzhen_layout_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match="CXR_png not found"):
        convert_shenzhen(tmp_path, tmp_path / "out")
    save_gray(tmp_path / "raw" / "CXR_png" / "CHNCXR_0001.png", 0)
    with pytest.raises(DatasetFormatError, match="must end in _0"):
        convert_shenzhen(tmp_path / "raw", tmp_path / "out")
    (tmp_path / "raw" / "CXR_png" / "CHNCXR_0001.png").rename(tmp_path / "raw" / "CXR_png" / "bad name_0.png")
    with pytest.raises(DatasetFormatError, match="Unsafe image id"):
        convert_shenzhen(tmp_path / "raw", tmp_path / "out")


def test_montgomery_mask_is_union_of_both_lungs(tmp_path):
    names = make_tb(tmp_path / "raw", "MCUCXR", masks="ManualMask")
    (tmp_path / "raw" / "ManualMask" / "rightMask" / f"{names[5]}.png").unlink()
    with pytest.warns(MissingMaskWarning, match="2 of 20"):
        out = convert_montgomery(tmp_path / "raw", tmp_path / "montgomery", image_size=16)
    ds = load_dataset(out)
    table = ds.table.set_index("image_id")
    assert ds.info.name == "montgomery-cxr" and ds.info.channels == 1
    mask = read_mask(table.loc[names[2], "mask_path"])
    assert mask.shape == (16, 16)
    assert mask[8, 3] and mask[8, 12] and not mask[8, 8]
    assert table.loc[names[5], "mask_path"] is None
    assert table.loc[names[1], "tb"] == 1


def test_montgomery_requires_its_mask_folders(tmp_path):
    make_tb(tmp_path / "raw", "MCUCXR", masks="ManualMask")
    shutil.rmtree(tmp_path / "raw" / "ManualMask" / "rightMask")
    with pytest.raises(DatasetFormatError, match="rightMask not found"):
        convert_montgomery(tmp_path / "raw", tmp_path / "out")


# ------------------------------------------------------------------------------------------ ChestX-Det10

def make_chestx(raw):
    """20 images: 10 without findings, one per finding, and multi-finding ones; train/ and test/ folders."""
    records = [{"file_name": f"{36000 + i}.png", "syms": [], "boxes": []} for i in range(10)]
    records += [{"file_name": f"{36100 + i}.png", "syms": [name], "boxes": [[1, 1, 5, 5]]}
                for i, name in enumerate(CHESTX_DET10_CLASSES)]
    records[-1]["syms"] = ["Pneumothorax", "Effusion", "Effusion"]
    records[-1]["boxes"] *= 3
    train, test = records[:14], records[14:]
    raw.mkdir(parents=True)
    (raw / "train.json").write_text(json.dumps(train))
    (raw / "test.json").write_text(json.dumps(test))
    for n, (folder, record) in enumerate([("train", r) for r in train] + [("test", r) for r in test]):
        save_gray(raw / folder / record["file_name"], n, value=40000 if n == 0 else None)
        if n % 2 == 0:
            save_mask(raw / "masks" / record["file_name"])
    return records


def test_chestx_det10_multilabel_targets(tmp_path):
    make_chestx(tmp_path / "raw")
    with pytest.warns(MissingMaskWarning, match="10 of 20"):
        out = convert_chestx_det10(tmp_path / "raw", tmp_path / "chestx")
    with pytest.warns(UserWarning, match="no images of class"):
        ds = load_dataset(out)
    table = ds.table.set_index("image_id")
    assert len(table) == 20
    assert ds.info.class_names == list(CHESTX_DET10_CLASSES) and ds.info.channels == 1
    assert table.loc["36109", list(CHESTX_DET10_CLASSES)].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    assert table.loc["36102", "Consolidation"] == 1 and table.loc["36102"][list(CHESTX_DET10_CLASSES)].sum() == 1
    assert table.loc["36000", list(CHESTX_DET10_CLASSES)].sum() == 0
    assert (read_image(table.loc["36000", "image_path"], channels=1) == 156).all()
    assert table.loc["36000", "mask_path"] is not None and table.loc["36001", "mask_path"] is None
    assert set(table["split"]) == {"train", "val", "test"}


def test_chestx_det10_errors_name_the_missing_files(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DatasetFormatError, match="train.json"):
        convert_chestx_det10(tmp_path / "raw", tmp_path / "out")
    records = make_chestx(tmp_path / "chestx")
    (tmp_path / "chestx" / "test" / records[-1]["file_name"]).unlink()
    with pytest.raises(DatasetFormatError, match=r"1 of 20 images .*36109"):
        convert_chestx_det10(tmp_path / "chestx", tmp_path / "out")
    (tmp_path / "chestx" / "test.json").write_text(json.dumps([{"file_name": "1.png", "syms": ["Cardiomegaly"]}]))
    with pytest.raises(DatasetFormatError, match="unknown findings"):
        convert_chestx_det10(tmp_path / "chestx", tmp_path / "out")


# ------------------------------------------------------------------------------- Kaggle bundle, CLI

def test_segx_kaggle_finds_the_layout_below_the_download(tmp_path):
    bundle = tmp_path / "raw" / "segx-used-datasets" / "ham"
    make_ham(bundle, image_dirs=("images",), mask_dir="masks", mask_name="{}.png")
    with pytest.warns(MissingMaskWarning):
        out = convert_segx_kaggle(tmp_path / "raw", tmp_path / "ham", which="ham")
    ds = load_dataset(out)
    assert ds.info.name == "ham10000" and len(ds.table) == 77 and ds.table["mask_path"].notna().sum() == 76
    with pytest.raises(DatasetFormatError, match=r"looked for: CXR_png/ and ManualMask/ .*train.json or test.json"):
        convert_segx_kaggle(tmp_path / "raw", tmp_path / "chestx", which="chestx")


def test_find_layout_searches_two_levels_down(tmp_path):
    make_tb(tmp_path / "raw" / "a" / "b", "CHNCXR")
    assert find_layout(tmp_path / "raw", ["montgomery", "shenzhen"]) == ("shenzhen", tmp_path / "raw" / "a" / "b")
    with pytest.raises(DatasetFormatError, match="No known raw dataset layout"):
        find_layout(tmp_path, ["shenzhen"])


def test_cli_converts_then_refuses_to_overwrite(tmp_path, capsys):
    make_tb(tmp_path / "raw" / "ChinaSet_AllFiles", "CHNCXR")
    assert main(["shenzhen", str(tmp_path / "raw"), str(tmp_path / "out"), "--image-size", "16"]) == 0
    assert "converted 20 images" in capsys.readouterr().out
    assert read_image(load_dataset(tmp_path / "out").table["image_path"][0], channels=1).shape == (16, 16, 1)
    assert main(["shenzhen", str(tmp_path / "raw"), str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------ ISIC 2018 trap sets

ISIC_FLAGS = ["dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches"]


def make_isic_trap(raw, layout="official", n=12, size=32, trap_sets=(1,)):
    """A miniature ISIC 2018 Task 1 download plus the Bissoto et al. tables, as each raw layout holds it.

    ``layout``: "official" (the two ISIC archives, images 4:3 and not square) or "komour" (the
    komour/diploma copy: square images filed under data/{train,val,test}, which are not the trap split,
    masks in images/256ISIC2018_Task1_Training_GroundTruth/ whatever ``size``).
    Image i is malignant when i % 3 == 1 (every split has both classes). Trap set k lists the first 60 % as train, the next 15 % in
    both train and val (as every val1 image is in train1), the rest as test, and the first image once
    more in test; the ruler equals the label in train/val and is its opposite in test; the ink flag
    marks every other image. Lesions are dark squares whose side grows with i. Returns the bias table
    (image_id, flags, label) and the expected split.
    """
    height, width = (size, size) if layout == "komour" else (size * 3 // 4, size)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    n_train, n_val = int(0.6 * n), max(2, int(0.15 * n))
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)
    split[0] = "test"  # also listed in train: test wins
    label = [int(i % 3 == 1) for i in range(n)]
    rows = []
    for i, image_id in enumerate(ids):
        flags = {f: 0 for f in ISIC_FLAGS}
        flags["ruler"] = label[i] if split[i] != "test" else 1 - label[i]
        flags["ink"] = int(i % 2 == 0)
        flags["dark_corner"] = int(i % 5 == 0)
        rows.append({"image": f"{image_id}.png", **flags, "label": label[i],
                     "label_string": "malignant" if label[i] else "benign"})
    bias = pd.DataFrame(rows)
    (raw / "artefacts-annotation").mkdir(parents=True, exist_ok=True)
    bias.to_csv(raw / "artefacts-annotation" / "isic_bias.csv", sep=";")  # the published file keeps its index column
    (raw / "trap-sets").mkdir(exist_ok=True)
    lists = {"train": list(range(n_train + n_val)), "val": list(range(n_train, n_train + n_val)),
             "test": [0] + list(range(n_train + n_val, n))}
    for k in trap_sets:
        for name, members in lists.items():
            table = bias.iloc[members].copy()
            table.insert(8, "vasc", 0)
            table.to_csv(raw / "trap-sets" / f"isic_annotated_{name}{k}.csv")
    rng = np.random.default_rng(0)
    komour_folders = ["train", "val", "test"]
    for i, image_id in enumerate(ids):
        image = np.clip(rng.normal(180, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        side = max(2, int(height * (0.2 + 0.6 * i / n)))
        top, left = (height - side) // 2, (width - side) // 2
        mask[top:top + side, left:left + side] = 255
        image[mask > 0] = (90, 60, 40)
        if layout == "official":
            image_path = raw / "ISIC2018_Task1-2_Training_Input" / f"{image_id}.jpg"
            mask_path = raw / "ISIC2018_Task1_Training_GroundTruth" / f"{image_id}_segmentation.png"
        else:
            image_path = raw / "data" / komour_folders[i % 3] / f"{image_id}.jpg"
            mask_path = raw / "images" / "256ISIC2018_Task1_Training_GroundTruth" / f"{image_id}_segmentation.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_path, quality=95)
        Image.fromarray(mask).save(mask_path)
    bias = bias.assign(image_id=[Path(name).stem for name in bias["image"]]).drop(columns=["image", "label_string"])
    return bias, pd.Series(split, index=ids, name="split")


@pytest.mark.parametrize("layout", ["official", "komour"])
def test_isic2018_trap_labels_masks_split_and_artefacts(tmp_path, layout, capsys):
    bias, split = make_isic_trap(tmp_path / "raw", layout, n=12)
    out = convert_isic2018_trap(tmp_path / "raw", tmp_path / "isic", image_size=16)
    report = capsys.readouterr().out
    ds = load_dataset(out)
    table = ds.table.set_index("image_id")
    assert ds.info.name == "isic2018-trap" and ds.info.class_names == ["benign", "malignant"]
    assert ds.info.generator == {} and "CC BY-NC" in ds.info.licence and "Bissoto" in ds.info.licence
    assert "trap set 1" in ds.info.source
    # precedence test > val > train: image 0 is in train and test lists, images 7-8 in train and val
    assert table["split"].to_dict() == split.to_dict()
    assert table["split"].value_counts().to_dict() == {"train": 6, "val": 2, "test": 4}
    assert "12 images (15 rows in its lists) -> 6 train / 2 val / 4 test" in report
    assert "2 train images also listed in val, kept in val" in report and "1 train images also listed in test" in report
    assert (table["label"] == np.where(bias.set_index("image_id")["label"] == 1, "malignant", "benign")).all()
    assert table["mask_path"].notna().all()
    image, mask = read_image(table.loc["ISIC_0000011", "image_path"]), read_mask(table.loc["ISIC_0000011", "mask_path"])
    assert image.shape == (16, 16, 3) and mask.shape == (16, 16) and mask[8, 8] and not mask[0, 0]
    assert image[8, 8].mean() < 120 < image[0, 0].mean()  # the dark lesion is where its mask is
    artefacts = pd.read_csv(out / "artefacts.csv", dtype={"image_id": str})
    assert list(artefacts.columns) == ["image_id", *ISIC_FLAGS]
    expected = bias.set_index("image_id")[ISIC_FLAGS].sort_index()
    assert (artefacts.set_index("image_id").sort_index() == expected).all().all()


@pytest.mark.parametrize("layout", ["official", "komour"])
def test_isic2018_random_split_is_stratified_seeded_and_keeps_the_artefacts(tmp_path, layout, capsys):
    """``--split random``: every annotated image, 7:1:2 within each label, the same split for the same seed,
    written as isic2018-random with its artefacts.csv; the trap files are not needed."""
    bias, _ = make_isic_trap(tmp_path / "raw", layout, n=30)
    shutil.rmtree(tmp_path / "raw" / "trap-sets")
    assert main(["isic2018-trap", str(tmp_path / "raw"), str(tmp_path / "random"), "--split", "random",
                 "--image-size", "16"]) == 0
    assert "stratified random split (seed 0) of the 30 annotated images -> 21 train / 3 val / 6 test" in \
        capsys.readouterr().out
    data = load_dataset(tmp_path / "random")
    table = data.table.set_index("image_id")
    assert data.info.name == "isic2018-random" and "stratified random 7:1:2 by label, seed 0" in data.info.source
    assert sorted(table.index) == sorted(bias["image_id"])
    assert (table["label"] == np.where(bias.set_index("image_id")["label"] == 1, "malignant", "benign")).all()
    counts = pd.crosstab(table["split"], table["label"]).to_dict()
    assert counts == {"benign": {"train": 14, "val": 2, "test": 4}, "malignant": {"train": 7, "val": 1, "test": 2}}
    artefacts = pd.read_csv(tmp_path / "random" / "artefacts.csv", dtype={"image_id": str}).set_index("image_id")
    assert (artefacts.sort_index() == bias.set_index("image_id")[ISIC_FLAGS].sort_index()).all().all()
    assert set(artefact_label_correlation(data)["split"]) == {"train", "val", "test"}

    again = convert_isic2018_trap(tmp_path / "raw", tmp_path / "again", split="random", verbose=False)
    other = convert_isic2018_trap(tmp_path / "raw", tmp_path / "other", split="random", seed=1, verbose=False)
    assert load_dataset(again).table.set_index("image_id")["split"].equals(table["split"])
    assert not load_dataset(other).table.set_index("image_id")["split"].equals(table["split"])
    with pytest.raises(ValueError, match=r"split must be one of \('trap', 'random'\), got 'Random'"):
        convert_isic2018_trap(tmp_path / "raw", tmp_path / "bad", split="Random")
    assert not (tmp_path / "bad").exists()


def test_isic2018_trap_correlations_flip_between_splits(tmp_path):
    make_isic_trap(tmp_path / "raw", "official", n=24)
    data = load_dataset(convert_isic2018_trap(tmp_path / "raw", tmp_path / "isic", verbose=False))
    corr = artefact_label_correlation(data).set_index(["split", "artefact"])["phi"]
    assert corr["train", "ruler"] == pytest.approx(1.0) and corr["test", "ruler"] < -0.5
    assert corr["train", "hair"] == 0.0  # a constant flag has no correlation
    sizes = lesion_size_auroc(data).set_index("split")
    assert sizes["images"].to_dict() == {"train": 13, "val": 3, "test": 8}
    assert 0 <= sizes.loc["test", "AUROC of lesion area"] <= 1


def test_isic2018_trap_chooses_the_trap_set_and_names_missing_pieces(tmp_path, capsys):
    make_isic_trap(tmp_path / "raw", "official", trap_sets=(1, 3))
    raw = tmp_path / "raw"
    assert main(["isic2018-trap", str(tmp_path), str(tmp_path / "out"), "--trap-set", "3"]) == 0
    assert "trap set 3" in load_dataset(tmp_path / "out").info.source
    assert "converted 12 images" in capsys.readouterr().out
    with pytest.raises(DatasetFormatError, match=r"isic_annotated_test2.csv not found"):
        convert_isic2018_trap(raw, tmp_path / "a", trap_set=2)
    with pytest.raises(ValueError, match="trap_set must be one of"):
        convert_isic2018_trap(raw, tmp_path / "a", trap_set=6)
    (raw / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000003.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"1 of 12 images .* missing .*ISIC2018_Task1-2_Training_Input"):
        convert_isic2018_trap(raw, tmp_path / "a")
    shutil.rmtree(raw / "ISIC2018_Task1_Training_GroundTruth")
    with pytest.raises(DatasetFormatError, match=r"lesion mask folder .*ISIC2018_Task1_Training_GroundTruth is missing"):
        convert_isic2018_trap(raw, tmp_path / "a")
    shutil.rmtree(raw / "ISIC2018_Task1-2_Training_Input")
    with pytest.raises(DatasetFormatError, match=r"No ISIC 2018 image folder"):
        convert_isic2018_trap(raw, tmp_path / "a")
    (raw / "artefacts-annotation" / "isic_bias.csv").unlink()
    with pytest.raises(DatasetFormatError, match=r"isic_bias.csv not found"):
        convert_isic2018_trap(raw, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_isic2018_trap_refuses_tables_that_disagree(tmp_path):
    make_isic_trap(tmp_path / "raw", "official")
    path = tmp_path / "raw" / "trap-sets" / "isic_annotated_test1.csv"
    table = pd.read_csv(path, index_col=0)
    table.loc[table.index[1], "label"] = 1 - table.loc[table.index[1], "label"]
    table.to_csv(path)
    with pytest.raises(DatasetFormatError, match=r"isic_annotated_test1.csv: labels or artefact flags differ"):
        convert_isic2018_trap(tmp_path / "raw", tmp_path / "a")
    (tmp_path / "raw" / "artefacts-annotation" / "isic_bias.csv").write_text("image,label\nISIC_0000000.png,0\n")
    with pytest.raises(DatasetFormatError, match=r"isic_bias.csv lacks the columns .*separated by ';'"):
        convert_isic2018_trap(tmp_path / "raw", tmp_path / "a")


def test_score_by_artefact_adjusts_for_lesion_size():
    """The artefact sits mostly on small lesions, whose scores are low: the raw difference is negative, but
    within each size stratum there is none, and the size-adjusted row says so."""
    ids = [f"i{k}" for k in range(12)]
    areas = pd.Series([0.05] * 6 + [0.5] * 6, index=ids)
    scores = pd.DataFrame({"image_id": ids, "c_IoU": [0.1] * 6 + [0.6] * 6})
    artefacts = pd.DataFrame({"image_id": ids, "ruler": [1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0]})
    strata = size_strata(areas, n_strata=2)
    assert strata.str.startswith("size 1").sum() == 6 and strata["i0"] == "size 1 (5%-5%)"
    table = score_by_artefact(scores, artefacts, ["ruler"], strata=strata).set_index("stratum")
    assert table.loc["size 1 (5%-5%)", ["with", "without", "difference"]].tolist() == [5, 1, 0.0]
    assert table.loc["size 2 (50%-50%)", "AUROC (absent vs present)"] == 0.5
    pooled = table.loc["all strata (size-adjusted)"]
    assert pooled["mean with"] - pooled["mean without"] < -0.3 and pooled["difference"] == 0.0
    raw = score_by_artefact(scores, artefacts, ["ruler"])
    assert raw["stratum"].tolist() == ["all images"] and raw["difference"].iloc[0] < -0.3


def test_shortcut_breakdown_takes_a_list_of_artefacts():
    result = {"image_id": ["a", "b", "c", "d"], "targets": np.array([1, 1, 0, 0]), "pred": np.array([1, 0, 0, 0]),
              "probs": np.array([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1], [0.7, 0.3]])}
    artefacts = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "ruler": [1, 0, 0, 1]})
    table = shortcut_breakdown(result, artefacts, ["ruler"], ["benign", "malignant"]).set_index("artefact vs label")
    assert table["class"].tolist() == ["malignant", "malignant"]
    assert table.loc["agrees", ["images", "accuracy", "auroc"]].tolist() == [2, 1.0, 1.0]  # a (ruler, malignant), c
    assert table.loc["disagrees", "accuracy"] == 0.5 and table.loc["disagrees", "auroc"] == 1.0  # b, d
    with pytest.raises(ValueError, match="name the class"):
        shortcut_breakdown(result, artefacts, ["ruler"], ["a", "b", "c"])
