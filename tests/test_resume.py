"""Resuming an interrupted training run (issue 35, items 3 to 5 and the smaller resume items): a resumed run
repeats an uninterrupted one exactly, in one process and under torchrun, and a damaged or older resume state is
refused or flagged, never trusted silently."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from segx_helpers.data import load_dataset
from segx_helpers.data.torch_dataset import SegXDataset
from segx_helpers.models.checkpoints import (CheckpointError, UnverifiedCheckpointWarning, last_checkpoint_path,
                                             read_checkpoint, save_checkpoint)
from segx_helpers.models.networks import build_classifier
from segx_helpers.models.training import CheckpointPlan, TrainConfig, classification_loss, fit, make_loader

ROOT = Path(__file__).resolve().parents[1]


class KilledAtStep(nn.Module):
    """Cross-entropy that raises ``KeyboardInterrupt`` at its ``step``-th call (counting from 1): the run is
    stopped in the middle of an epoch, as by kill -9 (nothing after the last finished epoch is saved)."""

    def __init__(self, step: int | None) -> None:
        super().__init__()
        self.loss, self.step, self.calls = classification_loss("multiclass"), step, 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.step is not None and self.calls == self.step:
            raise KeyboardInterrupt
        return self.loss(logits, targets)


def _fit(data, checkpoint: Path, killed_at: int | None = None, resume: bool = False, epochs: int = 3) -> dict:
    """Train a small CNN on ``data`` with augmentation and shuffling (both random) and return its final (best)
    weights; ``killed_at`` interrupts it at that training step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    train = make_loader(SegXDataset(data, "train", 32, train=True), 8, shuffle=True, seed=0)
    val = SegXDataset(data, "val", 32).tensors()
    loss_fn = classification_loss("multiclass")

    def validate(m):
        with torch.no_grad():
            return {"val_loss": float(loss_fn(m(val["image"]), val["target"]))}

    fit(
        model,
        KilledAtStep(killed_at),
        train,
        validate,
        TrainConfig(epochs=epochs, lr=1e-2, monitor="val_loss", patience=10, amp=False),
        checkpoint=CheckpointPlan(path=checkpoint, resume=resume),
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


def _differing(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(make_tiny_dataset, tmp_path):
    """Item 4: the random state (torch, NumPy, Python and the loader's shuffling generator) is saved with each
    epoch, so the resumed run draws the same augmentations and batches as the uninterrupted one."""
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    whole = _fit(data, tmp_path / "whole.pt")
    with pytest.raises(KeyboardInterrupt):
        _fit(data, tmp_path / "cut.pt", killed_at=5)  # 3 steps per epoch: the middle of epoch 2
    assert read_checkpoint(last_checkpoint_path(tmp_path / "cut.pt"))["training_state"]["epoch"] == 0
    resumed = _fit(data, tmp_path / "cut.pt", resume=True)
    assert _differing(whole, resumed) == []
    last_whole = read_checkpoint(last_checkpoint_path(tmp_path / "whole.pt"))
    last_resumed = read_checkpoint(last_checkpoint_path(tmp_path / "cut.pt"))
    assert _differing(last_whole["state_dict"], last_resumed["state_dict"]) == []
    assert [r["train_loss"] for r in read_checkpoint(tmp_path / "whole.pt")["meta"]["history"]] == \
        [r["train_loss"] for r in read_checkpoint(tmp_path / "cut.pt")["meta"]["history"]]


@pytest.mark.parametrize("damage", ["epoch", "optimizer", "random_state"])
def test_a_damaged_training_state_is_refused(make_tiny_dataset, tmp_path, damage):
    """Item 5: the SHA-256 covers the optimiser, the scheduler, the epoch counter and the random state, so a
    changed ``training_state`` inside ``.last.pt`` is refused and nothing is trained from it."""
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    with pytest.raises(KeyboardInterrupt):
        _fit(data, tmp_path / "c.pt", killed_at=5)
    last = last_checkpoint_path(tmp_path / "c.pt")
    raw = torch.load(last, weights_only=True)
    state = raw["training_state"]
    if damage == "epoch":
        state["epoch"] = 2
    elif damage == "optimizer":
        moments = next(iter(state["optimizer"]["state"].values()))["exp_avg"]
        moments.view(-1)[:8] += 1.0
    else:
        state["random_states"][0]["torch"][100] ^= 0xFF
    torch.save(raw, last)
    with pytest.raises(CheckpointError, match="is damaged: its training state"):
        read_checkpoint(last)
    with pytest.raises(CheckpointError, match="is damaged"):
        _fit(data, tmp_path / "c.pt", resume=True)
    assert read_checkpoint(tmp_path / "c.pt")["meta"].get("finished") is not True


def test_a_checkpoint_without_its_sha256_loads_with_a_warning(tmp_path):
    """The smaller item: a checkpoint written before ``content_sha256`` existed loads, but with a warning
    that it could not be verified (before, silently)."""
    path = save_checkpoint(tmp_path / "c.pt", build_classifier("resnet18", 3), {"note": "x"})
    raw = torch.load(path, weights_only=True)
    del raw["content_sha256"]
    torch.save(raw, path)
    with pytest.warns(UnverifiedCheckpointWarning, match="no SHA-256"):
        assert read_checkpoint(path)["meta"] == {"note": "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_checkpoint(save_checkpoint(tmp_path / "d.pt", build_classifier("resnet18", 3), {"note": "y"}))


# ------------------------------------------------------------------------------ segx train, 1 and 2 processes

def _train_args(data, checkpoint, *extra) -> list[str]:
    return ["train", "classifier", "--data", str(data), "--checkpoint", str(checkpoint), "--image-size", "32",
            "--epochs", "2", "--batch-size", "8", "--device", "cpu", *extra]


def test_with_nothing_to_resume_the_hint_is_a_plain_rerun(make_tiny_dataset, tmp_path, capsys):
    """The smaller item: ``--resume`` with nothing to resume says that the same command without ``--resume``
    trains from the start (not ``--overwrite``, which is for replacing a checkpoint)."""
    from segx_helpers.cli.main import main

    data = make_tiny_dataset(n=30, size=32)
    assert main(_train_args(data, tmp_path / "c.pt", "--resume")) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "without --resume" in err and "--overwrite" not in err
    assert not list(tmp_path.glob("c.pt*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KILLING_TRAIN = """\
import os, signal, sys
import torch
from segx_helpers.cli import distributed

KILL_AT = int(os.environ.get("KILL_AT_STEP", "0"))
recipe = distributed.classifier_recipe


def killing_recipe(*args, **kwargs):  # rank 0 is killed (SIGKILL) at training step KILL_AT
    made = recipe(*args, **kwargs)
    loss, calls = made.loss, []

    def counted(*a, **k):
        calls.append(1)
        if KILL_AT and len(calls) == KILL_AT and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        return loss(*a, **k)

    made.loss = counted
    return made


def barrier_only(ctx, failed=False):  # one process group for every run of this script: gloo cannot be relied on to
    if not failed:                   # connect a group made again after destroying one (stale addresses in the store)
        distributed.barrier(ctx)


distributed.cleanup = barrier_only
data, *checkpoints = sys.argv[1:]  # what segx train runs, without the audit's imports (half the start-up)
spec = distributed.TrainSpec("classifier", image_size=32, epochs=2, batch_size=8)
for checkpoint in checkpoints:  # "whole.pt cut.pt": an uninterrupted run, then one killed in epoch 2 (KILL_AT_STEP)
    resume = checkpoint.endswith(":resume")
    if checkpoint == checkpoints[-1]:
        distributed.classifier_recipe = killing_recipe
    distributed.train(data, checkpoint.removesuffix(":resume"), spec, distributed.Processes(device="cpu"),
                      resume=resume)
torch.distributed.destroy_process_group()
"""


def _torchrun(script: Path, args: list[str], nproc: int, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "KILL_AT_STEP": str(kill_at), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)


def test_a_torchrun_run_killed_in_epoch_2_resumes_with_torchrun_to_the_uninterrupted_weights(make_tiny_dataset,
                                                                                              tmp_path, capsys):
    """Item 3 (and 4 under torchrun): rank 0 killed with SIGKILL in epoch 2 of a 2-process run; the same torchrun
    command with ``--resume`` continues it (each rank restores its own random state), giving the weights of an
    uninterrupted 2-process run; one process is refused with a message naming the torchrun command, so the two
    messages no longer send the user in a circle. (Exact equality also needs the model in its CPU memory format
    before DDP lays out its gradient buckets: see test_audit::test_ddp_training_on_two_processes_matches_one.)"""
    from segx_helpers.cli.main import main

    data = make_tiny_dataset(n=30, size=32)
    script = tmp_path / "train.py"
    script.write_text(KILLING_TRAIN)
    killed = _torchrun(script, [str(data), str(tmp_path / "whole.pt"), str(tmp_path / "cut.pt")], nproc=2,
                       kill_at=3)  # the uninterrupted run, then one killed at its third step (2 steps an epoch)
    assert killed.returncode != 0 and read_checkpoint(tmp_path / "whole.pt")["meta"]["finished"] is True
    assert last_checkpoint_path(tmp_path / "cut.pt").is_file(), killed.stdout[-2000:] + killed.stderr[-4000:]
    assert read_checkpoint(last_checkpoint_path(tmp_path / "cut.pt"))["training_state"]["epoch"] == 0

    assert main(_train_args(data, tmp_path / "cut.pt", "--resume")) == 2  # one process: refused, saying how
    err = capsys.readouterr().err
    assert "2 processes" in err and "torchrun --nproc_per_node 2" in err and "without torchrun" not in err

    resumed = _torchrun(script, [str(data), str(tmp_path / "cut.pt") + ":resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_checkpoint(tmp_path / "whole.pt"), read_checkpoint(tmp_path / "cut.pt")
    assert b["meta"]["finished"] is True and [r["epoch"] for r in b["meta"]["history"]] == [1, 2]
    assert _differing(a["state_dict"], b["state_dict"]) == []
    assert [r["train_loss"] for r in a["meta"]["history"]] == [r["train_loss"] for r in b["meta"]["history"]]
    assert not last_checkpoint_path(tmp_path / "cut.pt").exists()
