"""Faults and re-runs: atomic writers, safe ids, determinism, mixed inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from segx_helpers.data import load_dataset
from segx_helpers.data.format import DatasetInfo, make_splits, write_dataset
from segx_helpers.data.torch_dataset import SegXDataset
from segx_helpers.explain.api import RunOptions, explain
from segx_helpers.explain.gradient_shap import GradientShapOptions
from segx_helpers.data.io import atomic_path, check_safe_id
from segx_helpers.models.networks import build_classifier


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target, overwrite=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_interrupted_dataset_write_leaves_no_dataset(tmp_path):
    def samples():
        yield "a", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool)
        raise KeyboardInterrupt

    info = DatasetInfo(name="x", modality="m", task="multiclass", class_names=["a"], mask_description="m")
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "ds", info, samples(), pd.DataFrame({"image_id": ["a"], "label": ["a"]}),
                      pd.DataFrame({"image_id": ["a"], "split": ["train"]}))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", ".hidden", "", "x..y", "a b", "a\n", "a.png\n"])
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(ValueError, match="Unsafe"):
        check_safe_id(bad)


def test_writer_refuses_unsafe_and_duplicate_ids(tmp_path):
    info = DatasetInfo(name="x", modality="m", task="multiclass", class_names=["a"], mask_description="m")
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="Unsafe"):
        write_dataset(tmp_path / "ds", info, [("../../etc/x", image, None)], pd.DataFrame(), pd.DataFrame())
    with pytest.raises(ValueError, match="Duplicate"):
        write_dataset(tmp_path / "ds", info, [("a", image, None), ("a", image, None)], pd.DataFrame(), pd.DataFrame())
    assert not (tmp_path / "ds").exists() and not (tmp_path.parent / "etc").exists()


def test_images_of_mixed_sizes_and_modes_load_to_one_shape(tmp_path):
    rng = np.random.default_rng(0)
    samples, ids = [], []
    for i in range(30):
        size = (20 + i, 30 + 2 * i)
        image = rng.integers(0, 255, size + ((3,) if i % 2 else ()), dtype=np.uint8)
        samples.append((f"m{i}", image, np.ones(size, bool)))
        ids.append(f"m{i}")
    info = DatasetInfo(name="mixed", modality="m", task="multiclass", class_names=["a"], mask_description="m")
    root = write_dataset(tmp_path / "mixed", info, samples, pd.DataFrame({"image_id": ids, "label": "a"}),
                         make_splits(ids, 0))
    batch = SegXDataset(load_dataset(root), None, 32).tensors()
    assert batch["image"].shape == (30, 3, 32, 32) and batch["mask"].min() == 1


def test_explanations_and_scores_are_deterministic():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 3)
    x, background = torch.randn(3, 3, 32, 32), torch.randn(4, 3, 32, 32)
    runs = [explain(model, x, [0, 1, 2], "gradient_shap", options=GradientShapOptions(background, nsamples=8, seed=5),
                    run=RunOptions(progress=False)).maps for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])
    other = explain(model, x, [0, 1, 2], "gradient_shap", options=GradientShapOptions(background, nsamples=8, seed=6),
                    run=RunOptions(progress=False)).maps
    assert not np.array_equal(runs[0], other)


# ------------------------------------------------------------------------------ atomic replacement (issue 13)

def test_failed_replace_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import os

    from segx_helpers.models.checkpoints import read_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "c.pt", build_classifier("resnet18", 3), {"note": "old"})
    old = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, build_classifier("resnet18", 3), {"note": "new"}, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == old and read_checkpoint(path)["meta"]["note"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_folder(target, files, overwrite=True):
    with atomic_path(target, overwrite=overwrite) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)


def test_folder_swap_keeps_one_complete_version_at_every_moment(tmp_path, monkeypatch):
    """Every rename during a folder replacement happens while a complete copy (old or new) exists;
    a failure of the final rename restores the old folder."""
    import os

    target = tmp_path / "results"
    old = {"manifest.csv": b"old", "raw/a.npy": b"1"}
    new = {"manifest.csv": b"new", "raw/b.npy": b"2"}
    _write_folder(target, old)
    real_replace = os.replace
    seen = []

    def complete_versions():
        found = []
        for folder in tmp_path.iterdir():
            if folder.is_dir() and _tree(folder) in (old, new):
                found.append(folder.name)
        return found

    def watched_replace(src, dst):
        seen.append(complete_versions())
        real_replace(src, dst)
        seen.append(complete_versions())

    monkeypatch.setattr(os, "replace", watched_replace)
    _write_folder(target, new)
    assert seen and all(versions for versions in seen), seen
    assert _tree(target) == new and [p.name for p in tmp_path.iterdir()] == ["results"]

    calls = []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="interrupted"):
        _write_folder(target, {"manifest.csv": b"newer"})
    monkeypatch.undo()
    assert _tree(target) == new and [p.name for p in tmp_path.iterdir()] == ["results"]


def test_leftovers_of_a_killed_run_are_cleaned_or_restored(tmp_path):
    dead_pid = 999_999_999  # above any pid_max: no such process
    target = tmp_path / "data.json"
    target.write_text("old")
    (tmp_path / f".data.json.{dead_pid}.abc123.partial").write_text("half")
    (tmp_path / ".data.json.x7k2m9.partial").write_text("half, older naming")
    with atomic_path(target, overwrite=True) as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"] and target.read_text() == "new"

    # killed between the two renames of a folder swap: the old folder sits under its backup name
    folder = tmp_path / "ds"
    backup = tmp_path / f".ds.{dead_pid}.abc123.old"
    backup.mkdir()
    (backup / "x.txt").write_text("complete old version")
    with pytest.raises(FileExistsError):
        with atomic_path(folder, overwrite=False) as tmp:
            tmp.mkdir()
    assert (folder / "x.txt").read_text() == "complete old version" and not backup.exists()


def test_a_live_runs_partial_file_is_left_alone(tmp_path):
    import os

    live = tmp_path / f".out.txt.{os.getpid()}.zzz.partial"
    live.write_text("someone is writing this")
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("done")
    assert live.exists() and (tmp_path / "out.txt").read_text() == "done"


# ------------------------------------------------------------------------------ results folders (issue 13)

def _tiny_results():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"image_id": ["a", "b"], "image_index": [0, 1], "class": ["x", "y"], "class_index": [0, 1],
                          "confidence": [0.9, 0.8]})
    maps = rng.random((2, 8, 8)).astype(np.float32)
    return table, maps, maps * 0.5, rng.random((2, 8, 8, 3)), np.ones((2, 8, 8))


def test_save_results_replaces_only_its_own_folders(tmp_path):
    from segx_helpers.workflows.results import save_results

    args = _tiny_results()
    user = tmp_path / "user"
    user.mkdir()
    (user / "manifest.csv").write_text("my own manifest\n")
    (user / "thesis.docx").write_text("months of work")
    with pytest.raises(FileExistsError, match="not written here.*no .segx_results.json marker"):
        save_results(user, *args)
    assert (user / "thesis.docx").read_text() == "months of work" and (user / "manifest.csv").read_text() == "my own manifest\n"

    ours = save_results(tmp_path / "ours", *args)
    save_results(ours, *args)  # our own folder, untouched since: replaced
    assert len(pd.read_csv(ours / "manifest.csv")) == 2 and (ours / "raw" / "b__y.npy").is_file()
    (ours / "raw" / "notes.txt").write_text("added by the user")
    with pytest.raises(FileExistsError, match=r"raw/notes\.txt"):
        save_results(ours, *args)
    assert (ours / "raw" / "notes.txt").read_text() == "added by the user"
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_results(tmp_path / "ours", *args, overwrite=False)


# ------------------------------------------------------------------------------ segx train (issue 25)

def _train_args(data, checkpoint, *extra):
    return ["train", "classifier", "--data", str(data), "--checkpoint", str(checkpoint), "--image-size", "32",
            "--epochs", "2", "--max-batches-per-epoch", "1", "--device", "cpu", *extra]


def test_segx_train_refuses_a_batch_size_larger_than_the_training_split(make_tiny_dataset, tmp_path, capsys):
    from segx_helpers.cli.main import main

    data = make_tiny_dataset(n=30, size=32)  # 21 training images, fewer than the default --batch-size 32
    assert main(_train_args(data, tmp_path / "c.pt")) == 2
    err = capsys.readouterr().err
    assert "has 21 images, fewer than --batch-size 32" in err and "--batch-size 21 or less" in err
    assert not list(tmp_path.glob("c.pt*"))  # no checkpoint without a training step


def test_fit_refuses_an_epoch_without_a_training_step(tmp_path):
    from segx_helpers.models.training import CheckpointPlan, TrainConfig, classification_loss, fit

    model = build_classifier("resnet18", 3)
    with pytest.raises(ValueError, match="epoch 1 took no training step"):
        fit(
            model,
            classification_loss("multiclass"),
            [],
            lambda m: {"val_auroc": 0.5},
            TrainConfig(epochs=1, monitor="val_auroc"),
            checkpoint=CheckpointPlan(path=tmp_path / "c.pt"),
        )
    assert not list(tmp_path.iterdir())


def test_segx_train_resumes_an_interrupted_run_and_removes_its_resume_state(make_tiny_dataset, tmp_path, monkeypatch,
                                                                            capsys):
    from segx_helpers.cli import distributed
    from segx_helpers.cli.main import main
    from segx_helpers.models.checkpoints import read_checkpoint

    data = make_tiny_dataset(n=30, size=32)
    recipe = distributed.classifier_recipe

    def interrupted_recipe(*args, **kwargs):  # the run is killed during the second epoch's validation
        made = recipe(*args, **kwargs)
        original, calls = made.validate, []

        def validate(model):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return original(model)

        made.validate = validate
        return made

    monkeypatch.setattr(distributed, "classifier_recipe", interrupted_recipe)  # where segx train looks it up
    with pytest.raises(KeyboardInterrupt):
        main(_train_args(data, tmp_path / "c.pt", "--batch-size", "8"))
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "c.pt")["meta"]["finished"] is False
    assert (tmp_path / "c.pt.last.pt").is_file()
    assert main(_train_args(data, tmp_path / "c.pt", "--batch-size", "8")) == 2  # exists: not replaced ...
    assert "--resume continues an interrupted run" in capsys.readouterr().err
    assert main(_train_args(data, tmp_path / "c.pt", "--batch-size", "16", "--resume")) == 2  # ... other settings
    assert "batch_size: checkpoint 8, now 16" in capsys.readouterr().err
    assert main(_train_args(data, tmp_path / "c.pt", "--batch-size", "8", "--resume")) == 0
    meta = read_checkpoint(tmp_path / "c.pt")["meta"]
    assert meta["finished"] is True and [r["epoch"] for r in meta["history"]] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("c.pt")) == ["c.pt"]  # no .last.pt left
    assert main(_train_args(data, tmp_path / "c.pt", "--batch-size", "8", "--resume")) == 2
    assert "holds a finished training run: nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--image-size", "0"], "--image-size must be at least 32 pixels, got 0"),
                                            (["--device", "tpu"], "unknown device 'tpu'")])
def test_segx_train_bad_values_are_one_line(make_tiny_dataset, tmp_path, capsys, extra, message):
    from segx_helpers.cli.main import main

    data = make_tiny_dataset(n=30, size=32)
    assert main(_train_args(data, tmp_path / "c.pt", "--batch-size", "8", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not list(tmp_path.glob("c.pt*"))


# ------------------------------------------------------------------------------ checkpoint integrity (issue 25)

def test_flipped_bytes_in_a_checkpoints_weights_are_detected(tmp_path):
    from segx_helpers.models.checkpoints import CheckpointError, read_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_classifier("resnet18", 3)
    path = save_checkpoint(tmp_path / "c.pt", model, {"note": "x"})
    data = bytearray(path.read_bytes())
    weights = model.state_dict()["layer1.0.conv1.weight"].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = bytes(data).find(weights[:4096])
    assert at > 0
    data[at + 1000:at + 1064] = bytes(b ^ 0x5A for b in data[at + 1000:at + 1064])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="c.pt is damaged: its weights or metadata do not match the SHA-256"):
        read_checkpoint(path)


# ------------------------------------------------------------------------------ runner (issue 25)

@pytest.mark.parametrize("dataset", ["/abs/path", "../x", "data/mine", "."])
def test_runner_dataset_must_be_a_name_not_a_path(dataset, capsys):
    from segx_helpers.cli.runner import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--dataset", dataset])
    err = capsys.readouterr().err
    assert "--dataset must be a dataset name, not a path" in err and "--root" in err


def test_runner_checks_its_arguments_before_any_notebook_starts(tmp_path, monkeypatch, capsys):
    import papermill

    from segx_helpers.cli import runner

    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: started.append(a))
    for argv, message in ((["--dataset", "does-not-exist"], "no dataset folder"),
                          (["-p", "NEW_DATASET=../elsewhere"], "NEW_DATASET must be a dataset name"),
                          (["-p", "SEED=abc"], "expects a int for SEED (its default is 0), not the text 'abc'"),
                          (["--only"], "expected at least one argument")):
        with pytest.raises(SystemExit) as stop:
            runner.main(["--root", str(tmp_path)] + argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv
    assert started == [] and not (tmp_path / "outputs").exists()
    (tmp_path / "data" / "mine").mkdir(parents=True)
    runner.check_datasets(tmp_path, {"DATASET": "mine"})  # present under --root: accepted
    runner.check_datasets(tmp_path, {"DATASET": "synthetic-cxr"})  # made by notebook 01: accepted


@pytest.mark.parametrize("argv, message", [
    (["-p", "REAL_DATA=100"], ("-p REAL_DATA=100: REAL_DATA must be False, True (256 px) or an image size that is a "
                               "multiple of 32, got 100")),
    (["-p", "SEED=1.5"], "expects a int for SEED (its default is 0), not the float 1.5"),
    (["-p", "P=True"], "expects a float for P (its default is 5.0), not the bool True"),
    (["-p", "ENCODER=3"], "expects a str for ENCODER (its default is 'resnet18'), not the int 3")])
def test_runner_refuses_a_value_of_another_type_than_the_default_before_any_kernel(tmp_path, monkeypatch, capsys, argv,
                                                                                   message):
    """Issue 35 item 10: ``-p REAL_DATA=100`` (a number for a True/False switch) is refused up front like text for a
    number, instead of a kernel failing with a 40-line traceback (after notebook 01 in a full run)."""
    import papermill

    from segx_helpers.cli import runner

    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: started.append(a))
    with pytest.raises(SystemExit) as stop:
        runner.main(["--root", str(tmp_path)] + argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err
    assert started == [] and not (tmp_path / "outputs").exists()


def test_runner_accepts_an_int_for_a_float_and_anything_for_a_none_default():
    """Item 10's rule is by the default's type, so what worked before still works: 3 for ``P = 5.0``, and any value
    for a parameter whose default is None (``IMAGE_SIZE = None``, ``ENCODER_WEIGHTS = None``)."""
    from segx_helpers.cli.runner import parameters_per_notebook

    chosen = parameters_per_notebook(["04_segx_maps", "06_adapt_new_modality"], {"P": 3, "IMAGE_SIZE": 64})
    assert chosen == {"04_segx_maps": {"P": 3}, "06_adapt_new_modality": {"P": 3, "IMAGE_SIZE": 64}}


def test_runner_root_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """Issue 35 item 11: a ``--root`` below a file, or in /proc, is one line (exit 2) naming the folder, not an
    OSError traceback."""
    import papermill

    from segx_helpers.cli import runner

    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: started.append(a))
    (tmp_path / "notes.txt").write_text("a file")
    for root in (tmp_path / "notes.txt" / "project", Path("/proc/segx-tutorial-root")):
        with pytest.raises(SystemExit) as stop:
            runner.main(["--root", str(root), "--only", "01_dataset_prep"])
        err = capsys.readouterr().err
        error = [line for line in err.splitlines() if "error:" in line]
        assert stop.value.code == 2 and len(error) == 1 and f"--root {root}: cannot create" in error[0], err
        assert "Traceback" not in err
    assert started == []


def test_runner_only_with_an_unknown_name_lists_the_notebooks(tmp_path, capsys):
    """The smaller item: ``--only`` with a name that is no notebook says which names there are (a name with its
    ``.ipynb`` suffix is taken too)."""
    from segx_helpers.cli import runner

    with pytest.raises(SystemExit) as stop:
        runner.parse_args(["--only", "01_dataset_prep", "02_train"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--only: no notebook named ['02_train']" in err
    assert "01_dataset_prep, 02_train_segmenter, 03_train_classifier" in err and "07_train_with_the_mask" in err
    args, _ = runner.parse_args(["--only", "03_train_classifier.ipynb", "01_dataset_prep"])
    assert args.only == ["03_train_classifier", "01_dataset_prep"]


# ------------------------------------------------------------------------------ import_folder (issue 25)

def _raw_folder(tmp_path, n=30):
    from PIL import Image

    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"case_{i:03d}" for i in range(n)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(raw / "images" / f"{i}.png")
    pd.DataFrame({"image_id": ids, "label": [("normal", "abnormal")[k % 2] for k in range(n)]}).to_csv(
        raw / "labels.csv", index=False)
    return raw


@pytest.mark.filterwarnings("ignore:.*have no mask")
def test_import_folder_refuses_two_image_files_of_one_id_naming_both(tmp_path):
    from PIL import Image

    from segx_helpers.data.format import DatasetFormatError
    from segx_helpers.data.converters import LabelsCsv, import_folder

    raw = _raw_folder(tmp_path)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(raw / "images" / "case_004.jpg")
    with pytest.raises(DatasetFormatError, match=r"case_004\.jpg and .*case_004\.png share the id 'case_004'"):
        import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


@pytest.mark.filterwarnings("ignore:.*have no mask")
def test_import_folder_decompression_bomb_is_the_documented_error_on_every_path(tmp_path, monkeypatch):
    from PIL import Image

    from segx_helpers.data.format import DatasetFormatError
    from segx_helpers.data.converters import FormatChoices, LabelsCsv, import_folder

    raw = _raw_folder(tmp_path)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(raw / "images" / "case_007.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x 1000: PIL refuses the file
    for channels in (None, 3):  # channel detection, then conversion
        with pytest.raises(DatasetFormatError, match=r"case_007\.png has too many pixels to decode safely"):
            import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds", choices=FormatChoices(channels=channels))


@pytest.mark.parametrize("labels, message", [
    ("image_id,label\ncase_000,normal\ncase_001,\n", r"missing \(NaN\) labels for ids \['case_001'\]"),
    ("image_id,label\ncase_000,normal\ncase_001,zebra\n", r"unknown class names \['zebra'\]"),
    ("", "cannot be parsed as CSV"),
])
def test_import_folder_checks_labels_before_converting_any_image(tmp_path, monkeypatch, labels, message):
    from segx_helpers.data import converters as real
    from segx_helpers.data.format import DatasetFormatError

    raw = _raw_folder(tmp_path)
    (raw / "labels.csv").write_text(labels)
    monkeypatch.setattr(real, "read_image", lambda *a, **k: pytest.fail("an image was converted"))
    with pytest.raises(DatasetFormatError, match=message) as caught:
        real.import_folder(raw / "images", real.LabelsCsv(raw / "labels.csv", "multiclass", ["normal", "abnormal"]),
                           tmp_path / "ds", choices=real.FormatChoices(channels=3))
    assert str(raw / "labels.csv") in str(caught.value) and ".partial" not in str(caught.value)


@pytest.mark.filterwarnings("ignore:.*have no mask")
def test_import_folder_too_small_for_the_splits_says_so_and_points_to_splits(tmp_path):
    from segx_helpers.data.format import DatasetFormatError
    from segx_helpers.data.converters import FormatChoices, LabelsCsv, import_folder

    raw = _raw_folder(tmp_path, n=4)
    with pytest.raises(DatasetFormatError, match=r"4 images are too few for a 7:1:2 split.*\['val'\].*splits=") as caught:
        import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds", choices=FormatChoices(channels=3))
    assert ".partial" not in str(caught.value) and not (tmp_path / "ds").exists()


@pytest.mark.filterwarnings("ignore:.*have no mask")
def test_import_folder_keeps_images_of_height_or_width_one(tmp_path):
    """Issue 35 item 12: a 40 x 1 and a 1 x 40 RGB image are stored as they are (``squeeze()`` made them 3 x 40
    grayscale images), and a 1 x 1 image with its mask is written so that ``load_dataset`` accepts it."""
    from PIL import Image

    from segx_helpers.data.converters import LabelsCsv, MaskFolder, import_folder
    from segx_helpers.data.format import read_image, read_mask

    raw = _raw_folder(tmp_path)
    rng = np.random.default_rng(1)
    shapes = {"case_001": (40, 1, 3), "case_002": (1, 40, 3), "case_003": (1, 1, 3)}
    for image_id, shape in shapes.items():
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(raw / "images" / f"{image_id}.png")
    (raw / "masks").mkdir()
    Image.fromarray(np.full((1, 1), 255, np.uint8)).save(raw / "masks" / "case_003.png")
    out = import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds",
                        masks=MaskFolder(raw / "masks"))
    table = load_dataset(out, check_files=True).table.set_index("image_id")
    for image_id, shape in shapes.items():
        stored = read_image(table.loc[image_id, "image_path"])
        assert stored.shape == shape and np.array_equal(stored, np.asarray(Image.open(raw / "images" / f"{image_id}.png")))
    assert read_mask(table.loc["case_003", "mask_path"]).tolist() == [[True]]


@pytest.mark.filterwarnings("ignore:.*have no mask")
def test_import_folder_scales_a_16_bit_series_once_for_all_its_images(tmp_path, capsys):
    """Issue 35 item 13: the 12-bit guess is made for the whole series, so the same raw value becomes the same
    8-bit value in every image (before: 4000 became 249 in an image whose maximum is below 4096, 16 in the next)."""
    from PIL import Image

    from segx_helpers.data.converters import LabelsCsv, import_folder
    from segx_helpers.data.format import read_image

    raw = _raw_folder(tmp_path)
    rng = np.random.default_rng(2)
    for k in range(30):
        pixels = rng.integers(0, 4000, (16, 16), dtype=np.uint16)
        pixels[0, 0] = 4000
        if k == 5:
            pixels[1, 1] = 60000  # one image uses the full 16 bits: the series is 16-bit
        Image.fromarray(pixels).save(raw / "images" / f"case_{k:03d}.png")
    assert Image.open(raw / "images" / "case_000.png").mode.startswith("I")
    out = import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds")
    assert "scaled to 8 bits as 16-bit for the whole series" in capsys.readouterr().out
    table = load_dataset(out).table.set_index("image_id")
    corners = {int(read_image(table.loc[f"case_{k:03d}", "image_path"], channels=1)[0, 0, 0]) for k in range(30)}
    assert corners == {round(4000 / 65535 * 255)}


def test_import_folder_with_a_mistyped_mask_folder_names_it(tmp_path):
    """Issue 35 item 14: a mask folder that does not exist (a typo), or whose files match no image id (a wrong
    suffix), is an error naming the folder before anything is written (before: a dataset without masks and a
    warning, and the segmenter failed much later)."""
    from PIL import Image

    from segx_helpers.data.converters import LabelsCsv, MaskFolder, import_folder
    from segx_helpers.data.format import DatasetFormatError

    raw = _raw_folder(tmp_path)
    (raw / "masks").mkdir()
    for k in range(30):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(raw / "masks" / f"case_{k:03d}_mask.png")
    labels = LabelsCsv(raw / "labels.csv", "multiclass")
    with pytest.raises(DatasetFormatError, match=r"Mask folder .*maks not found \(is its name right\?\)"):
        import_folder(raw / "images", labels, tmp_path / "ds", masks=MaskFolder(raw / "maks", suffix="_mask"))
    with pytest.raises(DatasetFormatError, match=r"None of the 30 \.png files in .*masks is the mask of an image: "
                                                 r"masks are <image_id>\.png \(suffix=''\)"):
        import_folder(raw / "images", labels, tmp_path / "ds", masks=MaskFolder(raw / "masks"))
    assert not (tmp_path / "ds").exists()
    out = import_folder(raw / "images", labels, tmp_path / "ds", masks=MaskFolder(raw / "masks", suffix="_mask"))
    assert load_dataset(out).table["mask_path"].notna().all()


@pytest.mark.filterwarnings("ignore:.*have no mask")
def test_import_folder_says_that_ids_are_file_names_without_their_suffix(tmp_path):
    """Issue 35 item 15: ``labels.csv`` ids written with their suffix (``case_000.png``) get "ids are file names
    without their suffix" (before: "is part of the download missing?")."""
    from segx_helpers.data.converters import LabelsCsv, import_folder
    from segx_helpers.data.format import DatasetFormatError

    raw = _raw_folder(tmp_path)
    labels = pd.read_csv(raw / "labels.csv")
    labels["image_id"] = labels["image_id"] + ".png"
    labels.to_csv(raw / "labels.csv", index=False)
    with pytest.raises(DatasetFormatError, match=r"labels\.csv: image ids are file names without their suffix, but 30 "
                                                 r"ids carry one \(e\.g\. \['case_000\.png'.*write 'case_000' for") as caught:
        import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds")
    assert "download" not in str(caught.value)


