"""The dataset format: loading, and every validation error naming its file."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from segx_helpers.data import DatasetFormatError, NonBinaryMaskWarning, load_dataset, make_splits, read_image, read_mask


def test_load_returns_rows_targets_and_paths(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(n=30))
    assert len(data.table) == 30
    assert set(data.table["split"]) == {"train", "val", "test"}
    assert data.targets.shape == (30,)
    assert data.targets[:3].tolist() == [0, 1, 2]
    assert data.table["mask_path"].notna().all()


def test_multilabel_targets_are_a_matrix(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(task="multilabel", n=24))
    assert data.targets.shape == (24, 2)
    assert data.targets[3].tolist() == [1.0, 1.0]


def test_splits_are_deterministic_and_stratified():
    ids = [f"i{k}" for k in range(100)]
    strat = [k % 2 for k in range(100)]
    a, b = make_splits(ids, 3, stratify=strat), make_splits(ids, 3, stratify=strat)
    assert a.equals(b)
    assert not a.equals(make_splits(ids, 4, stratify=strat))
    counts = a.assign(s=strat).groupby(["split", "s"]).size()
    assert counts["train", 0] == counts["train", 1] == 35
    assert counts["test", 0] == counts["test", 1] == 10


@pytest.mark.parametrize("breaker, message", [
    (lambda r: (r / "images" / "img_003.png").unlink(), "Missing image for id 'img_003'"),
    (lambda r: (r / "images" / "img_004.png").write_bytes(b""), "img_004.png"),
    (lambda r: (r / "images" / "img_005.png").write_bytes((r / "images" / "img_005.png").read_bytes()[:200]), "img_005.png"),
    (lambda r: Image.fromarray(np.zeros((16, 16), np.uint8)).save(r / "masks" / "img_006.png"), "img_006.png"),
    (lambda r: (r / "labels.csv").write_text((r / "labels.csv").read_text() + "ghost,a\n"), "ghost"),
    (lambda r: (r / "labels.csv").write_text((r / "labels.csv").read_text().replace(",b\n", ",zebra\n", 1)), "zebra"),
    (lambda r: (r / "splits.csv").write_text((r / "splits.csv").read_text().replace("val", "train")), "'val' split is empty"),
    (lambda r: (r / "labels.csv").write_text("id,label\n"), "labels.csv lacks the columns"),
    (lambda r: (r / "labels.csv").write_text((r / "labels.csv").read_text().replace("img_001,b", "img_001,")), "NaN"),
    (lambda r: (r / "dataset.json").unlink(), "dataset.json"),
    (lambda r: (r / "labels.csv").write_text((r / "labels.csv").read_text() + "img_000,a\n"), "duplicate image ids"),
    (lambda r: (r / "labels.csv").write_text((r / "labels.csv").read_text().replace("img_002", "../evil")), "Unsafe image id"),
])
def test_each_validation_error_names_the_file(make_tiny_dataset, breaker, message):
    root = make_tiny_dataset()
    breaker(root)
    with pytest.raises(DatasetFormatError, match=message.replace("(", r"\(").replace(".", r"\.").replace("'", "'")) as err:
        load_dataset(root)
    assert str(root) in str(err.value) or "id" in str(err.value)


def test_non_binary_mask_is_thresholded_with_a_warning(tmp_path):
    values = np.zeros((8, 8), np.uint8)
    values[:, 4:] = 200
    values[0, 0] = 90
    Image.fromarray(values).save(tmp_path / "m.png")
    with pytest.warns(NonBinaryMaskWarning, match="m.png"):
        mask = read_mask(tmp_path / "m.png")
    assert mask[:, 4:].all() and not mask[:, :4].any()


def test_binary_masks_read_without_warning(tmp_path):
    Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).save(tmp_path / "b.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_mask(tmp_path / "a.png").tolist() == read_mask(tmp_path / "b.png").tolist() == [[False, True], [True, False]]


def test_mask_of_wrong_size_is_refused(tmp_path):
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(DatasetFormatError, match="m.png has size 9x8"):
        read_mask(tmp_path / "m.png", expected_size=(8, 8))


@pytest.mark.parametrize("mode, shape, maximum", [("RGBA", (6, 5, 4), 255), ("L", (6, 5), 255), ("I;16", (6, 5), 4095),
                                                    ("I;16", (6, 5), 65535)])
def test_image_modes_become_uint8_rgb(tmp_path, mode, shape, maximum):
    values = np.linspace(0, maximum, np.prod(shape)).reshape(shape)
    if mode == "I;16":
        img = Image.fromarray(values.astype(np.uint16))
    else:
        img = Image.fromarray(values.astype(np.uint8), mode=mode if mode != "L" else None)
    img.save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png", channels=3)
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    if mode == "RGBA":
        assert (out == values[..., :3].astype(np.uint8)).all()
    else:
        assert out.max() == 255 and out.min() == 0
        assert (out[..., 0] == out[..., 2]).all()
    gray = read_image(tmp_path / "x.png", channels=1)
    assert gray.shape == (6, 5, 1)


def test_missing_split_class_warns(make_tiny_dataset):
    root = make_tiny_dataset(n=30)
    labels = pd.read_csv(root / "labels.csv")
    splits = pd.read_csv(root / "splits.csv").set_index("image_id")
    test_ids = splits.index[splits["split"] == "test"]
    labels.loc[labels["image_id"].isin(test_ids), "label"] = "a"
    labels.to_csv(root / "labels.csv", index=False)
    with pytest.warns(UserWarning, match="'test' split has no images of class"):
        load_dataset(root)


def test_dataset_json_task_is_checked(make_tiny_dataset):
    root = make_tiny_dataset()
    info = json.loads((root / "dataset.json").read_text())
    info["task"] = "regression"
    (root / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match="task must be one of"):
        load_dataset(root)


def test_writer_refuses_to_replace_user_data(make_tiny_dataset, tmp_path):
    from segx_helpers.data.format import DatasetInfo, write_dataset

    user = tmp_path / "user_data"
    shutil.copytree(make_tiny_dataset(), user)
    info = json.loads((user / "dataset.json").read_text())
    info["generator"] = {}
    (user / "dataset.json").write_text(json.dumps(info))
    before = sorted(p.name for p in (user / "images").iterdir())
    args = (DatasetInfo(name="x", modality="m", task="multiclass", class_names=["a"], mask_description="m"), iter([]),
            pd.DataFrame({"image_id": []}), pd.DataFrame({"image_id": [], "split": []}))
    with pytest.raises(FileExistsError, match="refusing"):
        write_dataset(user, *args)
    with pytest.raises(FileExistsError, match="not written by segx_helpers"):
        write_dataset(user, *args, overwrite=True)
    assert sorted(p.name for p in (user / "images").iterdir()) == before


# ------------------------------------------------------------------ import_folder and load_dataset for a user's folder

def _user_folder(tmp_path, n=30, grayscale=False, rgb_stored_gray=False):
    """A user's raw folder: images/<id>.png, labels.csv (multiclass), and their own splits.csv."""
    from segx_helpers.data.format import make_splits as _make_splits

    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"case_{i:03d}" for i in range(n)]
    for i in ids:
        plane = rng.integers(0, 255, (16, 16), dtype=np.uint8)
        if grayscale:
            Image.fromarray(plane).save(raw / "images" / f"{i}.png")
        elif rgb_stored_gray:
            Image.fromarray(np.repeat(plane[:, :, None], 3, axis=2)).save(raw / "images" / f"{i}.png")
        else:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(raw / "images" / f"{i}.png")
    labels = pd.DataFrame({"image_id": ids, "label": [("normal", "abnormal")[k % 2] for k in range(n)]})
    labels.to_csv(raw / "labels.csv", index=False)
    own = _make_splits(ids, seed=123).sample(frac=1.0, random_state=1)  # their own split, in another row order
    own.to_csv(raw / "splits.csv", index=False)
    return raw, ids, own


