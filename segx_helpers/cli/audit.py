"""``segx audit``: SegX and SegU over a whole image archive, streamed, sharded, resumable, on 1..N processes.

:func:`run_audit` with :class:`AuditOptions` is what ``segx audit`` (``segx audit --help``) calls: every prediction is
explained, its mask taken from a segmenter checkpoint or a mask folder, and scored by
:func:`segx_helpers.workflows.results.explanation_results`. The output folder, the shard and resume rules, the
refusals and running under torchrun: docs/audit.md.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata as md
import json
import platform
import re
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from segx_helpers import __version__
from segx_helpers.cli import distributed
import segx_helpers.explain.api  # noqa: F401 (importing it registers the built-in methods)
from segx_helpers.explain.api import RunOptions, explain
from segx_helpers.explain.gradient_shap import GradientShapOptions
from segx_helpers.explain.targets import TargetChoice
from segx_helpers.explain.registry import method_names
from segx_helpers.models.checkpoints import load_trained, require_finished_run
from segx_helpers.data.format import IMAGE_SUFFIXES, DatasetInfo, LoadedDataset, image_size, load_dataset, read_mask
from segx_helpers.data.torch_dataset import Normalization, SegXDataset
from segx_helpers.data.io import atomic_path, check_safe_id, write_json
from segx_helpers.models.training import predict_masks
from segx_helpers.scores.analysis import AnalysisOptions, binarise_masks, score_columns
from segx_helpers.scores.metrics import Baseline, decides_check
from segx_helpers.scores.selective import separation_table
from segx_helpers.workflows.explanation_recipes import background_images
from segx_helpers.workflows.results import SplitLabels, explanation_results

FORMAT = "segx-audit-v1"
RUN_FILE = "run.json"
TABLE_FILE = "table.parquet"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".segx-audit.lock"
SHARDS = "shards"
MAPS_DTYPES = ("float32", "float16", "none")


class AuditError(RuntimeError):
    """The audit cannot run as asked (a foreign output folder, a mismatch with earlier results, bad inputs)."""


@dataclass
class AuditOptions:
    """Everything ``segx audit`` takes; see docs/audit.md and ``segx audit --help``."""

    data: str | Path
    classifier: str | Path
    masks: str | Path
    out: str | Path
    methods: Sequence[str] = ("gradcam",)
    split: str = "all"
    nsamples: int = 50
    background: int = 50
    p: float = 5.0
    batch_size: int = 32
    shard_size: int = 256
    seed: int = 0
    maps: str = "float32"
    localisation: bool = True
    device: str | None = None
    num_workers: int = 0
    max_shards: int | None = None
    progress: bool = True
    timeout_minutes: float = 60.0

    def __post_init__(self) -> None:
        self.methods = tuple(dict.fromkeys(self.methods))
        problems = [f"unknown method {m!r} (choose from {method_names()})" for m in self.methods
                    if m not in method_names()]
        if not self.methods:
            problems.append("give at least one method")
        if self.split not in ("all", "train", "val", "test"):
            problems.append(f"split must be all, train, val or test, got {self.split!r}")
        for name in ("nsamples", "background", "batch_size", "shard_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 < float(self.p) <= 100:
            problems.append(f"p must be in (0, 100], got {self.p}")
        if self.maps not in MAPS_DTYPES:
            problems.append(f"maps must be one of {MAPS_DTYPES}, got {self.maps!r}")
        if self.max_shards is not None and self.max_shards < 1:
            problems.append(f"max_shards must be None or positive, got {self.max_shards}")
        if problems:
            raise ValueError("audit options: " + "; ".join(problems))


# ------------------------------------------------------------------------------ inputs

@dataclass
class Archive:
    """The images to audit, sorted by id, as a :class:`LoadedDataset` that :class:`SegXDataset` reads;
    ``full`` is the whole dataset (for the Gradient SHAP background) when the input is a dataset."""

    data: LoadedDataset
    kind: str
    labels_known: bool
    full: LoadedDataset | None = None

    def __len__(self) -> int:
        return len(self.data.table)

    @property
    def image_ids(self) -> list[str]:
        return self.data.table["image_id"].tolist()


def open_archive(path: str | Path, meta: dict, split: str = "all") -> Archive:
    """A dataset folder (with ``dataset.json``) or a plain folder of images, for a classifier whose
    checkpoint metadata is ``meta`` (task, class names and channels must agree with a dataset)."""
    path = Path(path)
    if not path.is_dir():
        raise AuditError(f"{path} is not a folder: give a dataset folder or a folder of images")
    if (path / "dataset.json").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # splits lacking a class: irrelevant here
            full = load_dataset(path, check_files=False)
        differ = [f"{name}: dataset {a!r}, classifier {b!r}" for name, a, b in (
            ("task", full.info.task, meta["task"]), ("class_names", list(full.info.class_names), list(meta["class_names"])),
            ("channels", full.info.channels, meta["in_channels"])) if a != b]
        if differ:
            raise AuditError(f"the classifier does not fit {path} (" + "; ".join(differ) + ")")
        table = full.table if split == "all" else full.split(split)
        table = table.sort_values("image_id", kind="stable").reset_index(drop=True)
        return Archive(LoadedDataset(full.root, full.info, table), "dataset", True, full)
    if split != "all":
        raise AuditError(f"{path} is a plain folder of images (no dataset.json): it has no {split!r} split")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AuditError(f"{path} holds no dataset.json and no {'/'.join(IMAGE_SUFFIXES)} images")
    ids = [check_safe_id(p.stem) for p in files]
    if len(set(ids)) != len(ids):
        twins = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise AuditError(f"{path}: several files share an id (the file name without its suffix): {twins}")
    classes = list(meta["class_names"])
    table = pd.DataFrame({"image_id": ids, "split": "archive", "image_path": [str(p) for p in files],
                          "mask_path": pd.Series([None] * len(ids), dtype=object)})
    if meta["task"] == "multiclass":
        table["label"], table["target"] = classes[0], 0  # unknown: placeholders the table never shows
    else:
        for name in classes:
            table[name] = 0
    info = DatasetInfo(name=path.name or "archive", modality="", task=meta["task"], class_names=classes,
                       mask_description="", channels=int(meta["in_channels"]))
    table = table.sort_values("image_id", kind="stable").reset_index(drop=True)
    return Archive(LoadedDataset(path, info, table), "folder", False)


@dataclass
class MaskSource:
    """A segmenter checkpoint (``trained``) or a folder of ``<id>.png`` masks (``folder``)."""

    kind: str
    trained: object = None
    folder: Path | None = None

    @property
    def threshold(self) -> float:
        return float(self.trained.meta["threshold"]) if self.kind == "segmenter" else 0.5


_RESUME_HINT = ("Resume its training with `segx train ... --resume` (the same arguments) and audit the finished "
                "checkpoint.")


def open_masks(path: str | Path) -> MaskSource:
    path = Path(path)
    if path.is_dir():
        return MaskSource("folder", folder=path)
    if path.is_file():
        trained = load_trained(path, "segmenter")
        require_finished_run(path, trained.meta, _RESUME_HINT)
        return MaskSource("segmenter", trained=trained)
    raise AuditError(f"mask source {path} not found: give a segmenter checkpoint or a folder of <id>.png masks")


def check_mask_source(masks: MaskSource, archive: Archive, path: Path) -> None:
    """Refuse, before anything is written, a mask source that cannot serve ``archive``: a segmenter
    taking another number of channels than the images have, or a mask folder lacking the mask of an
    image or holding one of another size than its image (as the dataset validator refuses it)."""
    channels = archive.data.info.channels
    if masks.kind == "segmenter":
        meta = masks.trained.meta
        if int(meta["in_channels"]) != channels:
            raise AuditError(f"the segmenter {path} takes {meta['in_channels']}-channel images but {archive.data.root} "
                             f"has {channels}-channel ones (it was trained on {meta.get('dataset', 'another dataset')!r}):"
                             " give the segmenter of this kind of images, or a folder of masks")
        return
    table = archive.data.table
    files = [masks.folder / f"{i}.png" for i in table["image_id"]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise AuditError(f"the mask folder {masks.folder} lacks the masks of {len(missing)} of {len(files)} images "
                         f"(e.g. {missing[:5]}): every image needs <id>.png")
    for mask_file, image_file in zip(files, table["image_path"]):
        mask_size, size = image_size(mask_file), image_size(image_file)
        if mask_size != size:
            raise AuditError(f"Mask {mask_file} has size {mask_size[1]}x{mask_size[0]} (WxH) but its image {image_file} "
                             f"is {size[1]}x{size[0]}; masks must have the same size as their image")


def _norm(meta: dict) -> Normalization:
    return Normalization(**{k: tuple(v) for k, v in meta["normalization"].items()})


class AuditItems(torch.utils.data.Dataset):
    """One archive image per item, prepared as the classifier expects (``image``), with its ground
    truth (``true_mask``, ``has_true_mask``, ``target``), its global ``index`` and the mask source's
    input: the image prepared for the segmenter (``seg_image``) or the mask file resized to the
    classifier's size (``mask_prob``). Nothing is cached: memory does not grow with the archive."""

    def __init__(self, archive: Archive, meta: dict, masks: MaskSource) -> None:
        self.size = int(meta["image_size"])
        self.images = SegXDataset(archive.data, None, self.size, _norm(meta), cache=False)
        self.masks = masks
        self.seg = (SegXDataset(archive.data, None, int(masks.trained.meta["image_size"]), _norm(masks.trained.meta),
                                cache=False) if masks.kind == "segmenter" else None)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = self.images[i]
        out = {"index": i, "image_id": item["image_id"], "image": item["image"], "target": item["target"],
               "true_mask": item["mask"][0] > 0.5, "has_true_mask": item["has_mask"]}
        if self.seg is not None:
            out["seg_image"] = self.seg[i]["image"]
        else:
            path = self.masks.folder / f"{item['image_id']}.png"
            if not path.is_file():
                raise FileNotFoundError(f"No mask for {item['image_id']!r} in {self.masks.folder} (expected {path})")
            mask = torch.from_numpy(read_mask(path).astype(np.float32))[None, None]
            out["mask_prob"] = F.interpolate(mask, size=(self.size, self.size), mode="nearest")[0, 0]
        return out