def test_import_folder_explains_its_grouped_arguments():
    """Issue 36: the grouped arguments given the old way (a path for ``labels``) say how to pass them."""
    from segx_helpers.data.converters import import_folder

    with pytest.raises(TypeError, match=r"import_folder's labels must be a LabelsCsv\(...\), got str .*"
                                        r"labels=LabelsCsv\('labels.csv', 'multiclass'\)"):
        import_folder("images", "labels.csv", "out")


@pytest.mark.filterwarnings("ignore:.*have no mask")
def test_import_folder_never_suggests_an_overwrite_that_it_would_refuse(tmp_path):
    from segx_helpers.data.converters import FormatChoices, LabelsCsv, import_folder

    raw = _raw_folder(tmp_path)
    out = import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), tmp_path / "ds", choices=FormatChoices(channels=3))
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="never replaced, with or without overwrite=True") as caught:
            import_folder(raw / "images", LabelsCsv(raw / "labels.csv", "multiclass"), out, choices=FormatChoices(channels=3), overwrite=overwrite)
        assert "pass overwrite=True" not in str(caught.value)


# ------------------------------------------------------------------------------ generated datasets (issue 25)

@pytest.mark.filterwarnings("ignore:The 'val' split has no images")
def test_regenerating_a_synthetic_dataset_keeps_files_the_user_added(tmp_path):
    from segx_helpers.data.synthetic import SyntheticConfig, generate_synthetic_derm

    config = SyntheticConfig(n_images=30, image_size=32, seed=0)
    root = generate_synthetic_derm(tmp_path / "derm", config, progress=False)
    generate_synthetic_derm(root, config, overwrite=True, progress=False)  # untouched since: replaced
    (root / "images" / "my_notes.txt").write_text("added by the user")
    with pytest.raises(FileExistsError, match=r"images/my_notes\.txt"):
        generate_synthetic_derm(root, config, overwrite=True, progress=False)
    assert (root / "images" / "my_notes.txt").read_text() == "added by the user"


