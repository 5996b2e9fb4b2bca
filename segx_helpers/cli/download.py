"""``python -m segx_helpers.cli.download <dataset>``: download a public clinical dataset and convert it to the
package's dataset format. It works from an installed package (on Colab: ``!python -m segx_helpers.cli.download
isic2018-trap --data-dir segx-tutorials/data``, or :func:`download` from Python); in a checkout
``./data_download.sh`` is a thin wrapper around it. ``-h`` prints the usage.

Downloads land in ``<data-dir>/<dataset>/raw/`` and resume where they stopped; a file already downloaded and
verified is not fetched again; an existing converted dataset is never overwritten. The SHA-256 of every file is
checked where a checksum is known, recorded in ``raw/SHA256SUMS`` after a successful download and checked on every
re-run, so a file without a published checksum cannot change unnoticed; a file that fails a check, or an archive
that cannot be unpacked, is moved aside as ``<file>.bad``. Every error is one line.

Environment: ``SEGX_<DATASET>_URL`` (e.g. ``SEGX_SHENZHEN_URL``, ``SEGX_CHESTX_DET10_URL``) replaces the folder
of every URL of that dataset (the file is then fetched from ``$SEGX_<DATASET>_URL/<file>``);
``SEGX_<KEY>_SHA256`` (e.g. ``SEGX_SHENZHEN_SHA256``) sets the checksum a file must have. Every default URL is
HTTPS; a host in :data:`HTTP_FALLBACK_HOSTS` whose HTTPS fails (no TLS on it) is retried over plain HTTP, with a
note.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

ISIC_ARCHIVE = "https://isic-challenge-data.s3.amazonaws.com/2018"
DEBIASING_SKIN = ("https://raw.githubusercontent.com/alceubissoto/debiasing-skin/"
                  "f93c8654f50c581544f32ad6b1450cb925a176ff")
DEEPWISE_JSON = ("https://raw.githubusercontent.com/Deepwise-AILab/ChestX-Det10-Dataset/"
                 "c535e9a32995e6d6a44dea810501190b18ed264d")


@dataclass(frozen=True)
class Source:
    """One file of a dataset: ``dataset`` (``isic2018-trap/<N>`` for a file of trap set N only), ``key`` (the name
    in ``SEGX_<KEY>_SHA256``), the file name, its default URL and its published SHA-256 (``""``: none known)."""

    dataset: str
    key: str
    file: str
    url: str
    sha256: str = ""


TRAP_CSV_SHA256 = {
    1: ("004e4461e430e887c2fdfc2185d459cecee6e90fbd51e5dc0d650cb31d781c49",
        "a8cd9fe473202d62d2778bc96ddf767f1bff7c4222bb9487eb51667475eab254",
        "3f20b79d191f2d3c69ab9e03b285dc36cf3608dc096553e8093f2fbca4dcbfc2"),
    2: ("62301111f20d42c9f9c35e7c00c43172d4b70cf54854b58db60e1a88e1a20371",
        "2d6bb172a0be04b5d3d2dcc13ccbdc517971b1f8f7fe49f1445122204620bd12",
        "e2069b54192aa451315508ff1f6923bdf5478e6628e707489867edd730597c54"),
    3: ("3831795fb2bfd33e75a46c5bf4106d9b174cd3a2d9d93a67209852b8aec52ecc",
        "8d12e942108c3353960f3d7fdd1910cf094c92c79d13bbd396fe53fa759426ad",
        "fd8f3fb9da774db1376a8ee5673b8f7ae0c32f078258053adca47822fdafa1d5"),
    4: ("24e0fccf6ac16effb62dc0fda0e736ccf0165d55dbbfa98622f584e4f63b101a",
        "49dfdef7ad1c8d2ed237997565850912ed2bea29a407c012b0c89af8759d5840",
        "1d268034ff9ca40758784f4f1cec460ef678e6e46f4db0e228e5cd9505facb2b"),
    5: ("116a11f111f89b51adf9b9c16bf8604797c3891fda346f2631a0bfcaf5a91926",
        "ce9c08147745b33e9cee0d44eb1a5a9b357a9755fe951a44ae6c994cf5489f4f",
        "562d5ea2e4dddb6fb8486b335028a7fc480e3e23f57cd1f3ccb119d2ddb41b37"),
}
"""SHA-256 of the train, val and test CSV of each trap set at the pinned debiasing-skin commit."""


def _trap_sources() -> list[Source]:
    rows = []
    for number, checksums in TRAP_CSV_SHA256.items():
        for split, sha in zip(("train", "val", "test"), checksums):
            name = f"isic_annotated_{split}{number}.csv"
            rows.append(Source(f"isic2018-trap/{number}", f"ISIC_TRAP_{split.upper()}{number}_CSV", name,
                               f"{DEBIASING_SKIN}/trap-sets/{name}", sha))
    return rows


SOURCES = (
    Source("ham10000", "HAM10000", "HAM10000_dataverse.zip",
           "https://dataverse.harvard.edu/api/access/dataset/:persistentId/?persistentId=doi:10.7910/DVN/DBW86T"
           "&format=original"),
    Source("shenzhen", "SHENZHEN", "ChinaSet_AllFiles.zip",
           "https://openi.nlm.nih.gov/imgs/collections/ChinaSet_AllFiles.zip"),
    Source("montgomery", "MONTGOMERY", "NLM-MontgomeryCXRSet.zip",
           "https://openi.nlm.nih.gov/imgs/collections/NLM-MontgomeryCXRSet.zip"),
    Source("chestx-det10", "CHESTX_DET10_TRAIN_JSON", "train.json", f"{DEEPWISE_JSON}/train.json",
           "8e9dd7123bdd9e5ce8d8cd7bd304fd24afdf0081930654b82c2003422d59de9c"),
    Source("chestx-det10", "CHESTX_DET10_TEST_JSON", "test.json", f"{DEEPWISE_JSON}/test.json",
           "c18482a77111186789c67d836db27a522c717cdb638eff59bc463362a60a46f1"),
    Source("chestx-det10", "CHESTX_DET10_TRAIN_IMAGES", "train_data.zip",
           "https://resource.deepwise.com/xraychallenge/train_data.zip"),
    Source("chestx-det10", "CHESTX_DET10_TEST_IMAGES", "test_data.zip",
           "https://resource.deepwise.com/xraychallenge/test_data.zip"),
    # isic2018-trap: the artefact annotations and the chosen trap set's lists first (small, so they fail fast),
    # then the ISIC 2018 challenge archive (images, lesion masks; about 11 GB)
    Source("isic2018-trap", "ISIC_BIAS_CSV", "isic_bias.csv", f"{DEBIASING_SKIN}/artefacts-annotation/isic_bias.csv",
           "04fbb74b44d33498afd41a66cfd73e500c2b197e540feb7f4a7553dc8023ddc8"),
    *_trap_sources(),
    Source("isic2018-trap", "ISIC2018_TASK1_INPUT", "ISIC2018_Task1-2_Training_Input.zip",
           f"{ISIC_ARCHIVE}/ISIC2018_Task1-2_Training_Input.zip"),
    Source("isic2018-trap", "ISIC2018_TASK1_GROUNDTRUTH", "ISIC2018_Task1_Training_GroundTruth.zip",
           f"{ISIC_ARCHIVE}/ISIC2018_Task1_Training_GroundTruth.zip"),
)
HTTP_FALLBACK_HOSTS = ("resource.deepwise.com",)
KAGGLE_BUNDLE = "mingchengzhu/segx-used-datasets"
KAGGLE_FILE = "segx-used-datasets.zip"
DATASETS = ("ham10000", "shenzhen", "montgomery", "chestx-det10", "isic2018-trap", "segx-kaggle")
PROG = "python -m segx_helpers.cli.download"
NOTES = {
    "ham10000": "note: HAM10000 is licensed CC BY-NC 4.0 (non-commercial use only); cite Tschandl et al. 2018.",
    "shenzhen": "note: the NLM archive has no lung masks; they are a manual download (566 of 662 images): "
                "https://doi.org/10.17632/8gf9vpkhgy.2 or https://www.kaggle.com/datasets/yoctoman/shcxr-lung-mask "
                "(Kaggle account). Put them as <name>_mask.png in a masks/ folder next to CXR_png/, delete {out} and "
                "re-run.",
    "chestx-det10": "note: ChestX-Det10 has no lung masks; put any you have as masks/<image>.png next to train.json, "
                    "delete {out} and re-run.",
    "isic2018-trap": "note: ISIC 2018 images and masks are licensed CC BY-NC 4.0 (non-commercial use only); cite "
                     "Codella et al. 2019 and Tschandl et al. 2018, and for the artefact annotations and trap sets "
                     "Bissoto, Valle, Avila 2020.",
}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download, check, unpacking or conversion failed; the message is the one line to show."""


