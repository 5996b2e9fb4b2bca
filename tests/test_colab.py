"""Colab as a learner uses it (issue 33): an install that leaves Colab's pinned packages alone, ROOT where Colab's
file browser looks (or in Google Drive), notebooks that prepare what a fresh runtime lacks, every instruction and
link true there, and notebook 02 run on an emulated fresh Colab runtime that finds an earlier session's
results in Google Drive (tests/colab_emulation.py)."""
from __future__ import annotations

import hashlib
import re
import shutil
import sys
import tomllib
import types
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

from colab_emulation import (COLAB_REQUIRES, REPO, RESOLVER_ERROR, STAMP, Emulation, bare_clone, pins_changed,
                             read_pins, run_on_fresh_runtime)
from segx_helpers.workflows.settings import (COLAB_FOLDER, NOTEBOOKS, REPO_URL, colab_badge, default_root, docs_url,
                                             resolve_prepare_missing, tutorial_paths)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TOOLING = {"jupyterlab", "ipykernel", "ipython", "notebook", "papermill", "nbclient", "nbconvert", "tornado",
           "jupyter-client", "jupyter-server", "pytest", "sphinx", "myst-nb"}


def required() -> list[Requirement]:
    return [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]


def notebooks() -> dict[str, nbformat.NotebookNode]:
    return {name: nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4) for name in NOTEBOOKS}


# ------------------------------------------------------------------------------------------ the install

def test_required_dependencies_accept_every_colab_pin():
    pins = {name: version for section in read_pins().values() for name, version in section.items()}
    clashes = [f"{req} rejects Colab's {req.name}=={pins[req.name.lower()]}" for req in required()
               if req.name.lower() in pins and not req.specifier.contains(pins[req.name.lower()], prereleases=True)]
    assert clashes == []


def test_required_dependencies_leave_the_kernel_and_the_tooling_to_extras():
    names = {req.name.lower() for req in required()}
    assert names & TOOLING == set(), "Jupyter, papermill and test tools belong in the extras make installs"
    assert names & set(read_pins()["kernel"]) <= {"ipywidgets"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"jupyterlab", "ipykernel", "papermill"} <= {Requirement(r).name for r in extras["tutorial"]}
    assert "segx-helpers[tutorial,docs]" in extras["test"]
    assert '-e ".[test]"' in (REPO / "Makefile").read_text()  # make tutorial / make test install the extras


def test_the_pins_file_names_what_colab_pins():
    pins = read_pins()
    assert set(COLAB_REQUIRES) <= set(pins["kernel"])
    assert pins["kernel"]["ipykernel"] == "6.17.1" and pins["kernel"]["ipython"] == "7.34.0"
    assert {"torch", "torchvision", "numpy", "pandas", "matplotlib", "seaborn"} <= set(pins["preinstalled"])


def test_pins_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "pins.txt"
    bad.write_text("[kernel]\nipykernel>=6\n")
    with pytest.raises(ValueError, match=r"pins.txt:2: expected"):
        read_pins(bad)


# ------------------------------------------------------------------------------------------ ROOT and preparation

@pytest.fixture
def on_colab(monkeypatch):
    """A stand-in ``google.colab`` in ``sys.modules`` whose ``drive.mount`` records its mountpoint."""
    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mounted.append)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    return mounted


def test_root_is_the_repository_root_in_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    (tmp_path / "notebooks").mkdir()
    assert default_root(tmp_path / "notebooks")[0] == tmp_path.resolve()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert tutorial_paths().root == tmp_path.resolve()
    assert f"ROOT: {tmp_path.resolve()} (the folder above the notebook's" in capsys.readouterr().out
    assert resolve_prepare_missing(None) is False


