"""Faults and re-runs: atomic writers, safe ids, determinism, mixed inputs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from segx_helpers.data import load_dataset
from segx_helpers.data.format import DatasetInfo, make_splits, write_dataset
from segx_helpers.data.torch_dataset import SegXDataset
from segx_helpers.explain import explain
from segx_helpers.io import atomic_path, check_safe_id
from segx_helpers.models import build_classifier


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
    runs = [explain(model, x, [0, 1, 2], "gradient_shap", background=background, nsamples=8, seed=5, progress=False).maps
            for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])
    other = explain(model, x, [0, 1, 2], "gradient_shap", background=background, nsamples=8, seed=6, progress=False).maps
    assert not np.array_equal(runs[0], other)


# ------------------------------------------------------------------------------ atomic replacement (issue 13)

def test_failed_replace_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import os

    from segx_helpers.training import read_checkpoint, save_checkpoint

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
                          "score": [0.9, 0.8]})
    maps = rng.random((2, 8, 8)).astype(np.float32)
    return table, maps, maps * 0.5, rng.random((2, 8, 8, 3)), np.ones((2, 8, 8))


def test_save_results_replaces_only_its_own_folders(tmp_path):
    from segx_helpers.results import save_results

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
