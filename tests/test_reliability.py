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


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", ".hidden", "", "x..y", "a b"])
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