def predicted_masks(batch: dict, masks: MaskSource, size: int, device) -> np.ndarray:
    """Boolean masks ``(n, size, size)`` for a batch of :class:`AuditItems`, as
    :func:`~segx_helpers.models.masks.mask_probabilities` then :func:`~segx_helpers.scores.analysis.binarise_masks`."""
    if masks.kind == "segmenter":
        prob = torch.from_numpy(predict_masks(masks.trained.model, batch["seg_image"], device=device))[:, None]
        prob = F.interpolate(prob, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    else:
        prob = batch["mask_prob"].numpy()
    return binarise_masks(prob, masks.threshold)


def background(archive: Archive, meta: dict, n: int, seed: int) -> torch.Tensor:
    """Gradient SHAP's reference images: ``n`` training images (seeded) of a dataset, as the notebooks
    take them (:func:`~segx_helpers.workflows.explanation_recipes.background_images`); for a plain folder, ``n`` of its
    images drawn with the seed."""
    if archive.full is not None and (archive.full.table["split"] == "train").any():
        return background_images(archive.full, meta, n, seed)
    source = SegXDataset(archive.data, None, int(meta["image_size"]), _norm(meta), cache=False)
    rows = np.sort(np.random.default_rng(seed).choice(len(source), size=min(n, len(source)), replace=False))
    return torch.stack([source[int(i)]["image"] for i in rows])


# ------------------------------------------------------------------------------ fingerprints

def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sha256_lines(lines) -> str:
    """SHA-256 of the lines joined by newlines, fed one line at a time (memory does not grow with their number)."""
    digest = hashlib.sha256()
    for k, line in enumerate(lines):
        digest.update((f"\n{line}" if k else line).encode())
    return digest.hexdigest()


def _sha256_files(ids: Sequence[str], paths: Sequence[str | None]) -> str:
    """SHA-256 over ``<id>\t<SHA-256 of its file's bytes>`` lines (``-`` for an id without a file): the files'
    contents, not their sizes or times, read one at a time in 1 MB blocks."""
    return _sha256_lines(f"{i}\t{sha256_file(path) if path is not None else '-'}" for i, path in zip(ids, paths))


def versions() -> dict:
    out = {"segx_helpers": __version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "pandas", "pyarrow", "grad-cam", "shap",
                 "segmentation-models-pytorch"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def fingerprint(options: AuditOptions, archive: Archive, masks: MaskSource) -> dict:
    """What the results depend on (``run.json["inputs"]``): a difference refuses to mix results. Images,
    ground-truth masks, mask folders and checkpoints count by the SHA-256 of their bytes (every file is read once
    per invocation, streamed)."""
    table = archive.data.table
    ids = table["image_id"].tolist()
    data = {"kind": archive.kind, "split": options.split, "images": len(archive),
            "image_ids_sha256": _sha256_lines(ids), "images_sha256": _sha256_files(ids, table["image_path"]),
            "true_masks_sha256": _sha256_files(ids, table["mask_path"])}
    if archive.kind == "dataset":
        root = archive.data.root
        data.update({name.replace(".", "_") + "_sha256": sha256_file(root / name) for name in ("labels.csv", "splits.csv")})
    if masks.kind == "segmenter":
        mask_print = {"kind": "segmenter", "sha256": sha256_file(options.masks)}
    else:
        files = sorted(p for p in masks.folder.iterdir() if p.suffix == ".png")
        mask_print = {"kind": "folder", "files_sha256": _sha256_files([p.name for p in files], files)}
    shap = "gradient_shap" in options.methods
    return {"classifier_sha256": sha256_file(options.classifier), "masks": mask_print, "data": data,
            "methods": list(options.methods), "nsamples": int(options.nsamples) if shap else None,
            "background": int(options.background) if shap else None, "p": float(options.p), "seed": int(options.seed),
            "shard_size": int(options.shard_size), "batch_size": int(options.batch_size), "maps": options.maps,
            "localisation": bool(options.localisation), "n_thresholds": 101, "selection": "decision",
            "explained_output": "logit"}


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key, "(absent)"), new.get(key, "(absent)"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: before {old!r}, now {new!r}"]


def _check_not_foreign(out: Path) -> None:
    """Refuse an ``out`` that is a file, or a folder that holds something else than an audit: without ``run.json``
    it may hold only what an audit stopped while first writing ``run.json`` leaves (:func:`_unstarted`)."""
    if out.exists() and not out.is_dir():
        raise AuditError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and not (out / RUN_FILE).is_file() and not all(_unstarted(p) for p in out.iterdir()):
        raise AuditError(f"{out} is not empty and holds no {RUN_FILE} of segx audit: refusing to write into it "
                         "(nothing there was touched). Choose a new or empty --out folder.")


_RUN_FILE_LEFTOVER = re.compile(re.escape(f".{RUN_FILE}.") + r"\d+\.[A-Za-z0-9_]+\.partial")


def _unstarted(path: Path) -> bool:
    """Whether ``path`` is what an audit leaves when stopped (a full disk, kill -9) before ``run.json`` was
    complete: the lock file, an empty ``shards/`` folder, or the temporary file ``run.json`` was being written to."""
    if path.name == LOCK_FILE or _RUN_FILE_LEFTOVER.fullmatch(path.name):
        return path.is_file() and not path.is_symlink()
    return path.name == SHARDS and path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextlib.contextmanager
def output_lock(out: str | Path):
    """Hold an exclusive lock on ``<out>/.segx-audit.lock`` (``flock``, released however the process
    ends) while an audit writes into ``out``: a second audit of the same folder is refused with
    :class:`AuditError` instead of computing everything twice. A foreign folder is refused first."""
    out = Path(out)
    _check_not_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AuditError(f"another segx audit is writing to {out} now; wait until it finishes, then run this "
                             "command again (it resumes, or finds everything done)") from None
        except OSError as err:  # a filesystem without locks (e.g. Lustre mounted without flock)
            warnings.warn(f"cannot lock {out / LOCK_FILE} ({err}): run one segx audit at a time on this folder",
                          UserWarning, stacklevel=3)
        yield out
    finally:
        handle.close()


def prepare_output(out: str | Path, inputs: dict, invocation: dict) -> str:
    """Create the audit folder, or check that an existing one holds results of the same ``inputs``.
    Returns ``"new"`` or ``"resume"``; raises :class:`AuditError` for a foreign folder or a mismatch."""
    out = Path(out)
    _check_not_foreign(out)
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            record = json.loads(run_file.read_text())
        except ValueError as err:
            raise AuditError(f"{run_file} is unreadable ({err}); choose a new --out folder") from err
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise AuditError(f"{run_file} was not written by segx audit ({FORMAT}); choose a new --out folder")
        invocations = record.get("invocations")
        if not isinstance(record.get("inputs"), dict) or not isinstance(invocations, list) or not invocations \
                or not all(isinstance(i, dict) and isinstance(i.get("versions"), dict) for i in invocations):
            raise AuditError(f"{run_file} is damaged (it needs an 'inputs' object and a non-empty 'invocations' list "
                             "with each run's versions), so what the results there were computed from is unknown; "
                             "choose a new --out folder")
        differ = _differences(record["inputs"], inputs)
        if differ:
            raise AuditError(f"{out} holds results of other inputs, which would mix with these: " + "; ".join(differ)
                             + ". Start a new --out folder for the new inputs (the old results stay as they are).")
        now, then = invocation["versions"], record["invocations"][0]["versions"]
        changed = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
        if changed:
            warnings.warn(f"{out} was started with other package versions {changed}; finished shards are kept",
                          UserWarning, stacklevel=2)
        record["invocations"].append(invocation)
        write_json(run_file, record, overwrite=True)
        return "resume"
    write_json(run_file, {"format": FORMAT, "written_by": "segx_helpers.cli.audit", "inputs": inputs,
                          "invocations": [invocation]}, overwrite=False)  # first: the folder is ours once it exists
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    return "new"


# ------------------------------------------------------------------------------ shards

def shard_ranges(n_images: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, n_images)) for start in range(0, n_images, shard_size)]


