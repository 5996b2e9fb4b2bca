"""The downloader (``python -m segx_helpers.cli.download``, and ``data_download.sh``, its thin wrapper in a checkout)
against a local HTTP server (with Range support) serving tiny fixture archives."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from segx_helpers.cli import download
from segx_helpers.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")


def png_bytes(seed: int, rgb: bool = False, mask: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if mask:
        array = np.zeros((32, 32), np.uint8)
        array[8:24, 8:24] = 255
    else:
        array = rng.integers(0, 256, (32, 32, 3) if rgb else (32, 32), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shenzhen_zip() -> bytes:
    """The NLM archive's layout (ChinaSet_AllFiles/CXR_png), 10 normal and 10 TB images, with masks."""
    members = {}
    for i in range(20):
        name = f"CHNCXR_{i:04d}_{i % 2}"
        members[f"ChinaSet_AllFiles/CXR_png/{name}.png"] = png_bytes(i)
        members[f"ChinaSet_AllFiles/masks/{name}_mask.png"] = png_bytes(i, mask=True)
    return zip_bytes(members)


@pytest.fixture
def server():
    """A local server of ``files`` (name -> bytes) that honours ``Range: bytes=N-`` and logs every request."""
    files: dict[str, bytes] = {}
    requests: list[tuple[str, str | None]] = []
    hang: set[str] = set()  # names whose download never completes (until the test ends)
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append((self.path, self.headers.get("Range")))
            if self.path.lstrip("/") in hang:
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                self.wfile.write(b"x" * 1000)
                self.wfile.flush()
                release.wait(120)
                return
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and int(match.group(1)) >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if match:
                start = int(match.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}/", files=files, requests=requests, hang=hang)
    release.set()
    httpd.shutdown()
    httpd.server_close()


