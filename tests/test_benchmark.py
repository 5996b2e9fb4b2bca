"""The benchmark script runs end to end (tiny settings) and its fast paths reproduce the reference maps."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd

from segx_helpers.scores import analysis


def test_benchmark_runs_and_fast_paths_match(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "run_benchmark.py"
    spec = importlib.util.spec_from_file_location("run_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the analysis rows time the one analysis path users run, with the options each row names
    assert module.analyse is analysis.analyse and module.segx_saliency is analysis.segx_saliency
    calls = set()

    def recorded(maps, predicted_masks, true_masks=None, *, options=None):
        calls.add((len(maps), true_masks is not None, (options or analysis.AnalysisOptions()).n_thresholds))
        return analysis.analyse(maps, predicted_masks, true_masks, options=options)

    monkeypatch.setattr(module, "analyse", recorded)
    assert module.main(["--image-size", "64", "--images", "3", "--shap-images", "1", "--nsamples", "4",
                        "--background", "3", "--classes", "4", "--tiled-maps", "64", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "benchmark.csv").set_index("method")
    gradcam = table[table.index.str.startswith("Grad-CAM")]
    assert len(gradcam) == 3 and (gradcam["max_abs_diff"] <= 1e-5).all()
    shap = table[table.index.str.startswith("Gradient SHAP")]
    assert shap.loc["Gradient SHAP: shap per target class", "correlation"] > 0.999
    assert calls == {(6, False, 101), (6, True, 101), (64, False, 101), (64, True, 101),
                     (6, False, 11), (6, False, 1001), (6, False, 10001)}
    cpu = table[~table.index.str.contains("cuda|CUDA")]
    assert list(cpu["maps"]) == [6] * 3 + [2, 2, 2] + [6] * 4 + [64] * 2 + [6] * 6  # 3 images x 2 classes
    assert cpu.index[6:].str.endswith(("[cpu, 6 maps]", "[cpu, 64 maps]")).all()
    assert (np.isfinite(cpu["seconds"]) & (cpu["seconds"] > 0)).all()
    assert np.allclose(cpu["maps_per_s"], cpu["maps"] / cpu["seconds"])
    assert (table.loc[["Grad-CAM: reference loop (per image, per class)",
                       "Gradient SHAP: reference usage (all classes, per image)"], "ratio_vs_reference"] == 1).all()
    # shares of the explanation: against the fast Grad-CAM time, scaled to the rows' number of maps
    fast = table.loc["Grad-CAM: fast engine (one backward per round)", "seconds"]
    shares = cpu.iloc[6:]
    assert np.allclose(shares["share_of_explanation"], shares["seconds"] / (fast * shares["maps"] / 6))
    assert json.loads((tmp_path / "benchmark.json").read_text())["settings"]["image_size"] == 64


def test_training_benchmark_runs_and_lists_every_setting(tmp_path):
    from segx_helpers.models.networks import cpu_supports_bf16

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "run_training_benchmark.py"
    spec = importlib.util.spec_from_file_location("run_training_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--sizes", "32", "--steps", "1", "--repeats", "1", "--batch-size", "2", "--threads", "1",
                        "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "training_benchmark.csv")
    settings = 4 if cpu_supports_bf16() else 3  # float32, channels_last, (+ bf16 autocast), + fast kernels
    assert len(table[table["model"] == "segmenter"]) == 2 * settings  # the paper-size and the CPU decoder
    assert len(table[table["model"] == "classifier"]) == settings
    assert (table["images_per_s"] > 0).all() and set(table["image_size"]) == {32}
    assert table["setting"].str.endswith("fast kernels").sum() == 3