def test_root_on_colab_is_a_folder_in_the_working_directory(tmp_path, monkeypatch, capsys, on_colab):
    monkeypatch.chdir(tmp_path)
    paths = tutorial_paths(None)
    assert paths.root == tmp_path.resolve() / COLAB_FOLDER and paths.root.is_dir()
    assert "on Colab" in capsys.readouterr().out and on_colab == []
    assert paths.dataset("synthetic-derm") == tmp_path.resolve() / COLAB_FOLDER / "data" / "synthetic-derm"
    assert resolve_prepare_missing(None) is True and "PREPARE_MISSING = None on Colab" in capsys.readouterr().out
    assert resolve_prepare_missing(False) is False and resolve_prepare_missing(True) is True


def test_google_drive_mounts_and_puts_root_in_my_drive(tmp_path, monkeypatch, capsys, on_colab):
    monkeypatch.chdir(tmp_path)
    paths = tutorial_paths(None, google_drive=True)
    assert on_colab == [str(tmp_path / "drive")]
    assert paths.root == (tmp_path / "drive" / "MyDrive" / COLAB_FOLDER).resolve()
    assert "Google Drive" in capsys.readouterr().out
    with pytest.raises(ValueError, match="either ROOT"):
        tutorial_paths(tmp_path, google_drive=True)


def test_google_drive_outside_colab_says_it_is_for_colab(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="Colab only"):
        tutorial_paths(None, google_drive=True)
    assert list(tmp_path.iterdir()) == []


def test_a_given_root_is_used_as_it_is_on_colab_too(tmp_path, on_colab):
    assert tutorial_paths(str(tmp_path / "mine")).root == (tmp_path / "mine").resolve()


# ------------------------------------------------------------------------------------------ the notebooks' text

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_and_setup_cells_use_the_one_root_mechanism(name):
    nb = notebooks()[name]
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    assert re.search(r"^ROOT = None +#", params.source, re.MULTILINE)
    assert re.search(r"^GOOGLE_DRIVE = False +#", params.source, re.MULTILINE)
    assert sum("paths = tutorial_paths(ROOT, GOOGLE_DRIVE)" in c.source for c in code) == 1
    assert not any("TutorialPaths.at(ROOT)" in c.source for c in code)
    if "PREPARE_MISSING" in params.source:
        assert re.search(r"^PREPARE_MISSING = None +#", params.source, re.MULTILINE)
        assert sum("PREPARE_MISSING = resolve_prepare_missing(PREPARE_MISSING)" in c.source for c in code) == 1


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_badges_and_links_agree_with_repo_url(name):
    nb = notebooks()[name]
    assert colab_badge(name) in nb.cells[0].source
    text = "\n".join(c.source for c in nb.cells)
    for url in re.findall(r"https://github\.com/[^\s)`\"']+", text):
        assert url == REPO_URL or url.startswith((REPO_URL + "/", "https://github.com/JasonZuu/")), url
    # a link to a page of the repository points at a file that exists; any other mention of a page is a full link
    # (a notebook opened on Colab has no docs/ folder next to it)
    for _label, page in re.findall(rf"\[([^\]]+)\]\({re.escape(REPO_URL)}/blob/main/([^)#]+)\)", text):
        assert (REPO / page).is_file(), f"{name} links {page}, which does not exist"
    unlinked = re.sub(rf"\[[^\]]+\]\({re.escape(REPO_URL)}/[^)]+\)", "", text)
    for page in re.findall(r"(?<![/\w])(docs/[\w.-]+\.md|README\.md)", unlinked):
        assert False, f"{name} names {page} as a path; link it as [{page}]({docs_url(page)})"


CHECKOUT_ONLY = ("./data_download.sh", "make tutorial", "make test", "make book", "outputs/report.md", "terminal")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_instruction_is_true_on_colab_or_marked_in_a_checkout(name):
    """A paragraph (markdown) or a line (code) that tells the learner to use what only a checkout has says so."""
    for cell in notebooks()[name].cells:
        pieces = cell.source.split("\n\n") if cell.cell_type == "markdown" else cell.source.splitlines()
        for piece in pieces:
            if any(word in piece for word in CHECKOUT_ONLY):
                assert "in a checkout" in " ".join(piece.lower().split()), f"{name}: {piece!r}"