class UsageError(ValueError):
    """A wrong command line or argument; the message says what is wrong."""


def usage() -> str:
    keys = " ".join(source.key for source in SOURCES)
    return f"""usage: {PROG} <dataset> [--data-dir DIR] [--which ham|chestx] [--trap-set N] [--split trap|random]
       (in a checkout: ./data_download.sh <dataset> ..., the same command)

Downloads <dataset> into DIR/<dataset>/raw/ (default DIR: data), checks the SHA-256 of every file
whose checksum is known, unpacks it and converts it to DIR/<dataset>/dataset/ with
segx_helpers.cli.convert. Downloads resume where they stopped; a file already downloaded and
verified is not fetched again; an existing converted dataset is never overwritten. The SHA-256
of every downloaded file is recorded in DIR/<dataset>/raw/SHA256SUMS and checked on re-runs; a
file that fails a check, or an archive that cannot be unpacked, is moved aside as <file>.bad.

datasets:
  ham10000      HAM10000 dermoscopy, 7 classes, with lesion masks (Harvard Dataverse, CC BY-NC 4.0)
  shenzhen      Shenzhen tuberculosis chest X-rays (NLM); lung masks are a separate manual download
  montgomery    Montgomery County tuberculosis chest X-rays with lung masks (NLM)
  chestx-det10  ChestX-Det10, 10 chest X-ray findings (Deepwise); no lung masks
  isic2018-trap ISIC 2018 Task 1 dermoscopy (2,594 images, expert lesion masks, CC BY-NC) with the
                benign/malignant labels, artefact flags and "trap" split of Bissoto et al. 2020
                (artefacts go with malignancy in train and against it in test); --trap-set N (1-5,
                default 1) picks the split; converted at 256 px to DIR/isic2018-trap/dataset/
                (DIR/isic2018-trap<N>/dataset/ for N > 1). --split random makes a stratified random
                7:1:2 split of all 2,594 images instead (seed 0), in DIR/isic2018-random/dataset/.
                The image archive is about 11 GB.
  segx-kaggle   the SegX authors' Kaggle bundle {KAGGLE_BUNDLE} (needs a Kaggle account,
                the kaggle CLI and an API token); --which picks its ham (default) or chestx part,
                converted to DIR/segx-kaggle-<which>/dataset/

From Python: segx_helpers.cli.download.download("isic2018-trap", data_dir="data").

environment:
  SEGX_<DATASET>_URL   fetch that dataset's files from this folder URL instead (e.g. SEGX_SHENZHEN_URL)
  SEGX_<KEY>_SHA256    expected checksum of one file (keys: {keys} KAGGLE)
"""


