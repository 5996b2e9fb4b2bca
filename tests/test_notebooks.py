"""The notebooks: committed clean, uniform structure, Colab cell a no-op outside Colab, and executed in quick mode."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import nbformat
import pytest

from segx_helpers.workflows.report import read_run_records
from segx_helpers.workflows.settings import NOTEBOOKS, REPO_URL, colab_setup_source, resolve_quick, run_settings
from segx_helpers.workflows.training_recipes import classifier_config, segmenter_config
from segx_helpers.cli import runner
from notebook_run import DATASET, executed_text
from segx_helpers.cli.runner import (NOTEBOOK_DIR, available_notebooks, notebook_parameters, parameters_per_notebook,
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


@pytest.mark.parametrize("device, quick", [("cpu", True), ("cuda", False), ("mps", False)])
def test_resolve_quick_detects_the_device_when_none_is_given(monkeypatch, capsys, device, quick):
    import torch

    from segx_helpers.models import networks

    monkeypatch.setattr(networks, "pick_device", lambda *a, **k: torch.device(device))
    assert resolve_quick(None) is quick
    assert ("quick" if quick else "full") in capsys.readouterr().out


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


def test_fast_cpu_kernels_reach_both_trainings_and_only_when_asked():
    per = parameters_per_notebook(NAMES, {"CPU_FAST_KERNELS": True})
    assert {name for name in NAMES if per[name]} == {"02_train_segmenter", "03_train_classifier"}
    fast, plain = run_settings(True, cpu_fast_kernels=True), run_settings(True)
    assert not plain.cpu_fast_kernels and not segmenter_config(plain).cpu_fast_kernels
    assert segmenter_config(fast).cpu_fast_kernels and classifier_config(fast).cpu_fast_kernels
    assert dataclasses.replace(fast, cpu_fast_kernels=False) == plain  # nothing else changes


def test_kernel_environment_is_set_while_a_kernel_starts_and_restored(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("SEGX_TEST_UNSET", raising=False)
    with runner.kernel_environment(MPLBACKEND=runner.INLINE_BACKEND, SEGX_TEST_UNSET="1"):
        assert os.environ["MPLBACKEND"] == runner.INLINE_BACKEND and os.environ["SEGX_TEST_UNSET"] == "1"
    assert os.environ["MPLBACKEND"] == "Agg" and "SEGX_TEST_UNSET" not in os.environ


def test_the_runners_kernels_start_without_the_plain_tcp_warning(tmp_path, capfd):
    """A notebook executed by the runner starts its kernel with encrypted transport: no "Kernel is running over TCP
    without encryption" on the terminal (make tutorial used to print it once per notebook)."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell("QUICK = True", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print('ran', QUICK)")]
    nbformat.write(nb, folder / "tiny.ipynb")
    run_notebooks(tmp_path, quick=True, only=["tiny"], notebook_dir=folder)
    executed = nbformat.read(tmp_path / "outputs" / "notebooks" / "tiny.ipynb", as_version=4)
    assert executed.cells[-1].outputs[0]["text"] == "ran True\n"
    captured = capfd.readouterr()
    assert "without encryption" not in captured.err + captured.out


def test_runner_main_passes_the_parameters_on(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(runner, "run_notebooks", lambda root, **kw: calls.update(root=root, **kw) or {"01_dataset_prep": 1.0})
    monkeypatch.setattr(runner, "write_report", lambda root, dataset="synthetic-derm": calls.update(report=dataset))
    assert runner.main(["--root", str(tmp_path), "--dataset", "my-xrays", "-p", "SEED=3"]) == 0
    assert calls["extra_parameters"] == {"SEED": 3, "DATASET": "my-xrays"} and calls["quick"] is True
    assert calls["report"] == "my-xrays"


# ---------------------------------------------------------------- the tutorial, run once (tests/notebook_run.py)
# Each test below reads the one quick-mode run of the eight notebooks (the session fixture ``tutorial_run``);
# taking the fixture marks a test ``notebooks``. Values come from outputs/summary.json and the notebooks' own files.

def _probability(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_tutorial_runs_every_notebook_in_order(tutorial_run):
    assert list(tutorial_run.timings) == NAMES
    for name in NAMES:
        assert (tutorial_run.root / "outputs" / "notebooks" / f"{name}.ipynb").is_file()
    records = read_run_records(tutorial_run.root)  # outputs/timings.json: how each notebook ran
    assert {name: record["seconds"] for name, record in records.items()} == tutorial_run.timings
    assert all(record["mode"] == "quick" and record["device"] == "cpu" for record in records.values())
    summary = tutorial_run.summary()
    assert summary["quick"] is True and summary["seed"] == 0


def test_tutorial_keeps_its_figures_in_the_executed_notebooks(tutorial_run):
    """make book renders the executed copies: every notebook that draws a figure keeps it as a picture."""
    for name in NAMES:
        pictures = [out for cell in tutorial_run.executed(name).cells for out in cell.get("outputs", [])
                    if "image/png" in out.get("data", {})]
        assert len(pictures) >= 2, name


# Which notebook writes which section of outputs/summary.json (besides quick and seed): what each one measured.
SUMMARY_SECTIONS = {
    "02_train_segmenter": {"segmenter"},
    "03_train_classifier": {"classifier"},
    "05_segu_analysis": {"segu", "confidence", "predicted_class", "aurc", "augrc", "shortcut_by_distance",
                         "shortcut_by_distance_block_before", "shortcut_by_distance_patch_present"},
    "07_train_with_the_mask": {"fix"},
    "08_from_where_to_what": {"reveal"},
}


def test_tutorial_summary_holds_a_section_from_each_measuring_notebook(tutorial_run):
    full = json.loads((tutorial_run.root / "outputs" / "summary.json").read_text())
    assert set(full) == {DATASET}  # notebook 07's chest X-ray section runs in full mode only (CXR = None)
    assert set(full[DATASET]) == {"quick", "seed"}.union(*SUMMARY_SECTIONS.values())
    assert all(entry["quick"] is True and entry["seed"] == 0 for entry in full.values())


def test_tutorial_notebooks_03_and_07_measure_the_same_baseline(tutorial_run):
    """Notebook 07 re-evaluates notebook 03's classifier on the same test split: a notebook that trained, loaded or
    split something else would differ here."""
    summary = tutorial_run.summary()
    for key in ("auroc", "accuracy", "shortcut_driven_rate"):
        assert summary["fix"]["baseline"][key] == pytest.approx(summary["classifier"][key]), key


def test_tutorial_segmenter_finds_the_lesions(tutorial_run):
    segmenter = tutorial_run.summary()["segmenter"]
    low, high = segmenter["dice_ci"]
    assert segmenter["dice"] > 0.85 and low <= segmenter["dice"] <= high  # 0.931-0.950 over seeds 0-2 (NOTES)
    assert (tutorial_run.root / "artifacts" / DATASET / "segmenter.pt").is_file()


def test_tutorial_classifier_learns_and_uses_the_shortcut(tutorial_run):
    classifier = tutorial_run.summary()["classifier"]
    assert classifier["auroc"] > 0.6 and _probability(classifier["accuracy"])  # AUROC 0.62-0.79 over seeds 0-2 (NOTES)
    assert 0.0 < classifier["shortcut_driven_rate"] < 1.0  # some test predictions flip with their patch twin
    assert (tutorial_run.root / "artifacts" / DATASET / "classifier.pt").is_file()
    # issue 32: what initialised it, the cut-offs chosen on validation and the decides check
    assert classifier["weights"] == "random" and len(classifier["thresholds"]) == 3
    assert sum(classifier["thresholds"]) == pytest.approx(1.0)
    assert sum(classifier["predicted_share"].values()) == pytest.approx(1.0)
    assert {"lesion area", "patch"} <= set(classifier["baseline_auroc"]) and isinstance(classifier["decides"], bool)


def test_tutorial_segu_analysis_scores_both_methods_against_confidence(tutorial_run):
    summary = tutorial_run.summary()
    for method in ("gradcam", "gradient_shap"):
        for score in ("c_iou", "c_auitc"):
            entry = summary["segu"][method][score]
            assert _probability(entry["auroc_incorrect"]), (method, score)
            low, high = entry["auroc_incorrect_ci"]
            assert low <= entry["auroc_incorrect"] <= high, (method, score)
    assert _probability(summary["segu"]["gradcam"]["c_iou"]["auroc_shortcut"])  # synthetic: twins give the truth
    assert _probability(summary["confidence"]["auroc_incorrect"])
    for curve in ("aurc", "augrc"):
        assert set(summary[curve]) == {"confidence", "segu", "combined"}
        assert all(_probability(v) for v in summary[curve].values()), curve
    for name in ("confidence", "segu", "combined"):  # AUGRC weighs each coverage's risk by the coverage: never more
        assert 0.0 < summary["augrc"][name] <= summary["aurc"][name], name
    segu = tutorial_run.segu_summary()
    assert {row["certainty"] for row in segu["separation"]} >= {"c_IoU", "c_AUITC", "confidence"}
    assert {row["group"] for row in segu["separation"]} == {"gradcam", "gradient_shap"}
    kinds = {row["errors"] for row in segu["by_error_type"]}  # "other error" only when the run made one
    assert {"all errors", "artefact present", "artefact absent"} <= kinds <= {"all errors", "artefact present",
                                                                              "artefact absent", "other error"}
    assert set(segu["aurc"]) >= {"confidence", "SegU c_IoU (Grad-CAM)", "confidence × c_IoU"}
    variants = [row["variant"] for row in segu["ablation_method"]]
    assert variants[:3] == ["Grad-CAM, last block", "Grad-CAM, block before", "LayerCAM, block before"]
    assert variants[3].startswith("Gradient SHAP") and variants[4] == "classifier confidence (baseline)"
    masks = {row["masks"]: row["auroc"] for row in segu["ablation_masks"]}
    assert list(masks) == ["predicted (U-Net)", "ground truth", "shifted by 1/2 image", "dilated by 12 px"]
    assert all(_probability(v) for v in masks.values())
    assert masks["predicted (U-Net)"] == pytest.approx(segu["ablation_method"][0]["auroc"])  # the same c_IoU, twice


def test_tutorial_measures_segu_by_the_patch_distance(tutorial_run):
    """Notebook 05 section 6 (issue 23): per distance bin, in pixels and Grad-CAM cells, for both layers and for
    the images that carry the patch, the AUROC of c_IoU, c_AUITC, confidence and the predicted class alone for
    flagging shortcut-driven predictions; the bins hold every test prediction once; notebook 07 gives the rate per bin for every model."""
    import pandas as pd

    summary = tutorial_run.summary()
    keys = ("shortcut_by_distance", "shortcut_by_distance_block_before", "shortcut_by_distance_patch_present")
    for key in keys:
        rows = summary[key]
        assert [row["bin"] for row in rows] == ["0-8 px (0-0.25 cell)", "8-20 px (0.25-0.62 cell)", "20+ px (0.62+ cell)"]
        for row in rows:
            assert 0 < row["n_shortcut_driven"] < row["n"], (key, row["bin"])
            assert row["distance_px"][0] < row["distance_px"][1] and row["distance_cells"][0] == row["distance_px"][0] / 32
            for score in ("c_iou", "c_auitc", "confidence", "predicted_class"):
                assert _probability(row[f"{score}_auroc"]), (key, row["bin"], score)
                assert row[f"{score}_auroc_low"] <= row[f"{score}_auroc"] <= row[f"{score}_auroc_high"]
    rows = summary["shortcut_by_distance"]
    n_test = len(tutorial_run.summary_rows("gradcam"))
    assert sum(row["n"] for row in rows) == n_test
    assert sum(row["n_shortcut_driven"] for row in rows) == round(summary["classifier"]["shortcut_driven_rate"] * n_test)
    assert summary["shortcut_by_distance_block_before"][0]["n"] == rows[0]["n"]
    assert _probability(summary["predicted_class"]["auroc_shortcut"])  # the predicted class alone, over all bins
    assert (tutorial_run.outputs / "figures" / "05_segu_by_distance.png").is_file()
    rates = pd.read_csv(tutorial_run.outputs / "fix_rate_by_distance.csv")
    assert set(rates["model"]) == {"baseline", "control (no fix)", "RRR", "background"}
    assert rates.groupby("model")["n"].sum().eq(n_test).all()


def test_tutorial_fixes_are_compared(tutorial_run):
    """Notebook 07 on synthetic-derm. Its chest X-ray section is skipped in quick mode and says so; the same
    computation on a multi-label set is tests/test_mask_training.py::test_the_fix_comparison_on_a_multilabel_grayscale_set."""
    fix = tutorial_run.summary()["fix"]
    assert {"baseline", "control", "rrr", "background"} <= set(fix)
    for model in ("baseline", "control", "rrr", "background"):
        assert _probability(fix[model]["accuracy"]) and _probability(fix[model]["auroc"]), model
        assert _probability(fix[model]["shortcut_driven_rate"]), model
        for key in ("accuracy", "auroc", "shortcut_driven_rate", "artefact_mass", "segu_c_iou_mean"):
            low, high = fix[model][f"{key}_ci"]
            assert low <= fix[model][key] <= high, (model, key)
    # swapping the background away from the patch takes most of the shortcut away (0.51 -> 0.15 in the NOTES' run)
    assert fix["background"]["shortcut_driven_rate"] < fix["baseline"]["shortcut_driven_rate"]
    assert fix["background"]["artefact_mass"] < fix["baseline"]["artefact_mass"]
    assert fix["chosen"]["rrr"].startswith("RRR") and fix["chosen"]["background"].startswith("background")
    assert set(fix["targets_met"]) == {"control", "rrr", "background"}
    assert "chest X-ray section skipped (CXR = None)" in tutorial_run.text("07_train_with_the_mask")


def test_tutorial_notebook_08_names_what_the_least_certain_predictions_looked_at(tutorial_run):
    """Issue 34: the reveal entry has exactly the issue's schema, its clusters cover the collected predictions, the
    shares are probabilities, and the revised classifier is measured with the twins against the same baseline as 07."""
    reveal = tutorial_run.summary()["reveal"]
    assert set(reveal) == {"n_low_segu", "n_clusters", "clusters", "patch_cluster_purity", "patch_cluster_recall",
                           "revise"}
    assert isinstance(reveal["n_low_segu"], int) and reveal["n_clusters"] == len(reveal["clusters"]) >= 2
    assert sum(c["size"] for c in reveal["clusters"]) == reveal["n_low_segu"]
    for cluster in reveal["clusters"]:
        assert set(cluster) == {"size", "shortcut_driven_share", "artefact_share"} and isinstance(cluster["size"], int)
        assert set(cluster["artefact_share"]) == {"patch", "ruler", "hair", "vignette"}
        assert _probability(cluster["shortcut_driven_share"]) and all(map(_probability, cluster["artefact_share"].values()))
    assert _probability(reveal["patch_cluster_purity"]) and _probability(reveal["patch_cluster_recall"])
    revise = reveal["revise"]
    assert set(revise) == {"baseline_shortcut_driven_rate", "revised_shortcut_driven_rate", "revised_accuracy"}
    assert all(map(_probability, revise.values()))
    assert revise["baseline_shortcut_driven_rate"] == pytest.approx(tutorial_run.summary()["fix"]["baseline"]["shortcut_driven_rate"])
    import pandas as pd

    comparison = pd.read_csv(tutorial_run.outputs / "reveal_comparison.csv")
    assert set(comparison["model"]) == {"baseline", "revised", "07: control (no fix)", "07: RRR", "07: background"}
    rates = pd.read_csv(tutorial_run.outputs / "reveal_rate_by_distance.csv")
    assert set(rates["model"]) == set(comparison["model"]) and len(rates) == 5 * len(set(rates["bin"]))
    assert "From where to what" in (tutorial_run.root / "outputs" / "report.md").read_text()


def test_tutorial_writes_its_figures_and_report(tutorial_run):
    from segx_helpers.workflows.report import write_report

    figures = tutorial_run.outputs / "figures"
    for figure in ("01_examples.png", "02_worst_cases.png", "03_shortcut_accuracy.png", "04_gallery.png",
                   "05_risk_coverage.png", "07_fix_comparison.png", "08_cluster_crops.png", "08_revise_comparison.png"):
        assert (figures / figure).is_file(), figure
    report = write_report(tutorial_run.root).read_text()
    assert "Missing" not in report and "AUROC" in report


def test_tutorial_notebook_06_adapts_to_the_cxr_set(tutorial_run):
    text = tutorial_run.text("06_adapt_new_modality")
    assert "multilabel, 1 channel(s)" in text and "test macro AUROC" in text
    assert "import_folder: channels=1" in text  # detected, not passed
    assert text.count("DatasetFormatError") == 3


# The smallest folders that reach every cell of notebook 06: 60 images (import_folder copies 60), 32 px (the
# U-Net's minimum), the fewest batches its quick mode trains.
FOLDER_IMAGES, FOLDER_SIZE = 60, 32


@pytest.mark.notebooks
def test_notebook_06_runs_unchanged_on_any_folder_in_the_format(tmp_path, make_tiny_dataset):
    """Notebook 06 on a folder that is not its default: multi-class, RGB, of a modality the defaults do not list.
    (The tutorial's own run of notebook 06 is the multi-label grayscale case: test_tutorial_notebook_06_adapts_to_the_cxr_set.)"""
    from segx_helpers.data import load_dataset

    make_tiny_dataset(name="data/my-folder", n=FOLDER_IMAGES, task="multiclass", size=FOLDER_SIZE, channels=3)
    run_notebooks(tmp_path, quick=True, only=["06_adapt_new_modality"],
                  extra_parameters={"NEW_DATASET": "my-folder", "IMAGE_SIZE": FOLDER_SIZE})
    executed = nbformat.read(tmp_path / "outputs" / "notebooks" / "06_adapt_new_modality.ipynb", as_version=4)
    text = executed_text(executed)
    assert "multiclass, 3 channel(s)" in text and "test macro AUROC" in text
    assert "import_folder: channels=3" in text  # detected, not passed
    assert text.count("DatasetFormatError") == 3  # every fault but the grey mask is refused, naming the file
    imported = load_dataset(tmp_path / "outputs" / "my-folder" / "byo_demo" / "my_dataset")
    assert imported.info.task == "multiclass" and imported.info.channels == 3 and len(imported.table) == 60
    assert (tmp_path / "outputs" / "my-folder" / "figures" / "06_augmentation.png").is_file()
    # a modality the defaults do not list keeps both flips and +-15 degrees
    assert "training augmentation horizontal flips, vertical flips, rotations up to +-15 degrees" in text


@pytest.mark.notebooks
def test_real_data_path_runs_on_a_tiny_isic_trap_copy(tmp_path):
    """Notebooks 01-05, 07 and 08 with REAL_DATA on a fixture-sized isic2018-trap (60 images at 64 px), as the
    converter makes it from the official layout: CI cannot download the real data, but a broken real-data path fails
    here. 07 and 08 must take REAL_DATA too: without it they would ask for a 128 px classifier and stop at the
    fingerprint check."""
    import pandas as pd
    from test_real_converters import make_isic_trap

    from segx_helpers.models.checkpoints import load_trained
    from segx_helpers.data.converters import convert_isic2018_trap

    make_isic_trap(tmp_path / "raw", "official", n=60, size=64)
    convert_isic2018_trap(tmp_path / "raw", tmp_path / "data" / "isic2018-trap", verbose=False)
    names = [name for name in NAMES if not name.startswith("06")]  # 06 brings its own folder
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
    classifier = load_trained(tmp_path / "artifacts" / "isic2018-trap" / "classifier.pt", "classifier").meta
    assert classifier["arch"] == "efficientnet_lite0" and classifier["init"] == "imagenet"  # the real-data recipe
    summary = json.loads((tmp_path / "outputs" / "summary.json").read_text())["isic2018-trap"]["classifier"]
    assert {"ruler", "lesion area"} <= set(summary["baseline_auroc"]) and "decides" in summary
    within = pd.DataFrame(json.loads((out / "segu" / "summary.json").read_text())["within"])
    assert set(within["view"]) == {"all", "predicted class", "lesion size"}
    assert {"last block", "block before"} == set(within["layer"])
    assert {"c_IoU / max", "lesion area", "predicted class"} <= set(within["certainty"])
    flags = pd.read_csv(out / "reveal_flags.csv")  # notebook 08 names its clusters with the image-level flags
    assert set(flags["artefact"]) == {"dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches"}
    assert {"predicted class AUROC", "beyond predicted class"} <= set(flags.columns)  # the prediction as a baseline
    assert {"fix", "reveal"} <= set(json.loads((tmp_path / "outputs" / "summary.json").read_text())["isic2018-trap"])
