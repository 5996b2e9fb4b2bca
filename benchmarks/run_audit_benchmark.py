"""``segx audit`` throughput and memory against the archive size and the number of processes.

    python benchmarks/run_audit_benchmark.py [--sizes 1000 10000] [--processes 1 2] [--image-size 128]
                                             [--method gradcam] [--device cpu] [--work DIR]
    python benchmarks/run_audit_benchmark.py --runs 1000:1 1000:2 10000:1 --paired-baseline

On the synthetic-derm set at ``--image-size`` px (generated once into ``--work``, default a folder in the system's temp dir; an archive of ``N``
images is the first ``N`` ids, linked into a dataset folder of its own) with a ResNet-18 classifier
(random weights: speed does not depend on them) and the dataset's masks as the mask source:

1. The notebook path, in this process with one torch thread, on the first ``--baseline-images``
   images: load them as tensors (``SegXDataset.tensors()``, as ``split_tensors`` does), explain
   (``explain``) and score (``explanation_results``). Its seconds per image are the reference; with
   ``--paired-baseline`` it is measured again right before every audit run, and each run is compared
   with its own reference (on a shared machine the load changes between runs).
2. ``segx audit`` for every size and process count (or the ``--runs SIZE:PROCESSES`` pairs), as a
   subprocess (``torchrun --nproc_per_node P`` for ``P > 1``), one torch thread per process
   (``OMP_NUM_THREADS=1``). Reported: wall time of the command (start-up included), images/s over the
   shards (what the audit's summary measures, start-up excluded), that throughput relative to the
   notebook path, the peak resident memory of each process (``ru_maxrss``) after its first shard,
   after its last shard and at the end (rank 0, after merging the table and summarising), and the
   machine's load average (1 min) before and after the run.

Memory should not grow with ``N`` (images stream through a DataLoader, one shard of maps is held at
a time, the merge streams the parts): compare the peak RSS after the first and the last shard, and
between sizes. Prints a table and writes ``benchmarks/results/audit_benchmark.{csv,json}``. No timing
targets are asserted anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent


def make_archive(work: Path, n_max: int, image_size: int) -> Path:
    from segx_helpers.data.synthetic import SyntheticConfig, generate_synthetic_derm

    source = work / f"derm-{n_max}-{image_size}"
    if not (source / "dataset.json").is_file():
        generate_synthetic_derm(source, SyntheticConfig(n_images=n_max, image_size=image_size), progress=True)
    return source


def subset(source: Path, n: int, work: Path) -> Path:
    """A dataset folder with the first ``n`` ids of ``source`` (files linked, CSVs filtered)."""
    target = work / f"{source.name}-first-{n}"
    if (target / "dataset.json").is_file():
        return target
    tmp = work / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    labels = pd.read_csv(source / "labels.csv", dtype={"image_id": str}).sort_values("image_id").head(n)
    splits = pd.read_csv(source / "splits.csv", dtype={"image_id": str})
    splits = splits[splits["image_id"].isin(labels["image_id"])]
    for image_id in labels["image_id"]:
        os.symlink((source / "images" / f"{image_id}.png").resolve(), tmp / "images" / f"{image_id}.png")
        mask = source / "masks" / f"{image_id}.png"
        if mask.is_file():
            os.symlink(mask.resolve(), tmp / "masks" / f"{image_id}.png")
    labels.to_csv(tmp / "labels.csv", index=False)
    splits.to_csv(tmp / "splits.csv", index=False)
    shutil.copy(source / "dataset.json", tmp / "dataset.json")
    os.replace(tmp, target)
    return target


def make_classifier(work: Path, image_size: int) -> Path:
    from segx_helpers.data.torch_dataset import Normalization
    from segx_helpers.models.networks import build_classifier
    from segx_helpers.models.checkpoints import save_checkpoint

    path = work / f"classifier-{image_size}.pt"
    if not path.is_file():
        torch.manual_seed(0)
        meta = {"kind": "classifier", "arch": "resnet18", "task": "multiclass",
                "class_names": ["nevus", "melanoma", "keratosis"], "in_channels": 3, "image_size": image_size,
                "normalization": asdict(Normalization()), "thresholds": None}
        save_checkpoint(path, build_classifier("resnet18", 3), meta)
    return path


def notebook_path(data_dir: Path, classifier: Path, n: int, method: str, batch_size: int, device: str) -> dict:
    """Seconds per image of the notebooks' calls on the first ``n`` images (one torch thread)."""
    from segx_helpers.scores.analysis import AnalysisOptions, binarise_masks
    from segx_helpers.models.checkpoints import load_trained, split_tensors
    from segx_helpers.data.format import LoadedDataset, load_dataset, read_mask
    from segx_helpers.explain.api import RunOptions, explain
    from segx_helpers.explain.targets import TargetChoice
    from segx_helpers.workflows.results import SplitLabels, explanation_results

    load_before = load_average()
    torch.set_num_threads(1)
    trained = load_trained(classifier, "classifier")
    data = load_dataset(data_dir, check_files=False)
    table = data.table.sort_values("image_id").head(n).assign(split="test")
    data = LoadedDataset(data.root, data.info, table.reset_index(drop=True))
    started = time.perf_counter()
    tensors = split_tensors(data, "test", trained.meta)
    predicted = binarise_masks(np.stack([read_mask(data_dir / "masks" / f"{i}.png") for i in tensors["image_id"]]
                                        ).astype(np.float32), 0.5)
    truth = tensors["mask"][:, 0].numpy() > 0.5
    e = explain(trained.model, tensors["image"], None, method, explained=TargetChoice(task="multiclass"),
                run=RunOptions(batch_size=batch_size, progress=False, device=device))
    labels = SplitLabels(tensors["image_id"], tensors["target"].numpy(), "multiclass", trained.meta["class_names"])
    explanation_results(e, labels, predicted, truth, tensors["has_mask"], options=AnalysisOptions(device=device))
    seconds = time.perf_counter() - started
    return {"run": "notebook path (in process)", "processes": 1, "images": n, "wall_s": round(seconds, 2),
            "images_per_s": round(n / seconds, 2), "load_before": load_before, "load_after": load_average()}


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def audit(data_dir: Path, classifier: Path, out: Path, processes: int, method: str, batch_size: int, shard_size: int,
          device: str) -> dict:
    args = ["-m", "segx_helpers", "audit", "--data", str(data_dir), "--classifier", str(classifier), "--masks",
            str(data_dir / "masks"), "--out", str(out), "--method", method, "--batch-size", str(batch_size),
            "--shard-size", str(shard_size), "--device", device, "--no-progress"]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000)] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    shutil.rmtree(out, ignore_errors=True)  # our own scratch folder under --work
    load_before = load_average()
    started = time.perf_counter()
    done = subprocess.run([sys.executable] + args, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"audit failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    markers = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("shard-*.json"))]
    per_rank: dict[int, list[float]] = {}  # peak RSS after each of a rank's shards, in shard order
    for marker in markers:
        per_rank.setdefault(marker["rank"], []).append(marker["peak_rss_mb"])
    peaks = {rank: max(values) for rank, values in per_rank.items()}
    peaks[0] = max(peaks.get(0, 0.0), summary["peak_rss_mb_rank0"])
    table_mb = (out / "table.parquet").stat().st_size / 1e6
    maps_mb = sum(p.stat().st_size for p in (out / "shards").glob("*.npz")) / 1e6
    return {"run": "segx audit", "processes": processes, "images": summary["images"], "shards": len(markers),
            "wall_s": round(wall, 2), "images_per_s": summary["images_per_second"],
            "rss_first_shard_mb": max(values[0] for values in per_rank.values()),
            "rss_last_shard_mb": max(values[-1] for values in per_rank.values()),
            "peak_rss_mb_per_process": max(peaks.values()), "table_mb": round(table_mb, 2),
            "maps_mb": round(maps_mb, 1), "load_before": load_before, "load_after": load_average()}


def parse_runs(items: list[str]) -> list[tuple[int, int]]:
    """``["1000:1", "10000:2"]`` -> ``[(1000, 1), (10000, 2)]``; a malformed item is an argparse error."""
    runs = []
    for item in items:
        size, sep, processes = item.partition(":")
        if not (sep and size.isdigit() and processes.isdigit() and int(size) > 0 and int(processes) > 0):
            raise argparse.ArgumentTypeError(f"--runs expects SIZE:PROCESSES pairs of positive integers, got {item!r}")
        runs.append((int(size), int(processes)))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", nargs="+", default=None, metavar="SIZE:PROCESSES",
                        help="run these (size, processes) pairs instead of every size with every process count, "
                             "e.g. 1000:1 1000:2 10000:1")
    parser.add_argument("--paired-baseline", action="store_true",
                        help="measure the notebook path again before every audit run and compare each run with it")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--baseline-images", type=int, default=256)
    parser.add_argument("--generate", type=int, default=None,
                        help="images to generate (default the largest size; reuse a bigger set from an earlier run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "segx-audit-benchmark")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    try:
        runs = parse_runs(args.runs) if args.runs else [(n, p) for n in sorted(args.sizes) for p in args.processes]
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    sizes = sorted({n for n, _ in runs})

    args.work.mkdir(parents=True, exist_ok=True)
    source = make_archive(args.work, max(args.generate or 0, max(sizes)), args.image_size)
    classifier = make_classifier(args.work, args.image_size)
    baseline_n = min(args.baseline_images, max(sizes))

    def baseline() -> dict:
        rows.append(notebook_path(source, classifier, baseline_n, args.method, args.batch_size, args.device))
        print(rows[-1], flush=True)
        return rows[-1]

    rows: list[dict] = []
    reference = baseline()
    for n, processes in runs:
        data_dir = subset(source, n, args.work)
        if args.paired_baseline and rows[-1] is not reference:
            reference = baseline()
        row = audit(data_dir, classifier, args.work / f"audit-{n}-{processes}", processes, args.method,
                    args.batch_size, args.shard_size, args.device)
        row["vs_notebook_path"] = round(row["images_per_s"] / reference["images_per_s"], 3)
        rows.append(row)
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(cpu_count=os.cpu_count(), torch=torch.__version__,
                    device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "audit_benchmark.csv", index=False)
    (args.out / "audit_benchmark.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
