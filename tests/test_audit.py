"""``segx audit`` and ``segx train``: same results as the notebook path, 1 vs 2 processes (gloo on CPU)
identical, resume after an interruption byte-identical, refusal to mix inputs or to write into a
foreign folder, a plain image folder without labels, DDP training equal to one process."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from segx_helpers.cli.audit import AuditError, AuditOptions, run_audit, shard_paths
from segx_helpers.data.synthetic import SyntheticConfig, generate_synthetic_derm
from segx_helpers.data.torch_dataset import Normalization
from segx_helpers.models.networks import build_classifier, build_segmenter
from segx_helpers.models.checkpoints import save_checkpoint
from segx_helpers.models.training import predict_masks

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
CLASSES = ["nevus", "melanoma", "keratosis"]


@contextlib.contextmanager
def one_thread():
    """The subprocesses run with one torch thread; in-process reference runs do the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _classifier(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    meta = {"kind": "classifier", "arch": "resnet18", "task": "multiclass", "class_names": CLASSES, "in_channels": 3,
            "image_size": SIZE, "normalization": asdict(Normalization()), "thresholds": None}
    return save_checkpoint(path, build_classifier("resnet18", 3), meta, overwrite=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """24 synthetic dermoscopy images at 64 px, a random classifier, and a random segmenter whose
    threshold is set to the median probability (so its masks cover about half of each image)."""
    root = tmp_path_factory.mktemp("audit")
    generate_synthetic_derm(root / "data", SyntheticConfig(n_images=24, image_size=SIZE, seed=1), progress=False)
    _classifier(root / "classifier.pt")
    torch.manual_seed(1)
    segmenter = build_segmenter("resnet18", decoder_channels=(16, 8, 8, 8, 8)).eval()
    from segx_helpers.data.format import load_dataset
    from segx_helpers.data.torch_dataset import SegXDataset

    images = SegXDataset(load_dataset(root / "data"), None, 32, Normalization()).tensors()["image"]
    probe = predict_masks(segmenter, images, device="cpu")
    meta = {"kind": "segmenter", "arch": "Unet", "encoder": "resnet18", "decoder_channels": [16, 8, 8, 8, 8],
            "in_channels": 3, "image_size": 32, "normalization": asdict(Normalization()),
            "threshold": float(np.median(probe))}
    save_checkpoint(root / "segmenter.pt", segmenter, meta)
    return root


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    """The one-process audit with the default test options (both methods, 5 shards of 5 images)."""
    return _audit(_options(archive, tmp_path_factory.mktemp("reference") / "one"))


def _options(root: Path, out: Path, **changes) -> AuditOptions:
    values = dict(data=root / "data", classifier=root / "classifier.pt", masks=root / "data" / "masks", out=out,
                  methods=("gradcam", "gradient_shap"), nsamples=2, background=2, shard_size=5, batch_size=4,
                  device="cpu", progress=False)
    return AuditOptions(**{**values, **changes})


def _audit(options: AuditOptions):
    with one_thread():
        return run_audit(options)


@contextlib.contextmanager
def _argv(argv: list[str]):
    before = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] + args
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# ------------------------------------------------------------------------------ one analysis path

def test_audit_equals_the_notebook_path(archive, tmp_path):
    """One shard and one batch covering the test split: every column equals what the notebooks compute
    (split_tensors, mask_probabilities with the segmenter, explain_predictions, explanation_results)."""
    from segx_helpers.scores.analysis import binarise_masks
    from segx_helpers.models.checkpoints import load_trained, split_tensors
    from segx_helpers.data.format import load_dataset
    from segx_helpers.explain.api import RunOptions
    from segx_helpers.explain.gradient_shap import GradientShapOptions
    from segx_helpers.workflows.explanation_recipes import background_images, explain_predictions
    from segx_helpers.models.masks import mask_probabilities
    from segx_helpers.workflows.results import SplitLabels, explanation_results

    result = _audit(_options(archive, tmp_path / "out", masks=archive / "segmenter.pt", split="test", shard_size=64,
                             batch_size=32, nsamples=4, background=3))
    table = pd.read_parquet(result.table)

    with one_thread():
        data = load_dataset(archive / "data", check_files=False)
        classifier, segmenter = load_trained(archive / "classifier.pt", "classifier"), load_trained(archive / "segmenter.pt",
                                                                                                    "segmenter")
        test = split_tensors(data, "test", classifier.meta)
        order = np.argsort(test["image_id"], kind="stable")  # the audit sorts by id; the split is already sorted
        assert (order == np.arange(len(order))).all()
        predicted = binarise_masks(mask_probabilities(segmenter, data, "test", SIZE), segmenter.meta["threshold"])
        assert 0.2 < predicted.mean() < 0.8
        truth = test["mask"][:, 0].numpy() > 0.5
        frames = []
        for method, options in (("gradcam", None),
                                ("gradient_shap", GradientShapOptions(background_images(data, classifier.meta, 3, 0),
                                                                      nsamples=4))):
            e = explain_predictions(classifier, test["image"], method, options=options,
                                    run=RunOptions(progress=False, device="cpu"))
            labels = SplitLabels(test["image_id"], test["target"].numpy(), "multiclass", CLASSES)
            frames.append(explanation_results(e, labels, predicted, truth, test["has_mask"]).table)
    expected = pd.concat(frames, ignore_index=True)
    assert len(table) == len(expected) == 2 * len(test["image_id"])
    for column in expected.columns:
        if column == "image_index":
            continue
        a, b = table[column].to_numpy(), expected[column].to_numpy()
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=1e-6, atol=1e-7, err_msg=column)
        else:
            assert list(a) == list(b), column
    assert table["c_IoU"].gt(0).any() and table["original AUITC"].gt(0).any()
    assert set(table["split"]) == {"test"} and (table["label"] == [CLASSES[t] for t in test["target"].numpy()] * 2).all()