def test_import_folder_keeps_a_users_splits_file_or_frame(tmp_path):
    from segx_helpers.data.converters import FormatChoices, IgnoredSplitsWarning, LabelsCsv, SplitChoice, import_folder

    raw, ids, own = _user_folder(tmp_path)
    expected = dict(zip(own["image_id"], own["split"]))
    for name, splits in (("from_file", raw / "splits.csv"), ("from_frame", own)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", IgnoredSplitsWarning)  # no "ignored split" warning when the split is used
            out = import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / name,
                                splits=SplitChoice(own=splits), choices=FormatChoices(channels=3))
        table = load_dataset(out).table
        assert dict(zip(table["image_id"], table["split"])) == expected


def test_import_folder_takes_a_split_column_of_the_labels_file(tmp_path):
    from segx_helpers.data.converters import FormatChoices, LabelsCsv, SplitChoice, import_folder

    raw, ids, own = _user_folder(tmp_path)
    (raw / "splits.csv").unlink()
    labels = pd.read_csv(raw / "labels.csv").merge(own, on="image_id")
    labels.to_csv(raw / "labels.csv", index=False)
    out = import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds",
                        splits=SplitChoice(own=raw / "labels.csv"), choices=FormatChoices(channels=3))
    table = load_dataset(out).table
    assert dict(zip(table["image_id"], table["split"])) == dict(zip(own["image_id"], own["split"]))
    assert list(pd.read_csv(out / "labels.csv").columns) == ["image_id", "label"]