# ------------------------------------------------------------------------------ image_index (issue 25)

@pytest.mark.parametrize("index, message", [([0, -1], r"image_index\[1\] is -1, outside \[0, 2\)"),
                                            ([0, 2], r"image_index\[1\] is 2, outside \[0, 2\)"),
                                            (np.array([0.0, 0.9]), r"must hold integers .* image_index\[1\] is 0\.9"),
                                            ([0], r"shape \(1,\) but there are 2 maps")])
def test_analyse_and_explanation_results_refuse_bad_image_indices(index, message):
    from segx_helpers.scores.analysis import AnalysisOptions, analyse
    from segx_helpers.explain.targets import Explanations
    from segx_helpers.workflows.results import SplitLabels, explanation_results

    rng = np.random.default_rng(0)
    maps = rng.random((2, 8, 8)).astype(np.float32)
    masks = np.zeros((2, 8, 8), bool)
    masks[:, 2:6, 2:6] = True
    with pytest.raises(ValueError, match=message):
        analyse(maps, masks, image_index=index, options=AnalysisOptions(localisation=False))
    if len(index) == 2:
        e = Explanations(maps=maps, image_index=np.asarray(index), class_index=np.array([0, 1]),
                         confidence=np.array([0.9, 0.8]), method="gradcam")
        with pytest.raises(ValueError, match=message):
            explanation_results(e, SplitLabels(["a", "b"], np.array([0, 1]), "multiclass", ["x", "y"]), masks)
    assert len(analyse(maps, masks, image_index=np.array([1, 0]), options=AnalysisOptions(localisation=False))) == 2