# ------------------------------------------------------------------------------ many processes

def test_two_processes_give_the_same_table_as_one(archive, reference, tmp_path):
    one = reference
    args = ["-m", "segx_helpers", "audit", "--data", str(archive / "data"), "--classifier", str(archive / "classifier.pt"),
            "--masks", str(archive / "data" / "masks"), "--out", str(tmp_path / "two"), "--method", "gradcam",
            "--method", "gradient_shap", "--nsamples", "2", "--background", "2", "--shard-size", "5",
            "--batch-size", "4", "--device", "cpu", "--no-progress"]
    done = _torchrun(args, nproc=2)
    assert "AUROC for incorrect predictions" in done.stdout
    first, second = pd.read_parquet(one.table), pd.read_parquet(tmp_path / "two" / "table.parquet")
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert (tmp_path / "two" / "table.parquet").read_bytes() == one.table.read_bytes()
    assert len(first) == 48 and first["image_id"].nunique() == 24
    # each shard written once, by rank k % 2; no duplicates, no padding
    markers = [json.loads(shard_paths(tmp_path / "two", k)["done"].read_text()) for k in range(5)]
    assert [m["rank"] for m in markers] == [0, 1, 0, 1, 0] and {m["world_size"] for m in markers} == {2}
    assert [tuple(m["images"]) for m in markers] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["invocations"][0]["backend"] == "gloo" and run["invocations"][0]["world_size"] == 2


# ------------------------------------------------------------------------------ resume, refusals

def test_interrupted_run_resumes_to_a_byte_identical_table(archive, reference, tmp_path):
    out = tmp_path / "resumed"
    first = _audit(_options(archive, out, max_shards=2))
    assert first.summary is None and first.table is None and not (out / "table.parquet").exists()
    assert first.done_now == [0, 1]
    # a run killed while writing shard 2 leaves a stray part without its marker, and a temporary file
    shard_paths(out, 2)["table"].write_bytes(b"half-written")
    (out / "shards" / ".shard-00003.parquet.99999999.deadbeef.partial").write_bytes(b"junk")
    second = _audit(_options(archive, out))
    assert second.done_before == 2 and second.done_now == [2, 3, 4]
    assert (out / "table.parquet").read_bytes() == reference.table.read_bytes()
    assert not list((out / "shards").glob(".*"))
    # a damaged finished part is recomputed, nothing else; the table stays byte-identical
    part = shard_paths(out, 1)["table"]
    part.write_bytes(part.read_bytes()[:-10])
    assert _audit(_options(archive, out)).done_now == [1]
    assert (out / "table.parquet").read_bytes() == reference.table.read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 24 and summary["predictions"] == {"gradcam": 24, "gradient_shap": 24}
    assert len(json.loads((out / "run.json").read_text())["invocations"]) == 3