@dataclass(frozen=True)
class DownloadRequest:
    """What to download and where: a dataset of :data:`DATASETS` into ``data_dir``; ``which`` (segx-kaggle: ham or
    chestx), ``trap_set`` (isic2018-trap: 1 to 5), ``split`` (isic2018-trap: ``"trap"`` or ``"random"``)."""

    dataset: str
    data_dir: Path = Path("data")
    which: str = "ham"
    trap_set: int = 1
    split: str = "trap"

    def check(self) -> None:
        """Raise :class:`UsageError` naming the first problem."""
        if self.dataset == "":
            raise UsageError(f"the dataset name is empty; choose one of: {' '.join(DATASETS)}")
        if self.dataset not in DATASETS:
            raise UsageError(f"unknown dataset '{self.dataset}'; choose one of: {' '.join(DATASETS)}")
        if self.which not in ("ham", "chestx"):
            raise UsageError(f"--which must be ham or chestx, got '{self.which}'")
        if str(self.trap_set) not in {str(n) for n in TRAP_CSV_SHA256}:
            raise UsageError(f"--trap-set must be a number from 1 to 5, got '{self.trap_set}'")
        if self.split not in ("trap", "random"):
            raise UsageError(f"--split must be trap or random, got '{self.split}'")
        if self.split == "random" and int(self.trap_set) != 1:
            raise UsageError("--trap-set and --split random exclude each other")
        if str(self.data_dir) == "":
            raise UsageError("--data-dir must not be empty (it would put the data at the filesystem root)")
        if Path(self.data_dir).exists() and not Path(self.data_dir).is_dir():
            raise UsageError(f"--data-dir {self.data_dir} exists and is not a folder")

    @property
    def raw(self) -> Path:
        return Path(self.data_dir) / self.dataset / "raw"

    @property
    def out(self) -> Path:
        """The converted dataset's folder."""
        if self.dataset == "segx-kaggle":
            return Path(self.data_dir) / f"segx-kaggle-{self.which}" / "dataset"
        if self.dataset == "isic2018-trap" and self.split == "random":
            return Path(self.data_dir) / "isic2018-random" / "dataset"
        if self.dataset == "isic2018-trap" and int(self.trap_set) != 1:
            return Path(self.data_dir) / f"isic2018-trap{self.trap_set}" / "dataset"
        return Path(self.data_dir) / self.dataset / "dataset"

    def sources(self) -> list[Source]:
        """This request's files, in download order, with ``SEGX_<DATASET>_URL`` applied."""
        folder = os.environ.get(f"SEGX_{self.dataset.upper().replace('-', '_')}_URL")
        chosen = [s for s in SOURCES if s.dataset in (self.dataset, f"{self.dataset}/{self.trap_set}")]
        if folder:
            chosen = [Source(s.dataset, s.key, s.file, f"{folder.rstrip('/')}/{s.file}", s.sha256) for s in chosen]
        return chosen