def run(tmp_path, *args, **env):
    """Run the script from the repository root with a clean SEGX_/KAGGLE_ environment plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SEGX_", "KAGGLE_"))}
    return subprocess.run([BASH, "data_download.sh", *args, "--data-dir", str(tmp_path / "data")], cwd=REPO,
                          env={**base, **env}, capture_output=True, text=True, timeout=300)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_download_verifies_unpacks_and_converts(tmp_path, server):
    server.files["ChinaSet_AllFiles.zip"] = body = shenzhen_zip()
    result = run(tmp_path, "shenzhen", SEGX_SHENZHEN_URL=server.url, SEGX_SHENZHEN_SHA256=sha256(body))
    assert result.returncode == 0, result.stderr
    assert "ChinaSet_AllFiles.zip: sha256 verified" in result.stdout
    raw = tmp_path / "data" / "shenzhen" / "raw"
    assert (raw / "ChinaSet_AllFiles.zip").read_bytes() == body and not (raw / "ChinaSet_AllFiles.zip.part").exists()
    ds = load_dataset(tmp_path / "data" / "shenzhen" / "dataset")
    assert len(ds.table) == 20 and ds.info.class_names == ["tb"] and ds.table["mask_path"].notna().all()
    assert ds.table.set_index("image_id").loc["CHNCXR_0003_1", "tb"] == 1


def test_unknown_checksum_is_reported_as_not_verified(tmp_path, server):
    server.files["ChinaSet_AllFiles.zip"] = body = shenzhen_zip()
    result = run(tmp_path, "shenzhen", SEGX_SHENZHEN_URL=server.url)
    assert result.returncode == 0, result.stderr
    assert f"sha256 {sha256(body)} (not verified" in result.stdout


def test_interrupted_download_resumes(tmp_path, server):
    server.files["ChinaSet_AllFiles.zip"] = body = shenzhen_zip()
    raw = tmp_path / "data" / "shenzhen" / "raw"
    raw.mkdir(parents=True)
    half = len(body) // 2
    (raw / "ChinaSet_AllFiles.zip.part").write_bytes(body[:half])
    result = run(tmp_path, "shenzhen", SEGX_SHENZHEN_URL=server.url, SEGX_SHENZHEN_SHA256=sha256(body))
    assert result.returncode == 0, result.stderr
    assert server.requests == [("/ChinaSet_AllFiles.zip", f"bytes={half}-")]
    assert (raw / "ChinaSet_AllFiles.zip").read_bytes() == body
    assert not (raw / "ChinaSet_AllFiles.zip.part").exists()
    assert "sha256 verified" in result.stdout


def test_complete_partial_file_is_accepted(tmp_path, server):
    server.files["ChinaSet_AllFiles.zip"] = body = shenzhen_zip()
    raw = tmp_path / "data" / "shenzhen" / "raw"
    raw.mkdir(parents=True)
    (raw / "ChinaSet_AllFiles.zip.part").write_bytes(body)
    result = run(tmp_path, "shenzhen", SEGX_SHENZHEN_URL=server.url, SEGX_SHENZHEN_SHA256=sha256(body))
    assert result.returncode == 0, result.stderr
    assert server.requests == [("/ChinaSet_AllFiles.zip", f"bytes={len(body)}-")]
    assert (raw / "ChinaSet_AllFiles.zip").read_bytes() == body


def test_missing_file_on_the_server_is_an_error(tmp_path, server):
    result = run(tmp_path, "shenzhen", SEGX_SHENZHEN_URL=server.url)
    assert result.returncode != 0
    assert "download of " in result.stderr and "404" in result.stderr
    assert not (tmp_path / "data" / "shenzhen" / "raw" / "ChinaSet_AllFiles.zip").exists()


def test_checksum_mismatch_moves_the_file_aside(tmp_path, server):
    server.files["ChinaSet_AllFiles.zip"] = body = shenzhen_zip()
    result = run(tmp_path, "shenzhen", SEGX_SHENZHEN_URL=server.url, SEGX_SHENZHEN_SHA256="0" * 64)
    assert result.returncode != 0
    raw = tmp_path / "data" / "shenzhen" / "raw"
    assert (raw / "ChinaSet_AllFiles.zip.bad").read_bytes() == body
    assert not (raw / "ChinaSet_AllFiles.zip").exists()
    assert not (tmp_path / "data" / "shenzhen" / "dataset").exists()
    assert "moved it aside" in result.stderr


def test_second_run_neither_downloads_nor_overwrites(tmp_path, server):
    server.files["ChinaSet_AllFiles.zip"] = body = shenzhen_zip()
    env = {"SEGX_SHENZHEN_URL": server.url, "SEGX_SHENZHEN_SHA256": sha256(body)}
    assert run(tmp_path, "shenzhen", **env).returncode == 0
    dataset = tmp_path / "data" / "shenzhen" / "dataset"
    labels = (dataset / "labels.csv").read_bytes()
    (dataset / "user_notes.txt").write_text("mine")

    again = run(tmp_path, "shenzhen", **env)
    assert again.returncode == 0 and "already exists; not overwriting it" in again.stdout
    assert len(server.requests) == 1
    assert (dataset / "labels.csv").read_bytes() == labels and (dataset / "user_notes.txt").read_text() == "mine"

    shutil.rmtree(dataset)
    third = run(tmp_path, "shenzhen", **env)
    assert third.returncode == 0, third.stderr
    assert "already downloaded" in third.stdout and "sha256 verified" in third.stdout
    assert len(server.requests) == 1
    assert (dataset / "labels.csv").read_bytes() == labels


def test_offline_prints_one_clear_line(tmp_path):
    port = closed_port()
    result = run(tmp_path, "shenzhen", SEGX_SHENZHEN_URL=f"http://127.0.0.1:{port}/")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot reach 127.0.0.1:{port}: you seem to be offline")
    assert "ChinaSet_AllFiles.zip manually, save it as" in lines[0]
    assert not (tmp_path / "data" / "shenzhen" / "dataset").exists()


def test_multi_file_dataset_fetches_every_file(tmp_path, server):
    train = [{"file_name": f"{100 + i}.png", "syms": ["Nodule"] if i % 2 else [], "boxes": []} for i in range(16)]
    test = [{"file_name": f"{200 + i}.png", "syms": ["Effusion", "Mass"] if i % 2 else [], "boxes": []} for i in range(6)]
    server.files.update({
        "train.json": json.dumps(train).encode(),
        "test.json": json.dumps(test).encode(),
        "train_data.zip": zip_bytes({f"train/{r['file_name']}": png_bytes(i) for i, r in enumerate(train)}),
        "test_data.zip": zip_bytes({f"test/{r['file_name']}": png_bytes(i) for i, r in enumerate(test)}),
    })
    checksums = {f"SEGX_CHESTX_DET10_{key}_SHA256": sha256(server.files[name]) for key, name in
                 [("TRAIN_JSON", "train.json"), ("TEST_JSON", "test.json"), ("TRAIN_IMAGES", "train_data.zip"),
                  ("TEST_IMAGES", "test_data.zip")]}
    result = run(tmp_path, "chestx-det10", SEGX_CHESTX_DET10_URL=server.url, **checksums)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("sha256 verified") == 4
    with pytest.warns(UserWarning):
        table = load_dataset(tmp_path / "data" / "chestx-det10" / "dataset").table.set_index("image_id")
    assert len(table) == 22
    assert table.loc["201", ["Effusion", "Mass", "Nodule"]].tolist() == [1, 1, 0]


def test_usage_and_unknown_dataset(tmp_path):
    usage = run(tmp_path, "-h")
    assert usage.returncode == 0 and "usage: python -m segx_helpers.cli.download <dataset>" in usage.stdout
    assert "./data_download.sh <dataset>" in usage.stdout
    assert "SEGX_<DATASET>_URL" in usage.stdout
    unknown = run(tmp_path, "nope")
    assert unknown.returncode == 2 and "unknown dataset 'nope'" in unknown.stderr


def fake_kaggle(bin_dir: Path) -> Path:
    """A stand-in ``kaggle`` CLI: copies $FAKE_KAGGLE_ZIP into the folder given by -p and logs its call."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "kaggle"
    script.write_text(
        '#!/bin/bash\necho "$*" >> "$FAKE_KAGGLE_LOG"\n'
        'while (($#)); do [[ $1 == -p ]] && dest=$2; shift; done\n'
        'cp "$FAKE_KAGGLE_ZIP" "$dest/segx-used-datasets.zip"\n'
    )
    script.chmod(0o755)
    return bin_dir