def test_changed_inputs_are_refused_not_mixed(archive, tmp_path):
    out = tmp_path / "out"
    _audit(_options(archive, out, methods=("gradcam",), max_shards=1))
    before = sorted(p.name for p in (out / "shards").iterdir())
    with pytest.raises(AuditError, match=r"\bp: before 5.0, now 2.5"):
        _audit(_options(archive, out, methods=("gradcam",), p=2.5))
    with pytest.raises(AuditError, match="methods"):
        _audit(_options(archive, out, methods=("gradcam", "gradient_shap")))
    with pytest.raises(AuditError, match="masks"):
        _audit(_options(archive, out, methods=("gradcam",), masks=archive / "segmenter.pt"))
    other = tmp_path / "classifier.pt"
    shutil.copy(archive / "classifier.pt", other)
    _audit(_options(archive, out, methods=("gradcam",), classifier=other, max_shards=1))  # same bytes elsewhere: fine
    _classifier(other, seed=5)  # retrained: other weights
    with pytest.raises(AuditError, match="classifier_sha256"):
        _audit(_options(archive, out, methods=("gradcam",), classifier=other))
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(set(before) | {
        "shard-00001.json", "shard-00001.npz", "shard-00001.parquet"})
    # a new folder for the new inputs works
    assert _audit(_options(archive, tmp_path / "new", methods=("gradcam",), classifier=other, max_shards=1)).done_now == [0]