def test_docs_url_is_built_from_repo_url():
    assert docs_url("docs/colab.md") == f"{REPO_URL}/blob/main/docs/colab.md"


def test_the_runner_outside_a_checkout_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from segx_helpers.cli import runner

    monkeypatch.setattr(runner, "NOTEBOOK_DIR", tmp_path / "site-packages" / "notebooks")
    assert runner.main(["--only", "01_dataset_prep"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a checkout" in err[0] and f"git clone {REPO_URL}" in err[0]
    assert not (tmp_path / "site-packages").exists()


def test_a_missing_real_dataset_says_which_command_makes_it(tmp_path):
    from segx_helpers.workflows.settings import MissingArtifactError, TutorialPaths, run_settings
    from segx_helpers.workflows.training_recipes import prepare_dataset

    with pytest.raises(MissingArtifactError, match=r"Make it first: python -m segx_helpers.cli.download ham10000 "
                                                   r"--data-dir .*/data"):
        prepare_dataset("ham10000", TutorialPaths.at(tmp_path), run_settings(True), prepare_missing=True)


# ------------------------------------------------------------------------------------------ the emulation

@pytest.fixture(scope="module")
def colab_env() -> Path:
    env = REPO / ".colab-venv"
    if not (env / STAMP).is_file():
        pytest.skip("no emulated Colab environment: make colab-env builds it (make test does)")
    return env


@pytest.mark.notebooks
def test_notebook_02_on_a_fresh_colab_runtime_finds_the_last_sessions_results_in_google_drive(
        colab_env, tutorial_in_progress, tmp_path):
    """The committed HEAD, installed as Colab's setup cell installs it, in quick mode (no GPU here): notebook 02 in a
    folder holding only itself, with ``GOOGLE_DRIVE = True`` and a Drive holding what notebooks 01 and 02 left
    there in an earlier session (the test suite's own quick-mode run of them, copied), so it reuses both, changes
    neither and writes nothing to the working directory: results persist between runtimes. (Preparing a missing
    dataset: tests/test_recipes.py; ROOT's default on Colab: test_root_on_colab_is_a_folder_in_the_working_directory;
    notebook 05 preparing 01 to 04 on a fresh runtime, and 01 to 07 one after another through the Drive:
    docs/NOTES.md, "Colab, emulated"; here one notebook, without training, keeps make test within its time.)"""
    earlier = tutorial_in_progress.finished("02_train_segmenter")
    drive = tmp_path / "drive"
    in_drive = drive / COLAB_FOLDER  # the folder the stand-in drive.mount links as MyDrive
    shutil.copytree(earlier / "data" / "synthetic-derm", in_drive / "data" / "synthetic-derm")
    (in_drive / "artifacts" / "synthetic-derm").mkdir(parents=True)
    segmenter = in_drive / "artifacts" / "synthetic-derm" / "segmenter.pt"
    shutil.copy2(earlier / "artifacts" / "synthetic-derm" / "segmenter.pt", segmenter)
    before = hashlib.sha256(segmenter.read_bytes()).hexdigest()
    clone = bare_clone(REPO, tmp_path / "segx-tutorials.git")
    run = run_on_fresh_runtime("02_train_segmenter", Emulation(colab_env, clone, drive), tmp_path / "runtime")
    assert RESOLVER_ERROR not in run.setup_output and "ERROR" not in run.setup_output, run.setup_output
    assert pins_changed(run.versions_after) == {}
    text = run.text()
    assert "mode: quick" in text
    assert "ROOT: " in text and f"/MyDrive/{COLAB_FOLDER} (in your Google Drive" in text
    assert "dataset: synthetic-derm as generated under ROOT" in text  # found in the Drive, not generated again
    assert hashlib.sha256(segmenter.read_bytes()).hexdigest() == before  # reused, not trained again
    assert "Dice" in text and (in_drive / "outputs" / "synthetic-derm" / "segmentation_metrics.csv").is_file()
    assert sorted(p.name for p in run.workdir.iterdir()) == ["02_train_segmenter.ipynb", "drive"]