def test_maps_near_the_float32_limit_are_scored_like_the_same_maps_at_scale_one():
    from segx_helpers.scores.analysis import analyse

    rng = np.random.default_rng(0)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    masks = np.zeros((3, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    truth = np.roll(masks, 2, axis=2)
    plain = analyse(maps, masks, truth, image_index=np.arange(3))
    with pytest.warns(UserWarning, match="so large that float32 sums over a map overflow"):
        huge = analyse(maps * np.float32(1e37), masks, truth, image_index=np.arange(3))
    assert np.isfinite(huge.to_numpy(float)).all()
    pd.testing.assert_frame_equal(huge, plain, rtol=1e-5)


def test_runner_accepts_real_data_as_a_switch_or_an_image_size():
    """``-p REAL_DATA=128`` (the CPU recipe's size) and ``-p REAL_DATA=True`` pass the up-front check that refuses
    ``-p REAL_DATA=100``."""
    from segx_helpers.cli.runner import RunnerInputError, parameters_per_notebook
    from segx_helpers.workflows.settings import NOTEBOOKS

    for value in (True, False, 128, 256):
        assert parameters_per_notebook(list(NOTEBOOKS[:5]), {"REAL_DATA": value})["03_train_classifier"] == {
            "REAL_DATA": value}
    with pytest.raises(RunnerInputError, match="multiple of 32"):
        parameters_per_notebook(list(NOTEBOOKS[:5]), {"REAL_DATA": 100})