def test_a_foreign_folder_is_never_written_into(archive, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(AuditError, match="not empty"):
        _audit(_options(archive, out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    (tmp_path / "file").write_text("x")
    with pytest.raises(AuditError, match="not a folder"):
        _audit(_options(archive, tmp_path / "file"))
    from segx_helpers.cli.main import main

    assert main(["audit", "--data", str(archive / "data"), "--classifier", str(archive / "classifier.pt"), "--masks",
                 str(archive / "data" / "masks"), "--out", str(out), "--device", "cpu", "--no-progress"]) == 2


# ------------------------------------------------------------------------------ a plain folder of images

def test_plain_image_folder_maps_open_with_numpy(archive, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(archive / "data" / "images", folder)
    for name in ("derm_00003.png", "derm_00017.png"):
        (folder / name).rename(folder / name.replace("derm_", "zz_"))  # ids sort by name, not by number
    masks = tmp_path / "masks"
    shutil.copytree(archive / "data" / "masks", masks)
    for name in ("derm_00003.png", "derm_00017.png"):
        (masks / name).rename(masks / name.replace("derm_", "zz_"))
    result = _audit(_options(archive, tmp_path / "out", data=folder, masks=masks, methods=("gradcam",), shard_size=7))
    table = pd.read_parquet(result.table)
    assert list(table["image_id"]) == sorted(table["image_id"]) and table["image_id"].iloc[-1] == "zz_00017"
    assert table["true_label"].isna().all() and table["correct"].isna().all() and table["label"].isna().all()
    assert not any(c.startswith("original") for c in table.columns)  # no ground truth, no localisation
    assert set(table["split"]) == {"archive"} and result.summary["segu_auroc_incorrect"] is None
    # maps: plain numpy, aligned with the rows; rescoring the stored maps gives the table's SegU
    from segx_helpers.scores.analysis import AnalysisOptions, analyse

    for shard, part in table.groupby("shard"):
        with np.load(shard_paths(tmp_path / "out", shard)["maps"], allow_pickle=False) as z:
            maps, mask_row = z["maps"], z["mask_row"]
            assert list(z["image_id"]) == list(part["image_id"]) and list(z["class_index"]) == list(part["class_index"])
            rescored = analyse(maps[part["map_row"]], z["predicted_masks"], image_index=mask_row[part["map_row"]],
                               options=AnalysisOptions(localisation=False))
        np.testing.assert_allclose(rescored["c_AUITC"], part["c_AUITC"], rtol=1e-9)
        np.testing.assert_allclose(rescored["c_IoU"], part["c_IoU"], rtol=1e-9)


# ------------------------------------------------------------------------------ training

DDP_SCRIPT = '''
import json, sys, torch
from pathlib import Path
from torch import nn
from segx_helpers.cli import distributed
from segx_helpers.models.training import CheckpointPlan, TrainConfig

torch.set_num_threads(1)
out = Path(sys.argv[1])

class Items(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return {"image": self.x[i], "target": self.y[i]}

ctx = distributed.setup("cpu")
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))
val = Items(16, 1)
loss_fn = nn.CrossEntropyLoss()
def validate(m):
    with torch.no_grad():
        return {"val_score": -float(loss_fn(m(val.x), val.y))}
loader = distributed.distributed_loader(Items(64, 0), 16, ctx, shuffle=True, seed=3)
config = TrainConfig(epochs=3, lr=1e-2, monitor="val_score", patience=10)  # amp: channels_last, as segx train
history = distributed.ddp_fit(model, loss_fn, loader, validate, config, ctx,
                              CheckpointPlan(path=out / "model.pt", meta={"note": "ddp"}))
if ctx.is_main:
    torch.save(model.state_dict(), out / "final.pt")
    (out / "history.json").write_text(json.dumps(history.records))
distributed.cleanup(ctx)
'''


def test_ddp_training_on_two_processes_matches_one(tmp_path):
    """Same global batches (the same DistributedSampler with 1 or 2 replicas), no BatchNorm: DDP averages
    the two half-batch mean gradients, which equals the full-batch mean gradient up to float32
    summation order (relative error ~1e-7 per step: measured 5e-8 in the loss, 2e-7 in the weights
    after 12 AdamW steps at lr 1e-2). The tolerance, 1e-5 relative in the loss and 1e-5 absolute in
    the weights, leaves a factor of 50 for other CPUs; a wrong batch split, a missing gradient
    all-reduce or a rank-local loss changes the loss by ~1e-2 (rank 0's half-batch loss differs from
    the global one by 1.4 %). With ``amp`` (the default, as ``segx train`` runs) the model trains in channels_last
    on the CPU: ``ddp_fit`` converts it before DDP lays out its gradient buckets (issue 35: converted after, the
    first step's convolution gradients came back scrambled, and two processes no longer matched one)."""
    import runpy

    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        out.mkdir()
        if nproc == 1:  # in this process: no torchrun variables, so no process group
            with one_thread(), _argv([str(script), str(out)]):
                runpy.run_path(str(script), run_name="__main__")
        else:
            _torchrun([str(script), str(out)], nproc=nproc)
        results[nproc] = (json.loads((out / "history.json").read_text()), torch.load(out / "final.pt"))
        assert sorted(p.name for p in out.iterdir()) == ["final.pt", "history.json", "model.pt", "model.pt.last.pt"]
    (h1, w1), (h2, w2) = results[1], results[2]
    assert len(h1) == len(h2) == 3
    for a, b in zip(h1, h2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_score"] == pytest.approx(b["val_score"], rel=1e-5)
    assert h1[0]["train_loss"] != pytest.approx(h1[-1]["train_loss"], rel=1e-3)  # it did train
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=0, atol=1e-5)
    from segx_helpers.models.checkpoints import read_checkpoint

    assert set(read_checkpoint(tmp_path / "p2" / "model.pt")["state_dict"]) == set(w1)  # plain keys, no "module."


def test_segx_train_writes_a_loadable_checkpoint(make_tiny_dataset, tmp_path):
    from segx_helpers.models.checkpoints import load_trained
    from segx_helpers.cli.main import main

    data = make_tiny_dataset(n=30, size=32)
    args = ["train", "classifier", "--data", str(data), "--checkpoint", str(tmp_path / "c.pt"), "--image-size", "32",
            "--epochs", "1", "--batch-size", "8", "--max-batches-per-epoch", "2", "--device", "cpu"]
    with one_thread():
        assert main(args) == 0
        trained = load_trained(tmp_path / "c.pt", "classifier")
    assert trained.meta["finished"] and trained.meta["fingerprint"]["world_size"] == 1
    assert trained.meta["class_names"] == ["a", "b", "c"] and len(trained.history) == 1
    assert main(args) == 2  # an existing checkpoint is not replaced without --overwrite


# ------------------------------------------------------------------------------ bad inputs, refused up front

def _cli_audit(archive: Path, out: Path, capsys, **changes) -> tuple[int, str]:
    """``segx audit`` with the test archive (gradcam, the dataset's masks); returns (status, stderr)."""
    from segx_helpers.cli.main import main

    values = {"--data": archive / "data", "--classifier": archive / "classifier.pt", "--masks": archive / "data" / "masks",
              "--out": out, "--device": "cpu", "--shard-size": 8, **changes}
    with one_thread():
        status = main(["audit", "--no-progress"] + [str(x) for kv in values.items() for x in kv])
    return status, capsys.readouterr().err


def test_checkpoint_of_an_unfinished_training_run_is_refused(archive, tmp_path, capsys):
    from segx_helpers.models.checkpoints import read_checkpoint

    raw = read_checkpoint(archive / "classifier.pt")
    model = build_classifier("resnet18", 3)
    model.load_state_dict(raw["state_dict"])
    save_checkpoint(tmp_path / "interrupted.pt", model, {**raw["meta"], "finished": False})
    status, err = _cli_audit(archive, tmp_path / "out", capsys, **{"--classifier": tmp_path / "interrupted.pt"})
    assert status == 2 and "unfinished training run" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_maps_damaged_without_changing_their_size_are_redone(archive, tmp_path):
    out = tmp_path / "out"
    _audit(_options(archive, out, methods=("gradcam",)))
    maps = shard_paths(out, 1)["maps"]
    data = bytearray(maps.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    maps.write_bytes(bytes(data))
    assert _audit(_options(archive, out, methods=("gradcam",))).done_now == [1]
    with np.load(maps, allow_pickle=False) as z:
        assert z["maps"].shape[0] == 5  # readable again (a damaged file fails its CRC-32 here)


def test_changed_masks_of_the_same_byte_size_are_refused(archive, tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(archive / "data" / "masks", masks)
    out = tmp_path / "out"
    _audit(_options(archive, out, methods=("gradcam",), masks=masks, max_shards=1))
    one = masks / "derm_00007.png"
    data = bytearray(one.read_bytes())
    data[-20] ^= 0xFF  # same size, other content
    one.write_bytes(bytes(data))
    with pytest.raises(AuditError, match=r"masks\.files_sha256"):
        _audit(_options(archive, out, methods=("gradcam",), masks=masks))


def test_images_and_ground_truth_masks_changed_after_a_partial_run_are_refused(archive, tmp_path):
    """Issue 35 item 6: ``run.json`` holds a SHA-256 of every image's and every ground-truth mask's bytes (streamed,
    one file at a time), so editing one image and two ground-truth masks between ``--max-shards 1`` and the rerun is
    refused instead of mixing old and new data in one table."""
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(archive / "data", data)
    out = tmp_path / "out"
    masks = archive / "data" / "masks"  # the mask source stays as it is: only the dataset changes
    _audit(_options(archive, out, methods=("gradcam",), data=data, masks=masks, max_shards=1))
    image = data / "images" / "derm_00021.png"
    pixels = np.array(Image.open(image))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    for name in ("derm_00003.png", "derm_00020.png"):
        truth = np.array(Image.open(data / "masks" / name))
        Image.fromarray(np.where(truth > 0, 0, 255).astype(np.uint8)).save(data / "masks" / name)
    with pytest.raises(AuditError, match=r"holds results of other inputs.*data\.images_sha256: before .*"
                                         r"data\.true_masks_sha256: before"):
        _audit(_options(archive, out, methods=("gradcam",), data=data, masks=masks))
    assert len(list((out / "shards").glob("*.json"))) == 1 and not (out / "table.parquet").exists()


@pytest.mark.parametrize("leftover", ["partial run.json", "shards folder", "both"])
def test_a_run_json_that_was_never_completely_written_does_not_block_the_rerun(archive, tmp_path, capsys, monkeypatch,
                                                                              leftover):
    """Issue 35 item 7: a full disk (or kill -9) while ``run.json`` is first written leaves the lock file, an empty
    ``shards/`` folder or a ``.run.json.<pid>.*.partial`` file; the same command then works, as the message said
    (before: refused for ever, "not empty and holds no run.json")."""
    from segx_helpers.cli import audit

    out = tmp_path / "out"
    if leftover in ("shards folder", "both"):
        real_write_json = audit.write_json

        def full_disk(path, *args, **kwargs):
            if Path(path).name == audit.RUN_FILE:
                raise OSError(28, "No space left on device")
            return real_write_json(path, *args, **kwargs)

        monkeypatch.setattr(audit, "write_json", full_disk)
        status, err = _cli_audit(archive, out, capsys, **{"--max-shards": 1})
        assert status == 1 and "No space left on device" in err and "run the same command again" in err
        monkeypatch.undo()
        (out / "shards").mkdir(exist_ok=True)  # as an older version left it: shards/ was made before run.json
    if leftover in ("partial run.json", "both"):
        out.mkdir(exist_ok=True)
        (out / audit.LOCK_FILE).touch()
        (out / ".run.json.999999999.deadbeef.partial").write_text('{"format": "segx-audit-v1", "inp')  # killed
    status, err = _cli_audit(archive, out, capsys, **{"--max-shards": 1})
    assert status == 0, err
    assert json.loads((out / "run.json").read_text())["format"] == audit.FORMAT
    assert not list(out.glob(".run.json.*"))
    (out / "notes.txt").write_text("a user's file")  # a folder holding anything else is still refused
    (out / "run.json").unlink()
    status, err = _cli_audit(archive, out, capsys)
    assert status == 2 and "holds no run.json" in err


def test_mask_folder_problems_are_refused_before_anything_is_written(archive, tmp_path, capsys):
    from PIL import Image

    masks = tmp_path / "masks"
    shutil.copytree(archive / "data" / "masks", masks)
    (masks / "derm_00019.png").unlink()
    status, err = _cli_audit(archive, tmp_path / "out", capsys, **{"--masks": masks})
    assert status == 2 and "lacks the masks of 1 of 24 images" in err and "derm_00019.png" in err
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "derm_00019.png")
    status, err = _cli_audit(archive, tmp_path / "out", capsys, **{"--masks": masks})
    assert status == 2 and "derm_00019.png has size 32x32 (WxH) but its image" in err
    assert not (tmp_path / "out").exists()


def test_segmenter_for_other_images_is_refused_before_run_json_is_written(archive, tmp_path, capsys):
    segmenter = build_segmenter("resnet18", decoder_channels=(16, 8, 8, 8, 8), in_channels=1)
    meta = {"kind": "segmenter", "arch": "Unet", "encoder": "resnet18", "decoder_channels": [16, 8, 8, 8, 8],
            "in_channels": 1, "image_size": 32, "normalization": asdict(Normalization.for_channels(1)),
            "threshold": 0.5, "dataset": "lungs"}
    save_checkpoint(tmp_path / "lungs.pt", segmenter, meta)
    status, err = _cli_audit(archive, tmp_path / "out", capsys, **{"--masks": tmp_path / "lungs.pt"})
    assert status == 2 and "takes 1-channel images" in err and "'lungs'" in err
    assert not (tmp_path / "out").exists()
    status, err = _cli_audit(archive, tmp_path / "out", capsys, **{"--max-shards": 1})  # the corrected command runs
    assert status == 0, err


@pytest.mark.parametrize("record", [[1, 2], {"format": "segx-audit-v1", "invocations": [{"versions": {}}]},
                                    {"format": "segx-audit-v1", "inputs": {}, "invocations": []},
                                    {"format": "segx-audit-v1", "inputs": {}, "invocations": [3]}])
def test_garbled_run_json_is_a_clear_refusal(archive, tmp_path, record):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(AuditError, match="run.json (is damaged|was not written by segx audit)"):
        _audit(_options(archive, out, methods=("gradcam",)))
    assert json.loads((out / "run.json").read_text()) == record


def test_a_file_that_is_no_checkpoint_gives_one_line_without_unsafe_advice(archive, tmp_path, capsys):
    for name, content in (("notes.pt", b"just some notes\n"), ("random.pt", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(content)
        status, err = _cli_audit(archive, tmp_path / "out", capsys, **{"--classifier": tmp_path / name})
        assert status == 2 and len(err.strip().splitlines()) == 1 and name in err
        assert "weights_only=False" not in err.replace(" ", "") and "\x1b" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_a_gpu_is_one_line(archive, tmp_path, capsys):
    status, err = _cli_audit(archive, tmp_path / "out", capsys, **{"--device": "cuda"})
    assert status == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
    status, err = _cli_audit(archive, tmp_path / "out", capsys, **{"--device": "tpu"})
    assert status == 2 and "unknown device 'tpu'" in err


def test_a_second_audit_of_the_same_folder_is_refused_while_the_first_runs(archive, tmp_path):
    from segx_helpers.cli.audit import output_lock

    out = tmp_path / "out"
    with output_lock(out):  # the first audit holds the folder
        with pytest.raises(AuditError, match="another segx audit is writing to"):
            _audit(_options(archive, out, methods=("gradcam",)))
        assert [p.name for p in out.iterdir()] == [".segx-audit.lock"]
    assert _audit(_options(archive, out, methods=("gradcam",), max_shards=1)).done_now == [0]  # free again


def test_a_full_disk_is_one_line_and_the_next_run_resumes(archive, tmp_path, capsys, monkeypatch):
    from segx_helpers.cli import audit

    out = tmp_path / "out"
    assert _cli_audit(archive, out, capsys, **{"--max-shards": 1})[0] == 0

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "merge", full)
    status, err = _cli_audit(archive, out, capsys)
    assert status == 1 and "No space left on device" in err and "run the same command again" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    status, err = _cli_audit(archive, out, capsys)
    assert status == 0
    table = pd.read_parquet(out / "table.parquet")  # every image once (gradcam, one predicted class), in id order
    assert len(table) == table["image_id"].nunique() == 24 and list(table["image_id"]) == sorted(table["image_id"])


def test_a_filesystem_without_locks_warns_and_runs(archive, tmp_path, monkeypatch):
    import fcntl

    def no_locks(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .*run one segx audit at a time"):
        assert _audit(_options(archive, tmp_path / "out", methods=("gradcam",), max_shards=1)).done_now == [0]


def test_the_audit_summary_says_whether_the_classifier_decides(reference):
    """Issue 32: the table keeps each image's probabilities and true mask area, and the summary's decides check is
    computed from them (one row per image, the checkpoint's cut-offs); the untrained test classifier does not decide,
    so the summary and its printed form say the SegU numbers are not a valid test."""
    from segx_helpers.cli.audit import format_summary, probability_columns

    table = pd.read_parquet(reference.table).drop_duplicates("image_id")
    probs = table[probability_columns(CLASSES)].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert ((table["true mask area"] > 0) & (table["true mask area"] < 1)).all()
    classifier = reference.summary["classifier"]
    shares = pd.Series(probs.argmax(axis=1)).value_counts(normalize=True)
    assert classifier["predicted_share"] == pytest.approx({c: shares.get(i, 0.0) for i, c in enumerate(CLASSES)})
    assert "true mask area" in classifier["baseline_auroc"]
    assert classifier["decides"] is False and "not a valid test of SegU" in format_summary(reference.summary)