def test_kaggle_needs_the_cli(tmp_path):
    result = run(tmp_path, "segx-kaggle", PATH=f"{tmp_path / 'empty'}:/usr/bin:/bin", HOME=str(tmp_path))
    assert result.returncode != 0 and "needs the kaggle CLI" in result.stderr


def test_kaggle_needs_credentials(tmp_path):
    bin_dir = fake_kaggle(tmp_path / "bin")
    log = tmp_path / "kaggle.log"
    result = run(tmp_path, "segx-kaggle", PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(tmp_path / "home"),
                 FAKE_KAGGLE_LOG=str(log))
    assert result.returncode != 0
    assert "no Kaggle credentials" in result.stderr and "kaggle.json" in result.stderr
    assert "KAGGLE_USERNAME" in result.stderr and not log.exists()


def test_kaggle_bundle_is_unpacked_and_converted(tmp_path):
    """The bundle holds images.zip and masks.zip next to the metadata; both are unpacked and found."""
    ids = [f"ISIC_{i:07d}" for i in range(20)]
    metadata = "lesion_id,image_id,dx\n" + "".join(f"HAM_{i:04d},{i_d},{'mel' if i % 2 else 'nv'}\n"
                                                    for i, i_d in enumerate(ids))
    bundle = zip_bytes({
        "segx/HAM10000_metadata.csv": metadata.encode(),
        "segx/images.zip": zip_bytes({f"{i_d}.png": png_bytes(i, rgb=True) for i, i_d in enumerate(ids)}),
        "segx/masks.zip": zip_bytes({f"masks/{i_d}_segmentation.png": png_bytes(0, mask=True) for i_d in ids}),
    })
    (tmp_path / "bundle.zip").write_bytes(bundle)
    bin_dir = fake_kaggle(tmp_path / "bin")
    result = run(tmp_path, "segx-kaggle", "--which", "ham", PATH=f"{bin_dir}:/usr/bin:/bin",
                 HOME=str(tmp_path / "home"), KAGGLE_USERNAME="someone", KAGGLE_KEY="secret",
                 FAKE_KAGGLE_ZIP=str(tmp_path / "bundle.zip"), FAKE_KAGGLE_LOG=str(tmp_path / "kaggle.log"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kaggle.log").read_text().split()[:3] == ["datasets", "download", "mingchengzhu/segx-used-datasets"]
    with pytest.warns(UserWarning):
        ds = load_dataset(tmp_path / "data" / "segx-kaggle-ham" / "dataset")
    assert len(ds.table) == 20 and ds.table["mask_path"].notna().all()
    assert ds.table.set_index("image_id").loc["ISIC_0000001", "label"] == "mel"


# ------------------------------------------------------------------------------ reliability (issue 13)

def test_corrupt_archive_without_checksum_is_moved_aside(tmp_path, server):
    server.files["ChinaSet_AllFiles.zip"] = b"this is not a zip archive" * 10
    result = run(tmp_path, "shenzhen", SEGX_SHENZHEN_URL=server.url)
    raw = tmp_path / "data" / "shenzhen" / "raw"
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not a valid zip archive" in result.stderr and "moved it aside" in result.stderr
    assert (raw / "ChinaSet_AllFiles.zip.bad").is_file() and not (raw / "ChinaSet_AllFiles.zip").exists()
    server.files["ChinaSet_AllFiles.zip"] = shenzhen_zip()
    again = run(tmp_path, "shenzhen", SEGX_SHENZHEN_URL=server.url)
    assert again.returncode == 0, again.stderr
    assert len(load_dataset(tmp_path / "data" / "shenzhen" / "dataset").table) == 20


def test_empty_data_dir_and_inexact_dataset_names_are_refused(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SEGX_", "KAGGLE_"))}
    offline = {**base, "SEGX_SHENZHEN_URL": f"http://127.0.0.1:{closed_port()}/"}
    empty = subprocess.run([BASH, "data_download.sh", "shenzhen", "--data-dir", ""], cwd=REPO, env=offline,
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "--data-dir must not be empty" in empty.stderr
    for name in ("shenzhen montgomery", "shenzhen ", "ham10000 x", "sh*"):
        result = run(tmp_path, name, SEGX_SHENZHEN_URL=offline["SEGX_SHENZHEN_URL"])
        assert result.returncode == 2 and "unknown dataset" in result.stderr, name
    assert not (tmp_path / "data").exists()


def test_sha256_is_recorded_and_checked_on_re_runs(tmp_path, server):
    server.files["ChinaSet_AllFiles.zip"] = body = shenzhen_zip()
    env = {"SEGX_SHENZHEN_URL": server.url}
    first = run(tmp_path, "shenzhen", **env)
    assert first.returncode == 0, first.stderr
    raw = tmp_path / "data" / "shenzhen" / "raw"
    assert (raw / "SHA256SUMS").read_text() == f"{sha256(body)}  ChinaSet_AllFiles.zip\n"
    shutil.rmtree(tmp_path / "data" / "shenzhen" / "dataset")
    second = run(tmp_path, "shenzhen", **env)
    assert second.returncode == 0 and "matches the sha256 recorded" in second.stdout
    shutil.rmtree(tmp_path / "data" / "shenzhen" / "dataset")
    (raw / "ChinaSet_AllFiles.zip").write_bytes(body[:-10] + b"0123456789")
    tampered = run(tmp_path, "shenzhen", **env)
    assert tampered.returncode != 0 and "changed since it was downloaded" in tampered.stderr
    assert "moved it aside" in tampered.stderr and (raw / "ChinaSet_AllFiles.zip.bad").is_file()
    assert not (tmp_path / "data" / "shenzhen" / "dataset").exists() and len(server.requests) == 1


def test_https_first_with_a_noted_fallback_to_http(tmp_path, server, monkeypatch, capsys):
    """Default URLs use HTTPS; only a host listed in HTTP_FALLBACK_HOSTS whose HTTPS fails (here: the local
    server, which speaks plain HTTP) falls back to plain HTTP, saying so; any other host's failure is an error."""
    assert all(source.url.startswith("https://") for source in download.SOURCES)
    assert "resource.deepwise.com" in download.HTTP_FALLBACK_HOSTS
    assert "https://resource.deepwise.com/xraychallenge/train_data.zip" in {s.url for s in download.SOURCES}
    server.files["ChinaSet_AllFiles.zip"] = shenzhen_zip()
    https = server.url.replace("http://", "https://")
    monkeypatch.setenv("SEGX_SHENZHEN_URL", https)
    with pytest.raises(download.DownloadError, match="HTTPS"):
        download.download("shenzhen", data_dir=tmp_path / "refused")
    assert server.requests == []
    monkeypatch.setattr(download, "HTTP_FALLBACK_HOSTS", ("127.0.0.1",))
    out = download.download("shenzhen", data_dir=tmp_path / "data")
    assert "falling back to plain HTTP for ChinaSet_AllFiles.zip" in capsys.readouterr().out
    assert len(load_dataset(out).table) == 20 and [p for p, _ in server.requests] == ["/ChinaSet_AllFiles.zip"]


def test_the_python_call_is_what_a_notebook_on_colab_uses(tmp_path, server, monkeypatch):
    """``download(...)`` from Python, in-process, as a notebook cell calls it; a usage mistake is a clear error."""
    server.files["ChinaSet_AllFiles.zip"] = body = shenzhen_zip()
    monkeypatch.setenv("SEGX_SHENZHEN_URL", server.url)
    monkeypatch.setenv("SEGX_SHENZHEN_SHA256", sha256(body))
    out = download.download("shenzhen", data_dir=tmp_path / "root" / "data")
    assert out == tmp_path / "root" / "data" / "shenzhen" / "dataset" and len(load_dataset(out).table) == 20
    with pytest.raises(download.UsageError, match="unknown dataset 'nope'"):
        download.download("nope", data_dir=tmp_path)


def test_interrupted_run_leaves_only_the_resumable_part(tmp_path, server):
    import signal
    import time

    server.hang.add("ChinaSet_AllFiles.zip")
    temp = tmp_path / "tmp"
    temp.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SEGX_", "KAGGLE_"))}
    proc = subprocess.Popen([BASH, "data_download.sh", "shenzhen", "--data-dir", str(tmp_path / "data")], cwd=REPO,
                            env={**base, "SEGX_SHENZHEN_URL": server.url, "TMPDIR": str(temp)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    part = tmp_path / "data" / "shenzhen" / "raw" / "ChinaSet_AllFiles.zip.part"
    try:
        for _ in range(600):  # wait until the part file exists (a safety bound, not a timing assertion): killing
            if server.requests and part.is_file():  # at the request alone raced the part file's creation
                break
            time.sleep(0.1)
        assert server.requests, "the download never started"
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert list(temp.iterdir()) == []  # no temporary file left behind
    raw = tmp_path / "data" / "shenzhen" / "raw"
    assert [p.name for p in raw.iterdir()] == ["ChinaSet_AllFiles.zip.part"]  # what a re-run resumes from


# ------------------------------------------------------------------------------ ISIC 2018 trap sets

def isic_files(tmp_path, trap_set=1):
    """The files of isic2018-trap as the server holds them: the two official archives and the CSVs."""
    from test_real_converters import make_isic_trap

    raw = tmp_path / "fixture"
    make_isic_trap(raw, "official", n=12, trap_sets=(trap_set,))
    files = {"isic_bias.csv": (raw / "artefacts-annotation" / "isic_bias.csv").read_bytes()}
    for split in ("train", "val", "test"):
        name = f"isic_annotated_{split}{trap_set}.csv"
        files[name] = (raw / "trap-sets" / name).read_bytes()
    for folder in ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"):
        members = {f"{folder}/{p.name}": p.read_bytes() for p in sorted((raw / folder).iterdir())}
        members[f"{folder}/LICENSE.txt"] = b"CC BY-NC 4.0"
        files[f"{folder}.zip"] = zip_bytes(members)
    return files


def isic_checksums(files, trap_set=1):
    keys = {"isic_bias.csv": "ISIC_BIAS_CSV", "ISIC2018_Task1-2_Training_Input.zip": "ISIC2018_TASK1_INPUT",
            "ISIC2018_Task1_Training_GroundTruth.zip": "ISIC2018_TASK1_GROUNDTRUTH",
            **{f"isic_annotated_{s}{trap_set}.csv": f"ISIC_TRAP_{s.upper()}{trap_set}_CSV" for s in ("train", "val", "test")}}
    return {f"SEGX_{keys[name]}_SHA256": sha256(body) for name, body in files.items()}


def test_isic2018_trap_downloads_the_chosen_trap_set_and_converts(tmp_path, server):
    server.files.update(isic_files(tmp_path, trap_set=2))
    result = run(tmp_path, "isic2018-trap", "--trap-set", "2", SEGX_ISIC2018_TRAP_URL=server.url,
                 **isic_checksums(server.files, trap_set=2))
    assert result.returncode == 0, result.stderr
    fetched = [path for path, _ in server.requests]
    assert fetched == ["/isic_bias.csv", "/isic_annotated_train2.csv", "/isic_annotated_val2.csv",
                       "/isic_annotated_test2.csv", "/ISIC2018_Task1-2_Training_Input.zip",
                       "/ISIC2018_Task1_Training_GroundTruth.zip"]  # only trap set 2's lists, the CSVs first
    assert result.stdout.count("sha256 verified") == 6
    assert "CC BY-NC" in result.stdout and "Bissoto" in result.stdout
    assert "6 train / 2 val / 4 test" in result.stdout
    raw = tmp_path / "data" / "isic2018-trap" / "raw"
    manifest = (raw / "SHA256SUMS").read_text()
    assert all(f"{sha256(body)}  {name}" in manifest for name, body in server.files.items())
    ds = load_dataset(tmp_path / "data" / "isic2018-trap2" / "dataset")
    assert ds.info.name == "isic2018-trap2" and "trap set 2" in ds.info.source
    assert len(ds.table) == 12 and ds.table["mask_path"].notna().all()
    assert ds.table.groupby("split").size().to_dict() == {"test": 4, "train": 6, "val": 2}
    assert Image.open(ds.table["image_path"][0]).size == (256, 256)  # converted at the paper's 256 px
    artefacts = pd.read_csv(tmp_path / "data" / "isic2018-trap2" / "dataset" / "artefacts.csv")
    assert sorted(artefacts["image_id"]) == sorted(ds.table["image_id"]) and len(artefacts.columns) > 1


def test_isic2018_random_split_goes_to_its_own_folder(tmp_path, server):
    server.files.update(isic_files(tmp_path))
    result = run(tmp_path, "isic2018-trap", "--split", "random", SEGX_ISIC2018_TRAP_URL=server.url,
                 **isic_checksums(server.files))
    assert result.returncode == 0, result.stderr
    assert "stratified random split (seed 0) of the 12 annotated images" in result.stdout
    ds = load_dataset(tmp_path / "data" / "isic2018-random" / "dataset")
    assert ds.info.name == "isic2018-random" and len(ds.table) == 12
    artefacts = pd.read_csv(tmp_path / "data" / "isic2018-random" / "dataset" / "artefacts.csv")
    assert sorted(artefacts["image_id"]) == sorted(ds.table["image_id"]) and len(artefacts.columns) > 1
    assert not (tmp_path / "data" / "isic2018-trap" / "dataset").exists()


def test_isic2018_trap_pins_the_published_csvs(tmp_path, server):
    """Without overrides the CSVs must have the checksums of the pinned debiasing-skin commit."""
    server.files.update(isic_files(tmp_path))
    result = run(tmp_path, "isic2018-trap", SEGX_ISIC2018_TRAP_URL=server.url)
    assert result.returncode != 0
    assert "isic_bias.csv has sha256" in result.stderr and "moved it aside" in result.stderr
    assert [path for path, _ in server.requests] == ["/isic_bias.csv"]
    urls = {source.file: source.url for source in download.SOURCES}
    assert urls["isic_bias.csv"].startswith("https://raw.githubusercontent.com/alceubissoto/debiasing-skin/f93c865")
    assert urls["ISIC2018_Task1-2_Training_Input.zip"] == (
        "https://isic-challenge-data.s3.amazonaws.com/2018/ISIC2018_Task1-2_Training_Input.zip")


def test_isic2018_trap_offline_and_bad_options(tmp_path):
    port = closed_port()
    result = run(tmp_path, "isic2018-trap", SEGX_ISIC2018_TRAP_URL=f"http://127.0.0.1:{port}/")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot reach 127.0.0.1:{port}: you seem to be offline")
    assert "isic_bias.csv manually" in lines[0]
    bad = run(tmp_path, "isic2018-trap", "--trap-set", "6")
    assert bad.returncode != 0 and "--trap-set must be a number from 1 to 5" in bad.stderr
    other = run(tmp_path, "shenzhen", "--trap-set", "2")
    assert other.returncode != 0 and "--trap-set applies to isic2018-trap only" in other.stderr
    for args, message in ((["isic2018-trap", "--split", "shuffled"], "--split must be trap or random, got 'shuffled'"),
                          (["isic2018-trap", "--split", "random", "--trap-set", "2"], "exclude each other"),
                          (["shenzhen", "--split", "random"], "--split applies to isic2018-trap only")):
        bad = run(tmp_path, *args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


@pytest.mark.parametrize("args, message", [
    ([""], "the dataset name is empty; choose one of"),
    (["shenzhen", "montgomery"], "give one dataset, got 'shenzhen' and 'montgomery'"),
    (["--bogus", "shenzhen"], "unknown option '--bogus'"),
    ([], "no dataset given; choose one of"),
    (["shenzhen", "--which", "x"], "--which must be ham or chestx, got 'x'"),
    (["shenzhen", "--trap-set", "2"], "--trap-set applies to isic2018-trap only"),
    (["isic2018-trap", "--trap-set", "9"], "--trap-set must be a number from 1 to 5, got '9'"),
])
def test_command_line_mistakes_say_what_is_wrong_in_one_line(tmp_path, args, message):
    result = run(tmp_path, *args)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and lines[0].startswith("error: " + message), result.stderr
    assert lines[1:] == ["run python -m segx_helpers.cli.download -h for the usage"] and "usage:" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_a_data_dir_that_is_a_file_or_an_option_is_refused(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SEGX_", "KAGGLE_"))}
    (tmp_path / "file").write_text("not a folder")
    for data_dir, message in ((str(tmp_path / "file"), f"--data-dir {tmp_path / 'file'} exists and is not a folder"),
                              ("-x", "--data-dir needs a folder, got the option '-x' (write ./-x for a folder of that "
                                     "name)")):
        result = subprocess.run([BASH, "data_download.sh", "shenzhen", "--data-dir", data_dir], cwd=REPO, env=base,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.splitlines()[0] == "error: " + message, result.stderr
        assert "mkdir" not in result.stderr
    assert (tmp_path / "file").read_text() == "not a folder"
