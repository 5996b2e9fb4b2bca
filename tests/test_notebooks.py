"""The notebooks: committed clean, uniform structure, Colab cell a no-op outside Colab, and executed in quick mode."""
from __future__ import annotations

import json
import subprocess
import sys
import types

import nbformat
import pytest

from segx_helpers.notebook import NOTEBOOKS, REPO_URL, colab_setup_source, resolve_quick
from segx_helpers import runner
from segx_helpers.runner import (NOTEBOOK_DIR, available_notebooks, notebook_parameters, parameters_per_notebook,
                                 parse_args, parse_value, run_notebooks)

NAMES = available_notebooks()


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def test_every_tutorial_notebook_exists():
    assert NAMES == list(NOTEBOOKS)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_structure(name):
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit notebooks without outputs"
    assert "colab.research.google.com" in nb.cells[0].source and f"notebooks/{name}.ipynb" in nb.cells[0].source
    assert code[0].source == colab_setup_source(), "run the Colab cell sync: its source must come from REPO_URL"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "QUICK = None " in params[0].source and "ROOT" in params[0].source
    # QUICK = None is resolved to a boolean first thing in the setup cell, before any use of QUICK
    setup = code[code.index(params[0]) + 1].source
    resolved = setup.index("QUICK = resolve_quick(QUICK)")
    assert "QUICK" not in setup[:resolved]
    assert "What you learned" in nb.cells[-1].source


def test_resolve_quick_picks_quick_on_a_cpu_and_full_on_a_gpu(capsys):
    assert resolve_quick(None, device="cpu") is True
    assert "quick" in capsys.readouterr().out.splitlines()[0]
    assert resolve_quick(None, device="cuda") is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "full" in out and "GPU" in out
    assert resolve_quick(True, device="cuda") is True and resolve_quick(False, device="cpu") is False
    assert "explicitly" in capsys.readouterr().out
    assert isinstance(resolve_quick(None), bool)  # the detected device


