"""The benchmark script runs end to end (tiny settings) and its fast paths reproduce the reference maps."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd


def test_benchmark_runs_and_fast_paths_match(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "run_benchmark.py"
    spec = importlib.util.spec_from_file_location("run_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--image-size", "64", "--images", "3", "--shap-images", "1", "--nsamples", "4",
                        "--background", "3", "--classes", "4", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "benchmark.csv").set_index("method")
    gradcam = table[table.index.str.startswith("Grad-CAM")]
    assert len(gradcam) == 3 and (gradcam["max_abs_diff"] <= 1e-5).all()
    shap = table[table.index.str.startswith("Gradient SHAP")]
    assert shap.loc["Gradient SHAP: shap per target class", "correlation"] > 0.999
    assert (table["seconds"] > 0).all()
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
    settings = 3 if cpu_supports_bf16() else 2
    assert len(table[table["model"] == "segmenter"]) == 2 * settings  # the paper-size and the CPU decoder
    assert len(table[table["model"] == "classifier"]) == settings
    assert (table["images_per_s"] > 0).all() and set(table["image_size"]) == {32}