def shard_paths(out: Path, k: int) -> dict[str, Path]:
    stem = Path(out) / SHARDS / f"shard-{k:05d}"
    return {"table": stem.with_suffix(".parquet"), "maps": stem.with_suffix(".npz"), "done": stem.with_suffix(".json")}


def shard_done(out: Path, k: int) -> bool:
    """A shard is done when its marker exists and its table part (and maps) match the SHA-256 checksums
    the marker holds (a marker without them, from an older version, does not count: the shard is redone)."""
    paths = shard_paths(out, k)
    try:
        marker = json.loads(paths["done"].read_text())
        if sha256_file(paths["table"]) != marker["table_sha256"]:
            return False
        return marker["maps_sha256"] is None or sha256_file(paths["maps"]) == marker["maps_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


TABLE_HEAD = ("image_id", "split", "image_index", "method", "class", "class_index", "confidence", "label", "true_label",
              "correct", "outcome", "has_true_mask")
TRUE_MASK_AREA = "true mask area"


def probability_columns(class_names: Sequence[str]) -> list[str]:
    """The table's columns holding the classifier's probability of each class for the row's image."""
    return [f"probability {name}" for name in class_names]


def _arrow_schema(columns: Sequence[str]):
    types = {"image_id": pa.string(), "split": pa.string(), "method": pa.string(), "class": pa.string(),
             "label": pa.string(), "outcome": pa.string(), "image_index": pa.int64(), "class_index": pa.int64(),
             "true_label": pa.int64(), "correct": pa.bool_(), "has_true_mask": pa.bool_(), "shard": pa.int64(),
             "map_row": pa.int64()}
    return pa.schema([(c, types.get(c, pa.float64())) for c in columns])


def _label_text(targets: np.ndarray, task: str, class_names: Sequence[str]) -> list[str]:
    if task == "multiclass":
        return [class_names[int(t)] for t in targets]
    return ["|".join(c for c, v in zip(class_names, row) if v > 0.5) for row in targets]


class ShardWorker:
    """Computes and writes shards; one per process."""

    def __init__(self, options: AuditOptions, archive: Archive, classifier, masks: MaskSource, device: torch.device,
                 localise: bool) -> None:
        self.options, self.archive, self.classifier, self.masks = options, archive, classifier, masks
        self.device, self.localise = device, localise
        self.items = AuditItems(archive, classifier.meta, masks)
        meta = classifier.meta
        self.task, self.class_names = meta["task"], list(meta["class_names"])
        self.background = (background(archive, meta, options.background, options.seed).to(device)
                           if "gradient_shap" in options.methods else None)
        self.columns = (list(TABLE_HEAD) + probability_columns(self.class_names) + [TRUE_MASK_AREA]
                        + score_columns(options.p, localisation=localise) + ["shard", "map_row"])

    def run(self, out: Path, k: int, start: int, stop: int, progress=None, rank: int = 0, world_size: int = 1) -> int:
        started = time.perf_counter()
        opts = self.options
        loader = DataLoader(Subset(self.items, range(start, stop)), batch_size=opts.batch_size, shuffle=False,
                            num_workers=opts.num_workers)
        tables = {m: [] for m in opts.methods}
        maps = {m: [] for m in opts.methods}
        mask_parts, mask_ids = [], []
        size = int(self.classifier.meta["image_size"])
        for batch in loader:
            index = batch["index"].numpy()
            ids = list(batch["image_id"])
            predicted = predicted_masks(batch, self.masks, size, self.device)
            targets = batch["target"].numpy()
            truth = batch["true_mask"].numpy() if self.localise else None
            has = batch["has_true_mask"].numpy().astype(bool)
            mask_parts.append(predicted)
            mask_ids += ids
            for method in opts.methods:
                options = (GradientShapOptions(self.background, nsamples=opts.nsamples, seed=opts.seed + int(index[0]))
                           if method == "gradient_shap" else None)
                e = explain(self.classifier.model, batch["image"], None, method, options=options,
                            explained=TargetChoice(task=self.task, thresholds=self.classifier.meta.get("thresholds")),
                            run=RunOptions(batch_size=opts.batch_size, progress=False, device=str(self.device)))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # degenerate maps/masks: scored 0 as documented, once per shard below
                    result = explanation_results(e, SplitLabels(ids, targets, self.task, self.class_names), predicted,
                                                 truth, has if self.localise else None,
                                                 options=AnalysisOptions(p=opts.p, device=self.device))
                table = result.table
                rows = table["image_index"].to_numpy()
                table["image_index"] = index[rows]
                table["split"] = self.archive.data.table["split"].to_numpy()[index[rows]]
                table["label"] = np.asarray(_label_text(targets, self.task, self.class_names), dtype=object)[rows] \
                    if len(rows) else []
                table["has_true_mask"] = has[rows]
                for column, values in zip(probability_columns(self.class_names), e.probabilities.T):
                    table[column] = values[rows]
                area = truth.mean(axis=(1, 2)) if truth is not None else np.full(len(ids), np.nan)
                table[TRUE_MASK_AREA] = np.where(has, area, np.nan)[rows]
                table["mask_row"] = len(mask_ids) - len(ids) + rows
                tables[method].append(table)
                maps[method].append(result.maps)
            if progress is not None:
                progress.update(len(ids))
        frame = pd.concat([t for m in opts.methods for t in tables[m]], ignore_index=True) if len(mask_ids) else None
        frame = self._finish(frame, k)
        all_maps = np.concatenate([a for m in opts.methods for a in maps[m]]) if len(frame) else np.zeros((0, size, size))
        paths = shard_paths(out, k)
        arrow = self._arrow(frame)

        with atomic_path(paths["table"], overwrite=True) as tmp:
            pq.write_table(arrow, tmp)
        maps_sha256 = None
        if opts.maps != "none":
            with atomic_path(paths["maps"], overwrite=True) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez_compressed(handle, maps=all_maps.astype(opts.maps), image_id=frame["image_id"].to_numpy(str),
                                        class_index=frame["class_index"].to_numpy(np.int64),
                                        method=frame["method"].to_numpy(str), mask_row=self._mask_rows,
                                        predicted_masks=np.concatenate(mask_parts), mask_image_id=np.asarray(mask_ids, str))
            maps_sha256 = sha256_file(paths["maps"])
        write_json(paths["done"], {"shard": k, "images": [start, stop], "first_id": mask_ids[0], "last_id": mask_ids[-1],
                                   "rows": len(frame), "rank": rank, "world_size": world_size,
                                   "table_sha256": sha256_file(paths["table"]), "maps_sha256": maps_sha256,
                                   "seconds": round(time.perf_counter() - started, 3),
                                   "peak_rss_mb": peak_rss_mb()}, overwrite=True)
        return stop - start

    def _finish(self, frame: pd.DataFrame | None, k: int) -> pd.DataFrame:
        if frame is None or not len(frame):
            frame = pd.DataFrame({c: pd.Series(dtype=object) for c in self.columns + ["mask_row"]})
        self._mask_rows = frame["mask_row"].to_numpy(np.int64)
        frame = frame.drop(columns=["mask_row"])
        frame["shard"] = k
        frame["map_row"] = np.arange(len(frame), dtype=np.int64)
        if not self.archive.labels_known:
            frame["label"], frame["true_label"], frame["correct"], frame["outcome"] = None, None, None, None
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise RuntimeError(f"internal: table part lacks {missing}")
        return frame[self.columns]

    def _arrow(self, frame: pd.DataFrame):
        frame = frame.copy()
        for column in ("true_label",):
            frame[column] = frame[column].astype("Int64")
        for column in ("correct", "has_true_mask"):
            frame[column] = frame[column].astype("boolean")
        return pa.Table.from_pandas(frame, schema=_arrow_schema(self.columns), preserve_index=False)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (recorded in each shard marker and the summary)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def merge(out: Path, n_shards: int) -> Path:
    """``table.parquet``: the parts in shard order, one row group per shard, streamed (memory stays at one part)."""
    parts = [shard_paths(out, k)["table"] for k in range(n_shards)]
    schema = pq.read_schema(parts[0])
    with atomic_path(out / TABLE_FILE, overwrite=True) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for part in parts:
                writer.write_table(pq.read_table(part).replace_schema_metadata(schema.metadata))
    return out / TABLE_FILE


def summarise(out: Path, labels_known: bool, images_now: int, seconds: float, meta: dict) -> dict:
    """Images, predictions per method, this run's throughput and, with labels, whether the classifier decides
    (:func:`classifier_decides_on_table`) and how well low SegU certainty finds incorrect predictions
    (:func:`segx_helpers.scores.selective.separation_table`). ``meta``: the classifier checkpoint's metadata."""
    table = pd.read_parquet(out / TABLE_FILE, columns=["image_id", "method", "correct", "c_IoU", "c_AUITC"])
    summary = {"images": int(table["image_id"].nunique()), "predictions": {m: int(n) for m, n in
                                                                           table.groupby("method").size().items()},
               "images_this_run": int(images_now), "seconds_this_run": round(seconds, 2),
               "images_per_second": round(images_now / seconds, 3) if seconds > 0 and images_now else None,
               "segu_auroc_incorrect": None, "classifier": None}
    summary["peak_rss_mb_rank0"] = peak_rss_mb()
    if labels_known and len(table):
        summary["classifier"] = classifier_decides_on_table(out / TABLE_FILE, meta)
        known = table[table["correct"].notna()].copy()
        known["correct"] = known["correct"].astype(bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sep = separation_table(known, ["c_IoU", "c_AUITC"], group="method", n_resamples=200)
        summary["segu_auroc_incorrect"] = [
            {"method": r["group"], "certainty": r["certainty"], "auroc": r["auroc"], "auroc_low": r["auroc_low"],
             "auroc_high": r["auroc_high"], "incorrect": r["n_incorrect"], "correct": r["n_correct"]}
            for r in sep.to_dict("records")]
    write_json(out / SUMMARY_FILE, summary, overwrite=True)
    return summary


def classifier_decides_on_table(table_path: Path, meta: dict) -> dict | None:
    """Whether the classifier decides on the audited images (:func:`segx_helpers.scores.metrics.decides_check`,
    one row per image, the checkpoint's cut-offs), against the true mask's area as a one-feature baseline when every
    image has a true mask. An audit has no validation split of its own, so the baseline's direction is taken from
    the audited images themselves: optimistic for the baseline, so the check is, if anything, too strict. None when
    fewer than two classes occur."""
    names = list(meta["class_names"])
    columns = probability_columns(names)
    frame = pd.read_parquet(table_path, columns=["image_id", "label", TRUE_MASK_AREA, *columns])
    frame = frame.drop_duplicates("image_id")
    sets = [set(text.split("|")) - {""} for text in frame["label"].fillna("")]  # the image's labels, as text
    if meta["task"] == "multiclass":
        labels = np.array([names.index(next(iter(s))) for s in sets], dtype=np.int64)
        if len(np.unique(labels)) < 2:
            return None
    else:
        labels = np.array([[int(n in s) for n in names] for s in sets], dtype=np.int64)
        if not (0 < labels.sum(axis=0)).any() or (labels.sum(axis=0) == len(labels)).all():
            return None
    probs = frame[columns].to_numpy(float)
    area = frame[TRUE_MASK_AREA].to_numpy(float)
    baselines = {"true mask area": Baseline(area, area)} if np.isfinite(area).all() else {}
    check = decides_check(labels, probs, meta["task"], meta["class_names"], meta.get("thresholds"), baselines,
                          labels, n_resamples=200)
    return {"auroc": check.auroc[0], "verdict": check.verdict(), **check.summary()}


def format_summary(summary: dict) -> str:
    lines = [f"images: {summary['images']}; predictions: "
             + ", ".join(f"{m} {n}" for m, n in summary["predictions"].items()),
             f"this run: {summary['images_this_run']} images in {summary['seconds_this_run']} s"
             + (f" ({summary['images_per_second']} images/s)" if summary["images_per_second"] else "")]
    if summary.get("classifier"):
        lines.append(summary["classifier"]["verdict"].replace("**", ""))
    for row in summary["segu_auroc_incorrect"] or []:
        lines.append(f"SegU {row['certainty']} ({row['method']}): AUROC for incorrect predictions {row['auroc']:.3f} "
                     f"[{row['auroc_low']:.3f}, {row['auroc_high']:.3f}] ({row['incorrect']} incorrect, "
                     f"{row['correct']} correct)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the command

@dataclass
class AuditResult:
    """What one invocation did (on rank 0: ``summary`` is None when shards remain, e.g. ``max_shards``)."""

    out: Path
    shards: int
    done_before: int
    done_now: list[int] = field(default_factory=list)
    summary: dict | None = None
    table: Path | None = None


def run_audit(options: AuditOptions, arguments: dict | None = None) -> AuditResult:
    """Run (or resume) an audit; works the same in one process and under torchrun."""
    ctx = distributed.setup(options.device, options.timeout_minutes)
    held = contextlib.ExitStack()  # rank 0's lock on the output folder, from planning to the merged table
    try:
        out = Path(options.out)
        classifier = load_trained(options.classifier, "classifier")
        require_finished_run(Path(options.classifier), classifier.meta, _RESUME_HINT)
        masks = open_masks(options.masks)
        archive = open_archive(options.data, classifier.meta, options.split)
        check_mask_source(masks, archive, Path(options.masks))
        inputs = fingerprint(options, archive, masks)
        ranges = shard_ranges(len(archive), options.shard_size)
        invocation = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": ctx.world_size,
                      "device": str(ctx.device), "backend": ctx.backend, "versions": versions(),
                      "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in
                                    (arguments or asdict(options)).items()}}

        localise = options.localisation and archive.data.table["mask_path"].notna().any()
        worker = ShardWorker(options, archive, classifier, masks, ctx.device, bool(localise))

        def plan():
            held.enter_context(output_lock(out))
            prepare_output(out, inputs, invocation)
            return [k for k in range(len(ranges)) if not shard_done(out, k)]

        todo = distributed.run_on_main(ctx, plan)
        done_before = len(ranges) - len(todo)
        if options.max_shards is not None:
            todo = todo[:options.max_shards]
        mine = todo[ctx.rank::ctx.world_size]
        bar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in mine), unit="img", dynamic_ncols=True,
                   desc=f"segx audit{f' rank 0/{ctx.world_size}' if ctx.distributed else ''}",
                   disable=not (options.progress and ctx.is_main))
        started = time.perf_counter()
        for k in mine:
            worker.run(out, k, *ranges[k], progress=bar, rank=ctx.rank, world_size=ctx.world_size)
        bar.close()
        distributed.barrier(ctx)

        def finish():
            result = AuditResult(out, len(ranges), done_before, todo)
            if all(shard_done(out, k) for k in range(len(ranges))):
                result.table = merge(out, len(ranges))
                images_now = sum(ranges[k][1] - ranges[k][0] for k in todo)
                result.summary = summarise(out, archive.labels_known, images_now, time.perf_counter() - started,
                                           classifier.meta)
            return result

        result = distributed.run_on_main(ctx, finish)
    except BaseException:
        held.close()
        distributed.cleanup(ctx, failed=True)
        raise
    held.close()
    distributed.cleanup(ctx)
    return result