# ------------------------------------------------------------------------------------------ checksums

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded(path: Path) -> str:
    """The SHA-256 recorded for ``path`` in its folder's ``SHA256SUMS`` (``""`` if none)."""
    manifest = path.parent / "SHA256SUMS"
    if not manifest.is_file():
        return ""
    found = [line.split()[0] for line in manifest.read_text().splitlines()
             if len(line.split()) == 2 and line.split()[1] == path.name]
    return found[-1] if found else ""


def record(path: Path, sha256: str) -> None:
    """Keep one line per file in its folder's ``SHA256SUMS``; ``sha256=""`` forgets ``path``."""
    manifest = path.parent / "SHA256SUMS"
    lines = [line for line in (manifest.read_text().splitlines() if manifest.is_file() else [])
             if not (len(line.split()) == 2 and line.split()[1] == path.name)]
    if sha256:
        lines.append(f"{sha256}  {path.name}")
    temporary = manifest.with_name("SHA256SUMS.tmp")
    temporary.write_text("".join(f"{line}\n" for line in lines))
    temporary.replace(manifest)


def set_aside(path: Path, reason: str) -> DownloadError:
    """Move ``path`` to ``<path>.bad``, forget its recorded checksum, and return the error to raise."""
    path.replace(path.with_name(path.name + ".bad"))
    record(path, "")
    return DownloadError(f"{reason}; moved it aside to {path}.bad (delete it and re-run to download again)")


def verify(path: Path, key: str, expected: str) -> None:
    """Check ``path`` against ``expected``, else against the SHA-256 recorded when it was downloaded; a mismatch
    moves it aside. Prints what was checked."""
    actual, before = sha256_of(path), recorded(path)
    where = path.parent / "SHA256SUMS"
    if expected and actual == expected:
        print(f"{path.name}: sha256 verified")
    elif expected:
        raise set_aside(path, f"{path.name} has sha256 {actual} but {expected} was expected")
    elif before and actual == before:
        print(f"{path.name}: sha256 {actual} matches the sha256 recorded at download in {where} (no published "
              f"checksum; set SEGX_{key}_SHA256 to check it)")
    elif before:
        raise set_aside(path, f"{path.name} changed since it was downloaded: sha256 {actual}, but {before} was "
                              f"recorded in {where}")
    else:
        print(f"{path.name}: sha256 {actual} (not verified: no known checksum; set SEGX_{key}_SHA256 to check it; "
              f"recorded in {where} and checked on re-runs)")


# ------------------------------------------------------------------------------------------ downloading

class _NoTLS(Exception):
    """HTTPS could not be used with the host (no TLS there, or nothing listening on its port)."""


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _offline(url: str, target: Path) -> DownloadError:
    return DownloadError(f"cannot reach {_host(url)}: you seem to be offline; download {url} manually, save it as "
                         f"{target} and re-run")


