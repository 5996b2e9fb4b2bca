"""What notebook 06 (a new modality, your own data) calls: a folder broken on purpose for the validator
(:func:`broken_copy`, :data:`FAULTS`), a small CNN standing in for *your* classifier (:class:`SmallCNN`), the
validation metric the training loop monitors (:func:`auroc_validation`), and the ``segx`` command run from Python
with its command line printed (:func:`run_segx`)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from torch import nn

from segx_helpers.data.format import load_dataset, read_mask
from segx_helpers.models.training import predict_classifier
from segx_helpers.scores.metrics import macro_auroc

FAULTS = ("missing_image", "wrong_mask_size", "class_typo", "grey_mask")


def broken_copy(source: str | Path, target: str | Path, fault: str) -> Path:
    """Copy the dataset folder ``source`` to ``target`` (replacing it) and break the copy in one of four common
    ways (:data:`FAULTS`): delete an image, write a mask of the wrong size, misspell a class (a label value of a
    multi-class set, a column name of a multi-label one), or make a mask non-binary (grey levels, as JPEG
    compression leaves them). Returns ``target``, for :func:`~segx_helpers.data.format.load_dataset` to judge."""
    from PIL import Image

    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}: one of {FAULTS}")
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    loaded = load_dataset(target)
    table, task, classes = loaded.table, loaded.info.task, loaded.info.class_names
    with_mask = table.loc[table["mask_path"].notna(), "image_id"].iloc[0]
    if fault == "missing_image":
        Path(table["image_path"].iloc[0]).unlink()
    elif fault == "wrong_mask_size":
        Image.new("L", (50, 50)).save(target / "masks" / f"{with_mask}.png")
    elif fault == "class_typo":
        labels = pd.read_csv(target / "labels.csv", dtype={"image_id": str})
        typo = classes[0][:-1] or "typo"
        if task == "multiclass":
            labels.loc[0, "label"] = typo
        else:
            labels = labels.rename(columns={classes[0]: typo})
        labels.to_csv(target / "labels.csv", index=False)
    else:  # grey_mask
        grey = (read_mask(target / "masks" / f"{with_mask}.png") * 200 + 30).astype(np.uint8)
        Image.fromarray(grey).save(target / "masks" / f"{with_mask}.png")
    return target


class SmallCNN(nn.Module):
    """Four conv blocks and a linear head: logits ``(N, classes)`` for images with ``channels`` channels.

    Not one of the package's architectures: it stands for *your* classifier. SegX and SegU need only a
    ``torch.nn.Module`` and one of its layers (here ``features[-1]``) for the CAM."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.features(x))


def auroc_validation(val_loader, task: str) -> Callable[[nn.Module], dict]:
    """The ``validate`` function of :func:`~segx_helpers.models.training.fit`: the model's macro AUROC on
    ``val_loader`` as ``{"val_auroc": ...}`` (monitor ``"val_auroc"``)."""
    def validate(model: nn.Module) -> dict:
        result = predict_classifier(model, val_loader, task)
        return {"val_auroc": macro_auroc(result["targets"], result["probs"])}

    return validate


def run_segx(*args, root: str | Path) -> None:
    """Run ``python -m segx_helpers ARGS`` (the ``segx`` command) in ``root`` and show what it printed, after its
    command line, ``$ segx ...``, so it can be copied into a terminal opened in ``root``. Path arguments are written
    relative to ``root``. Progress bars are off; a failing command raises
    :class:`subprocess.CalledProcessError` after its message is shown."""
    args = [os.path.relpath(a, root) if isinstance(a, os.PathLike) else str(a) for a in args]
    print("$ segx " + shlex.join(args))
    done = subprocess.run([sys.executable, "-m", "segx_helpers", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    print(done.stdout + done.stderr)
    done.check_returncode()