def test_import_folder_warns_when_a_users_splits_csv_is_ignored(tmp_path):
    from segx_helpers.data.converters import FormatChoices, IgnoredSplitsWarning, LabelsCsv, import_folder

    raw, ids, own = _user_folder(tmp_path)
    with pytest.warns(IgnoredSplitsWarning, match="splits.csv.*splits="):
        out = import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds",
                            choices=FormatChoices(channels=3))
    assert len(load_dataset(out).table) == len(ids)


def test_import_folder_rejects_a_split_that_misses_ids(tmp_path):
    from segx_helpers.data.converters import FormatChoices, LabelsCsv, SplitChoice, import_folder

    raw, ids, own = _user_folder(tmp_path)
    with pytest.raises(DatasetFormatError, match="have no split"):
        import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds",
                      splits=SplitChoice(own=own.iloc[1:]), choices=FormatChoices(channels=3))
    with pytest.raises(DatasetFormatError, match="unknown split names"):
        import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds",
                      splits=SplitChoice(own=own.assign(split="training")), choices=FormatChoices(channels=3))


@pytest.mark.parametrize("kind, expected", [("grayscale", 1), ("rgb_stored_gray", 1), ("colour", 3)])
def test_import_folder_detects_single_channel_sources_and_says_so(tmp_path, capsys, kind, expected):
    from segx_helpers.data.converters import LabelsCsv, SplitChoice, import_folder

    raw, ids, own = _user_folder(tmp_path, grayscale=kind == "grayscale", rgb_stored_gray=kind == "rgb_stored_gray")
    out = import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds",
                        splits=SplitChoice(own=own))
    said = capsys.readouterr().out
    assert f"channels={expected}" in said
    data = load_dataset(out)
    assert data.info.channels == expected
    assert read_image(data.table["image_path"][0], channels=data.info.channels).shape == (16, 16, expected)


def test_load_dataset_names_ignored_fields_and_import_folder(make_tiny_dataset):
    root = make_tiny_dataset()
    info = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**info, "notes": "x"}))
    with pytest.warns(UserWarning, match=r"unknown fields \['notes'\] are ignored"):
        load_dataset(root)
    foreign = {"title": info["name"], "classes": info["class_names"], "task": info["task"], "modality": "x",
               "mask_description": "y"}
    (root / "dataset.json").write_text(json.dumps(foreign))
    with pytest.raises(DatasetFormatError) as err:
        load_dataset(root)
    message = str(err.value)
    assert "['class_names', 'name']" in message and "['classes', 'title'] are ignored" in message
    assert "import_folder" in message