def _stream(url: str, part: Path, target: Path) -> None:
    """Append ``url``'s remaining bytes to ``part`` (a ``Range`` request when ``part`` has some; a server that
    ignores it sends the whole file, which replaces ``part``)."""
    start = part.stat().st_size if part.exists() else 0
    request = Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urlopen(request, timeout=30)
    except HTTPError as err:
        if err.code == 416 and start:  # nothing left to fetch: the partial file was complete
            return
        raise DownloadError(f"download of {url} failed (HTTP {err.code}: {err.reason}); re-run to retry (a partial "
                            "download is resumed)") from None
    except URLError as err:
        reason = err.reason
        refused_https = (isinstance(reason, ConnectionRefusedError) and url.startswith("https://")
                         and urlsplit(url).hostname in HTTP_FALLBACK_HOSTS)
        if isinstance(reason, ssl.SSLError) or refused_https:
            raise _NoTLS(str(reason)) from None
        if isinstance(reason, OSError):
            raise _offline(url, target) from None
        raise DownloadError(f"download of {url} failed ({reason}); re-run to retry") from None
    except (TimeoutError, ConnectionError):
        raise _offline(url, target) from None
    with response:
        mode = "ab" if start and response.status == 206 else "wb"
        try:
            with open(part, mode) as handle:
                shutil.copyfileobj(response, handle, CHUNK)
        except (TimeoutError, ConnectionError) as err:
            raise DownloadError(f"download of {url} was interrupted ({err}); re-run to resume it") from None


def fetch_url(url: str, target: Path) -> None:
    """Download ``url`` to ``target`` through ``<target>.part`` (resumed when present), renamed when complete."""
    part = target.with_name(target.name + ".part")
    print(f"downloading {target.name} from {_host(url)} ...", flush=True)
    try:
        _stream(url, part, target)
    except _NoTLS as err:
        if urlsplit(url).hostname not in HTTP_FALLBACK_HOSTS:
            raise DownloadError(f"download of {url} failed (HTTPS: {err}); re-run to retry") from None
        print(f"note: HTTPS failed for {_host(url)} ({err}); falling back to plain HTTP for {target.name} (its "
              "sha256 is recorded and checked on re-runs)")
        url = "http://" + url.removeprefix("https://")
        try:
            _stream(url, part, target)
        except _NoTLS:
            raise _offline(url, target) from None
    part.replace(target)


def _extract(archive: Path, dest: Path) -> list[Path]:
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if not n.startswith("__MACOSX/")]
        zf.extractall(dest, members=names)
    return [dest / n for n in names if n.lower().endswith(".zip")]


def unpack(archive: Path, folder: Path) -> None:
    """Extract a zip into ``folder``, then every zip it held next to itself (into a folder named after it, unless
    its entries already sit in one). Done once: a stamp file remembers it. A broken archive is moved aside."""
    stamp = folder / f".{archive.name}.unpacked"
    if stamp.is_file():
        return
    print(f"unpacking {archive.name} ...", flush=True)
    try:
        for inner in _extract(archive, folder):
            with zipfile.ZipFile(inner) as zf:
                nested = all(n.startswith(inner.stem + "/") for n in zf.namelist())
            _extract(inner, inner.parent if nested else inner.parent / inner.stem)
            inner.unlink()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError):
        raise set_aside(archive, f"{archive.name} is not a valid zip archive (a corrupt or incomplete download)") from None
    stamp.touch()


def fetch(source: Source, raw: Path) -> None:
    """Download one file into ``raw`` unless it is there already, verify it, unpack a zip, record its SHA-256."""
    target = raw / source.file
    expected = os.environ.get(f"SEGX_{source.key}_SHA256", source.sha256)
    if target.is_file():
        print(f"{source.file}: already downloaded, not fetching it again")
    else:
        fetch_url(source.url, target)
    verify(target, source.key, expected)
    if source.file.endswith(".zip"):
        unpack(target, raw)
    record(target, sha256_of(target))


