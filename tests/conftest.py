"""Shared fixtures: tiny datasets written through the package's own writer, and the one quick-mode run of the
tutorial notebooks per session (``tutorial_run``, see tests/notebook_run.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from segx_helpers.data.format import DatasetInfo, make_splits, write_dataset
from notebook_run import BackgroundTutorial, TutorialRun

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(2)


def tiny_samples(n: int, size: int = 32, seed: int = 0, channels: int = 3):
    """``n`` random images with a centred square mask."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size, channels) if channels == 3 else (size, size)
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        mask = np.zeros((size, size), dtype=bool)
        mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
        yield f"img_{i:03d}", image, mask


@pytest.fixture
def make_tiny_dataset(tmp_path):
    """Factory: write a small valid dataset and return its folder."""

    def make(name: str = "tiny", n: int = 30, task: str = "multiclass", size: int = 32, channels: int = 3) -> Path:
        root = tmp_path / name
        ids = [f"img_{i:03d}" for i in range(n)]
        if task == "multiclass":
            classes = ["a", "b", "c"]
            labels = pd.DataFrame({"image_id": ids, "label": [classes[i % 3] for i in range(n)]})
            strat = labels["label"]
        else:
            classes = ["x", "y"]
            labels = pd.DataFrame({"image_id": ids, "x": [i % 2 for i in range(n)], "y": [(i // 2) % 2 for i in range(n)]})
            strat = labels["x"] * 2 + labels["y"]
        info = DatasetInfo(name=name, modality="test", task=task, class_names=classes, mask_description="a square",
                           channels=channels, generator={"test": True})
        write_dataset(root, info, tiny_samples(n, size, channels=channels), labels, make_splits(ids, 0, stratify=strat))
        return root

    return make


@pytest.fixture(scope="session", autouse=True)
def tutorial_in_background(request, tmp_path_factory):
    """When the session holds a test that reads the notebook run, start that run at once in processes of its own
    (:class:`BackgroundTutorial`: notebook 06 in a second process, one torch thread). The other tests, run
    meanwhile, get one torch thread (their processes too); the chain of the other notebooks gets two, waiting
    passively (``OMP_WAIT_POLICY``) so that they yield the second core while the other tests run and take both
    once those are done: the run is the longest of the three."""
    uses = ("tutorial_run", "tutorial_in_progress")
    if not any(set(uses) & set(getattr(item, "fixturenames", ())) for item in request.session.items):
        yield None
        return
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    notebooks = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "MPLBACKEND": "Agg"}
    run = BackgroundTutorial(tmp_path_factory.mktemp("tutorial"), {**os.environ, **notebooks},
                             beside_env={**os.environ, **notebooks, **threads})
    with pytest.MonkeyPatch.context() as env:
        for key, value in threads.items():
            env.setenv(key, value)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield run
        finally:
            torch.set_num_threads(before)
            run.stop()


@pytest.fixture(scope="session")
def tutorial_in_progress(tutorial_in_background) -> BackgroundTutorial:
    """The notebook run while it goes on, for a test that needs only its first notebooks:
    ``tutorial_in_progress.finished("02_train_segmenter")`` waits for that one and returns the run's root."""
    return tutorial_in_background


@pytest.fixture(scope="session")
def tutorial_run(tutorial_in_background) -> TutorialRun:
    """The eight notebooks executed once in quick mode (minutes); every test taking this fixture reads this run."""
    return tutorial_in_background.result()


def pytest_collection_modifyitems(items):
    """Mark every test that uses the notebook run ``notebooks``, so ``-m "not notebooks"`` leaves the run out, and
    run those tests last (those reading the run in progress just before those reading its result): the run itself
    starts with the session (:func:`tutorial_in_background`), and every other test runs beside it meanwhile instead
    of waiting for it."""
    reads_the_run = [item for item in items if "tutorial_run" in getattr(item, "fixturenames", ())]
    for item in items:
        if {"tutorial_run", "tutorial_in_progress"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.notebooks)
    # a test reading the run in progress (tutorial_in_progress) waits for its first notebooks: run it after the
    # others, when they are long done, so the suite does not stand idle meanwhile
    in_progress = [item for item in items if "tutorial_in_progress" in getattr(item, "fixturenames", ())
                   and item not in reads_the_run]
    items[:] = [item for item in items if item not in reads_the_run and item not in in_progress] + in_progress + reads_the_run