# ------------------------------------------------------------------------------ reliability (issue 13)

def test_label_map_masks_keep_every_labelled_structure_and_warn_once(tmp_path):
    """{0, 1, 2} (left and right lung labelled separately): every non-zero label is foreground, one warning per folder."""
    from segx_helpers.data.format import LabelMapMaskWarning

    labels = np.zeros((8, 8), np.uint8)
    labels[:, :3], labels[:, 5:] = 1, 2
    Image.fromarray(labels).save(tmp_path / "a.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "b.png")
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "c.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = [read_mask(tmp_path / name) for name in ("a.png", "b.png", "c.png")]
    for mask in masks:
        assert mask.tolist() == (labels > 0).tolist()
    label_warnings = [w for w in caught if issubclass(w.category, LabelMapMaskWarning)]
    assert len(label_warnings) == 1 and len(caught) == 1
    assert "a.png" in str(label_warnings[0].message) and "non-zero" in str(label_warnings[0].message)


def test_16_bit_binary_mask_reads_without_a_warning(tmp_path):
    values = np.zeros((6, 6), np.uint16)
    values[2:4] = 65535
    Image.fromarray(values).save(tmp_path / "m16.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_mask(tmp_path / "m16.png").tolist() == (values > 0).tolist()


def test_grey_8_bit_mask_keeps_the_threshold_rule(tmp_path):
    values = np.zeros((8, 8), np.uint8)
    values[:, 4:] = 250
    values[:, 3] = 60  # an anti-aliased edge below half the maximum
    Image.fromarray(values).save(tmp_path / "grey.png")
    with pytest.warns(NonBinaryMaskWarning, match="thresholded at 125"):
        mask = read_mask(tmp_path / "grey.png")
    assert mask[:, 4:].all() and not mask[:, :4].any()


def test_decompression_bomb_is_a_dataset_format_error_naming_the_file(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "bigmask.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x 1000: PIL refuses to decode it
    for reader in (read_image, read_mask):
        name = "big.png" if reader is read_image else "bigmask.png"
        with pytest.raises(DatasetFormatError, match=f"{name}.*too many pixels"):
            reader(tmp_path / name)
    from segx_helpers.data.format import image_size

    with pytest.raises(DatasetFormatError, match="big.png.*too many pixels"):
        image_size(tmp_path / "big.png")


@pytest.mark.parametrize("content, message", [
    ("[]", "must hold a JSON object"),
    (None, "class_names must be a non-empty list of distinct names"),  # "class_names": "ab"
    ({"class_names": ["a", 2, "c"]}, "class_names must be a non-empty list of distinct names"),
    ({"name": 7}, "name must be a string"),
    ({"channels": "3"}, "channels must be 1 or 3"),
    ({"channels": True}, "channels must be 1 or 3"),
    ({"generator": "yes"}, "generator must be an object"),
])
def test_dataset_json_field_types_are_checked(make_tiny_dataset, content, message):
    root = make_tiny_dataset()
    info = json.loads((root / "dataset.json").read_text())
    if content == "[]":
        (root / "dataset.json").write_text("[]")
    else:
        info.update({"class_names": "ab"} if content is None else content)
        (root / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match=message) as err:
        load_dataset(root)
    assert "dataset.json" in str(err.value)


def test_zero_byte_image_message_matches_the_docs(make_tiny_dataset):
    root = make_tiny_dataset()
    (root / "images" / "img_004.png").write_bytes(b"")
    with pytest.raises(DatasetFormatError, match=r"^Empty \(zero-byte\) image file: .*img_004\.png$"):
        load_dataset(root)