def fetch_kaggle(raw: Path) -> None:
    """The SegX authors' Kaggle bundle, with the kaggle command line tool and the user's API token."""
    if shutil.which("kaggle") is None:
        raise DownloadError("segx-kaggle needs the kaggle CLI (pip install kaggle) and a Kaggle account; see "
                            "https://www.kaggle.com/docs/api")
    config = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    if not (config / "kaggle.json").is_file() and not (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        raise DownloadError("no Kaggle credentials: create an API token on https://www.kaggle.com/settings (Account > "
                            f"API > Create New Token) and save it as {config}/kaggle.json, or set KAGGLE_USERNAME and "
                            "KAGGLE_KEY")
    target = raw / KAGGLE_FILE
    if target.is_file():
        print(f"{KAGGLE_FILE}: already downloaded, not fetching it again")
    else:
        print(f"downloading {KAGGLE_BUNDLE} from Kaggle ...", flush=True)
        done = subprocess.run(["kaggle", "datasets", "download", KAGGLE_BUNDLE, "-p", str(raw)], check=False)
        if done.returncode != 0:
            raise DownloadError(f"the Kaggle download of {KAGGLE_BUNDLE} failed (offline, or its terms not accepted "
                                f"on https://www.kaggle.com/datasets/{KAGGLE_BUNDLE}?)")
    verify(target, "KAGGLE", os.environ.get("SEGX_KAGGLE_SHA256", ""))
    unpack(target, raw)
    record(target, sha256_of(target))


def convert(request: DownloadRequest) -> None:
    """The last step: ``segx_helpers.cli.convert`` on the raw download."""
    from segx_helpers.cli import convert as converter  # the converters import numpy, pandas, PIL: only now

    options = ["--which", request.which]
    if request.dataset == "isic2018-trap":
        options = ["--trap-set", str(request.trap_set), "--split", request.split, "--image-size", "256"]
    if converter.main([request.dataset, str(request.raw), str(request.out), *options]) != 0:
        raise DownloadError(f"converting {request.raw} to {request.out} failed (see the error above)")


def run(request: DownloadRequest) -> Path:
    """Download, verify, unpack and convert ``request``; returns the converted dataset's folder. Raises
    :class:`UsageError` or :class:`DownloadError` (one line each)."""
    request.check()
    if request.out.exists():
        print(f"{request.out} already exists; not overwriting it (delete it yourself to convert again).")
        return request.out
    try:
        request.raw.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise DownloadError(f"cannot create the folder {request.raw} (is a part of it a file, or not writable?)") from None
    if request.dataset == "segx-kaggle":
        fetch_kaggle(request.raw)
    else:
        for source in request.sources():
            fetch(source, request.raw)
    if request.dataset in NOTES:
        print(NOTES[request.dataset].format(out=request.out))
    convert(request)
    return request.out


def download(dataset: str, data_dir: str | Path = "data", which: str = "ham", trap_set: int = 1,
             split: str = "trap") -> Path:
    """From Python, e.g. in a notebook on Colab: ``download("isic2018-trap", data_dir=paths.root / "data")``.
    Returns the converted dataset's folder (``data_dir/<name>/dataset``); see :class:`DownloadRequest`."""
    return run(DownloadRequest(dataset, Path(data_dir), which, trap_set, split))


def parse(argv: Sequence[str]) -> DownloadRequest | None:
    """The command line as a :class:`DownloadRequest` (``None`` for ``-h``); :class:`UsageError` names a mistake."""
    dataset, options, args = None, {}, list(argv)
    flags = {"--data-dir": "data_dir", "--which": "which", "--trap-set": "trap_set", "--split": "split"}
    needs = {"--data-dir": "a folder", "--which": "ham or chestx", "--trap-set": "a number from 1 to 5",
             "--split": "trap or random"}
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            return None
        if arg in flags:
            if not args:
                raise UsageError(f"{arg} needs {needs[arg]}")
            value = args.pop(0)
            if arg == "--data-dir" and value.startswith("-") and value != "":
                raise UsageError(f"--data-dir needs a folder, got the option '{value}' (write ./{value} for a folder "
                                 "of that name)")
            options[flags[arg]] = value
        elif arg.startswith("-") and arg != "":
            raise UsageError(f"unknown option '{arg}'")
        elif dataset is not None:
            raise UsageError(f"give one dataset, got '{dataset}' and '{arg}' (run the command once per dataset)")
        else:
            dataset = arg
    if dataset is None:
        raise UsageError(f"no dataset given; choose one of: {' '.join(DATASETS)}")
    if "trap_set" in options and dataset != "isic2018-trap":
        raise UsageError("--trap-set applies to isic2018-trap only")
    if "split" in options and dataset != "isic2018-trap":
        raise UsageError("--split applies to isic2018-trap only")
    if "data_dir" in options:
        options["data_dir"] = Path(options["data_dir"]) if options["data_dir"] else ""
    if str(options.get("trap_set", "")).isdigit():
        options["trap_set"] = int(options["trap_set"])
    return DownloadRequest(dataset, **options)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0, 1 for a failed download or check, 2 for a usage mistake)."""
    try:
        request = parse(sys.argv[1:] if argv is None else argv)
        if request is None:
            print(usage())
            return 0
        run(request)
    except UsageError as err:
        print(f"error: {err}\nrun {PROG} -h for the usage", file=sys.stderr)
        return 2
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