def test_colab_cell_is_a_noop_outside_colab(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(colab_setup_source(), {})
    assert calls == []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(colab_setup_source(), {})
    assert len(calls) == 1 and f"git+{REPO_URL}" in calls[0][0]


@pytest.mark.parametrize("text, value", [("True", True), ("false", False), ("None", None), ("3", 3), ("0.5", 0.5),
                                         ("[1, 2]", [1, 2]), ("'quoted'", "quoted"), ("resnet50", "resnet50"),
                                         ("my-xrays", "my-xrays"), ("", ""), ("a b", "a b")])
def test_runner_parameter_values_are_literals_or_strings(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_runner_command_line_sets_dataset_and_parameters():
    args, parameters = parse_args(["--dataset", "my-xrays", "-p", "REAL_DATA=True", "-p", "ARCH=densenet121",
                                   "--parameter", "P=2.5", "-p", "ENCODER_WEIGHTS=None", "--full", "--only", "03_train_classifier"])
    assert args.full and args.only == ["03_train_classifier"]
    assert parameters == {"REAL_DATA": True, "ARCH": "densenet121", "P": 2.5, "ENCODER_WEIGHTS": None,
                          "DATASET": "my-xrays"}
    assert parse_args([])[1] == {}


@pytest.mark.parametrize("argv", [["-p", "QUICK=False"], ["-p", "ROOT=/tmp"], ["-p", "novalue"], ["-p", "1X=2"],
                                  ["--dataset", "a", "-p", "DATASET=b"]])
def test_runner_command_line_refuses_bad_parameters(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_runner_gives_each_notebook_the_parameters_it_declares():
    assert {"DATASET", "QUICK", "ROOT", "P", "CAM_METHOD_2"} <= set(notebook_parameters("04_segx_maps"))
    per = parameters_per_notebook(NAMES, {"DATASET": "mine", "ARCH": "resnet50", "NEW_DATASET": "other"})
    for name in NAMES:
        declared = set(notebook_parameters(name))
        assert per[name] == {k: v for k, v in {"DATASET": "mine", "ARCH": "resnet50", "NEW_DATASET": "other"}.items()
                             if k in declared}
    assert all(per[n]["DATASET"] == "mine" for n in NAMES[:5]) and "DATASET" not in per["06_adapt_new_modality"]
    assert per["03_train_classifier"]["ARCH"] == "resnet50" and per["06_adapt_new_modality"] == {"NEW_DATASET": "other"}
    with pytest.raises(ValueError, match="DATASETT"):
        parameters_per_notebook(NAMES, {"DATASETT": "typo"})
    with pytest.raises(ValueError, match="NEW_DATASET"):
        parameters_per_notebook(["01_dataset_prep"], {"NEW_DATASET": "only in 06"})


def test_runner_main_passes_the_parameters_on(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(runner, "run_notebooks", lambda root, **kw: calls.update(root=root, **kw) or {"01_dataset_prep": 1.0})
    monkeypatch.setattr(runner, "write_report", lambda root, dataset="synthetic-derm": calls.update(report=dataset))
    assert runner.main(["--root", str(tmp_path), "--dataset", "my-xrays", "-p", "SEED=3"]) == 0
    assert calls["extra_parameters"] == {"SEED": 3, "DATASET": "my-xrays"} and calls["quick"] is True
    assert calls["report"] == "my-xrays"


@pytest.mark.notebooks
def test_tutorial_runs_in_quick_mode(tmp_path):
    """Execute every notebook in order, as `make tutorial` does, and check what they leave behind."""
    from segx_helpers.report import write_report

    timings = run_notebooks(tmp_path, quick=True)
    assert list(timings) == NAMES
    out = tmp_path / "outputs"
    for name in NAMES:
        assert (out / "notebooks" / f"{name}.ipynb").is_file()
    figures = out / "synthetic-derm" / "figures"
    for figure in ("01_examples.png", "02_worst_cases.png", "03_shortcut_accuracy.png", "04_gallery.png",
                   "05_risk_coverage.png"):
        assert (figures / figure).stat().st_size > 10_000, figure
    assert (tmp_path / "artifacts" / "synthetic-derm" / "classifier.pt").is_file()
    summary = json.loads((out / "synthetic-derm" / "segu" / "summary.json").read_text())
    assert {row["score"] for row in summary["separation"]} >= {"c_IoU", "c_AUITC", "confidence"}
    report = write_report(tmp_path).read_text()
    assert "Missing" not in report and "AUROC" in report


@pytest.mark.notebooks
def test_notebook_06_runs_unchanged_on_any_folder_in_the_format(tmp_path, make_tiny_dataset):
    """Notebook 06 on two folders that are not its default: a multi-class RGB one (synthetic dermoscopy, a
    generator's output used as a plain folder) and a multi-label grayscale one with no modality it knows."""
    from segx_helpers.data import SyntheticConfig, generate_synthetic_derm, load_dataset

    generate_synthetic_derm(tmp_path / "data" / "my-derm", SyntheticConfig(n_images=80, image_size=64, seed=0),
                            progress=False)
    make_tiny_dataset(name="data/my-gray", n=80, task="multilabel", size=64, channels=1)
    for name, task, channels in (("my-derm", "multiclass", 3), ("my-gray", "multilabel", 1)):
        run_notebooks(tmp_path, quick=True, only=["06_adapt_new_modality"],
                      extra_parameters={"NEW_DATASET": name, "IMAGE_SIZE": 64})
        executed = nbformat.read(tmp_path / "outputs" / "notebooks" / "06_adapt_new_modality.ipynb", as_version=4)
        text = "\n".join(out.get("text", "") for cell in executed.cells for out in cell.get("outputs", []))
        assert f"{task}, {channels} channel(s)" in text and "test macro AUROC" in text, name
        assert f"import_folder: channels={channels}" in text, name  # detected, not passed
        assert text.count("DatasetFormatError") == 3, name  # every fault but the grey mask is refused, naming the file
        imported = load_dataset(tmp_path / "outputs" / name / "byo_demo" / "my_dataset")
        assert imported.info.task == task and imported.info.channels == channels and len(imported.table) == 60
        figures = tmp_path / "outputs" / name / "figures"
        assert (figures / "06_augmentation.png").stat().st_size > 5_000, name
    # the last run (my-gray): a modality the defaults do not list keeps both flips and +-15 degrees
    assert "training augmentation horizontal flips, vertical flips, rotations up to +-15 degrees" in text


@pytest.mark.notebooks
def test_real_data_path_runs_on_a_tiny_isic_trap_copy(tmp_path):
    """Notebooks 01-05 with REAL_DATA on a fixture-sized isic2018-trap (60 images at 64 px), as the converter
    makes it from the official layout: CI cannot download the real data, but a broken real-data path fails here."""
    import pandas as pd
    from test_real_converters import make_isic_trap

    from segx_helpers.checkpoints import load_trained
    from segx_helpers.data.real import convert_isic2018_trap

    make_isic_trap(tmp_path / "raw", "official", n=60, size=64)
    convert_isic2018_trap(tmp_path / "raw", tmp_path / "data" / "isic2018-trap", verbose=False)
    names = NAMES[:5]
    timings = run_notebooks(tmp_path, quick=True, only=names,
                            extra_parameters={"DATASET": "isic2018-trap", "REAL_DATA": 64})
    assert list(timings) == names
    out = tmp_path / "outputs" / "isic2018-trap"
    trap = pd.read_csv(out / "artefact_label_correlation.csv").set_index(["split", "artefact"])["phi"]
    assert trap["train", "ruler"] > 0.9 and trap["test", "ruler"] < -0.5
    breakdown = pd.read_csv(out / "artefact_breakdown.csv")
    assert set(breakdown["artefact"]) == {"dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches"}
    assert (breakdown.groupby("artefact")["images"].sum() == 16).all()  # every test image, once per artefact
    localisation = pd.read_csv(out / "localisation_by_artefact.csv")
    assert {"original IoU@5%"} <= set(localisation["score"])
    segu = pd.read_csv(out / "segu" / "segu_by_artefact.csv")
    assert {"c_IoU", "c_AUITC", "confidence"} == set(segu["score"])
    assert segu["stratum"].str.startswith(("small", "medium", "large", "all strata")).all()
    for kind in ("segmenter", "classifier"):  # REAL_DATA = 64 reached every notebook alike
        assert load_trained(tmp_path / "artifacts" / "isic2018-trap" / f"{kind}.pt", kind).meta["image_size"] == 64
