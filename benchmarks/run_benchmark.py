"""Explanation throughput and SegX/SegU overhead, side by side in one process.

    python benchmarks/run_benchmark.py [--image-size 224] [--images 32] [--shap-images 4] [--nsamples 50]

Compares, on embedded synthetic-cxr images with a multi-label ResNet-18 (random weights: speed
does not depend on them; 10 outputs by default, like ChestX-Det10) and two target classes per image:

1. Grad-CAM: a per-image, per-class loop that follows the reference code (one forward and one
   pytorch-grad-cam call per (image, class)), pytorch-grad-cam called per batch, and our fast
   engine. Same maps expected (max abs difference after normalisation).
2. Gradient SHAP: the reference usage (``shap.GradientExplainer(...).shap_values(image,
   nsamples)`` per image, every class, keeping the targets), our shap-per-class engine and our
   fast engine, at the same nsamples and background. Maps compared by Pearson correlation; the
   reference row's correlation is shap against shap with another seed (the sampling noise floor).
3. On the fast Grad-CAM maps, as a share of the time that explanation took (best of 3), through the one analysis
   path users run (``segx_helpers.scores.analysis``): SegX + saliency map + SegU (c_IoU, c_AUITC and our
   variants), and the full analysis (SegU plus IoU@5%, AUITC, relevance mass, relevance rank and
   pointing game of the original and both SegX orders against the ground truth), for the 64 maps
   explained and for the same maps tiled to 1,024 (explanation time scaled linearly from the measured
   one: batching must pay off). The numpy reference functions on the same maps give the speed-up.
4. The cost of c_AUITC against the number of thresholds: flat for the engine (one histogram per map),
   linear for the per-threshold reference.
5. With a CUDA device: the explanation and the analysis on the GPU, and the same shares.

Prints a table and writes it to ``benchmarks/results/benchmark.{csv,json}``.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from segx_helpers.data import SyntheticConfig, generate_synthetic_cxr, load_dataset
from segx_helpers.data.torch_dataset import SegXDataset
from segx_helpers.explain.api import RunOptions, explain
from segx_helpers.explain.gradient_shap import GradientShapOptions
from segx_helpers.models.networks import build_classifier, find_target_layer
from segx_helpers.scores.analysis import AnalysisOptions, analyse, segx_saliency
from segx_helpers.scores.metrics import auitc, localisation_scores
from segx_helpers.scores.segu import segu_scores
from segx_helpers.scores.segx import segx, top_percent

ROOT = Path(__file__).resolve().parent.parent


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def reference_gradcam(model, images, targets):
    """The reference code's loop: per image a forward pass, per predicted class one CAM call."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    maps = []
    with GradCAM(model=model, target_layers=[find_target_layer(model)]) as cam:
        for i in range(len(images)):
            image = images[i:i + 1]
            with torch.no_grad():
                model(image)
            for c in targets[i]:
                maps.append(cam(input_tensor=image, targets=[ClassifierOutputTarget(c)])[0])
    return np.stack(maps)


def reference_shap(model, images, targets, background, nsamples, seed):
    """The reference usage: every class of every image, then keep the targets; mean |SHAP| over channels."""
    import shap

    explainer = shap.GradientExplainer(model, background)
    maps = []
    for i in range(len(images)):
        values = np.asarray(explainer.shap_values(images[i:i + 1], nsamples=nsamples, rseed=seed + i))
        per_class = np.abs(values[0]).mean(axis=0)  # (H, W, classes)
        maps += [per_class[..., c] for c in targets[i]]
    model.eval()
    return np.stack(maps)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]))


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up (the analysis is short: noise dominates)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def analysis_rows(maps: np.ndarray, masks: np.ndarray, explain_seconds: float, device: str,
                  tiled: int = 1024) -> list[dict]:
    """The analysis path's cost as a share of the explanation, at the explained batch and tiled to ``tiled`` maps."""
    rows = []
    for count in (len(maps), tiled):
        reps = -(-count // len(maps))
        m = np.concatenate([maps] * reps)[:count]
        k = np.concatenate([masks] * reps)[:count]
        m_dev, k_dev = torch.as_tensor(m, device=device), torch.as_tensor(k, device=device)
        budget = explain_seconds * count / len(maps)
        work = {
            "SegX + saliency map + SegU (c_IoU, c_AUITC, variants)":
                lambda: (segx_saliency(m_dev, k_dev), analyse(m_dev, k_dev,
                                                              options=AnalysisOptions(localisation=False))),
            "full analysis: SegU + 5 localisation metrics, original and both SegX orders":
                lambda: analyse(m_dev, k_dev, k_dev),
        }
        if device == "cpu" and count == len(maps):
            work["numpy reference: SegX + saliency + SegU (c_IoU, c_AUITC, variants)"] = \
                lambda: (top_percent(segx(m, k)), segu_scores(m, k).drop(columns="SegU distance"))
            work["numpy reference: full analysis"] = \
                lambda: (segu_scores(m, k).drop(columns="SegU distance"),
                         [(localisation_scores(x, k), auitc(x, k)) for x in
                          (m, segx(m, k), segx(m, k, order="top-then-mask"))])
        for name, fn in work.items():
            seconds = best_of(fn, 1 if name.startswith("numpy") else 3)
            rows.append({"method": f"{name} [{device}, {count} maps]", "maps": count, "seconds": seconds,
                         "maps_per_s": count / seconds, "share_of_explanation": seconds / budget,
                         "peak_memory_mb": peak_memory_mb()})
    m_dev, k_dev = torch.as_tensor(maps, device=device), torch.as_tensor(masks, device=device)
    for n in (11, 101, 1001, 10001):
        seconds = best_of(lambda: analyse(m_dev, k_dev, options=AnalysisOptions(localisation=False, n_thresholds=n)))
        rows.append({"method": f"SegU with c_AUITC on {n} thresholds [{device}, {len(maps)} maps]", "maps": len(maps),
                     "seconds": seconds, "maps_per_s": len(maps) / seconds,
                     "share_of_explanation": seconds / explain_seconds})
    if device == "cpu":
        for n in (11, 101):
            seconds = best_of(lambda: auitc(maps, masks, n), 1)
            rows.append({"method": f"numpy reference c_AUITC on {n} thresholds [cpu, {len(maps)} maps]",
                         "maps": len(maps), "seconds": seconds, "maps_per_s": len(maps) / seconds,
                         "share_of_explanation": seconds / explain_seconds})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32, help="images for the Grad-CAM comparison")
    parser.add_argument("--shap-images", type=int, default=2, help="images for the Gradient SHAP comparison")
    parser.add_argument("--classes", type=int, default=10, help="model outputs (ChestX-Det10 has 10 findings)")
    parser.add_argument("--nsamples", type=int, default=50)
    parser.add_argument("--background", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiled-maps", type=int, default=1024,
                        help="the explained maps tiled to this many for the analysis rows at scale")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    warnings.simplefilter("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        n = max(args.images, args.shap_images) + args.background
        root = generate_synthetic_cxr(Path(tmp) / "cxr", SyntheticConfig(n_images=max(n * 2, 40),
                                      image_size=args.image_size, seed=args.seed), progress=False)
        data = load_dataset(root, check_files=False)
        batch = SegXDataset(data, None, args.image_size).tensors()
    images = batch["image"][: args.images]
    masks = batch["mask"][: args.images, 0].numpy() > 0.5
    background = batch["image"][-args.background:]
    model = build_classifier("resnet18", num_classes=args.classes, in_channels=1).eval()
    targets = [[i % args.classes, (i + 3) % args.classes] for i in range(len(images))]
    pairs = sum(len(t) for t in targets)
    rows = []

    ref, t_ref = timed(lambda: reference_gradcam(model, images, targets))
    lib, t_lib = timed(lambda: explain(model, images, targets, "gradcam",
                                       run=RunOptions(engine="library", progress=False)).maps)
    fast_result, t_fast = timed(lambda: explain(model, images, targets, "gradcam",
                                                run=RunOptions(engine="fast", progress=False)))
    # the denominator of the analysis shares: best of 3 like the analysis rows (the smaller, the stricter)
    t_fast = min(t_fast, best_of(lambda: explain(model, images, targets, "gradcam",
                                                 run=RunOptions(engine="fast", progress=False)), 2))
    for name, maps, seconds in (("Grad-CAM: reference loop (per image, per class)", ref, t_ref),
                                ("Grad-CAM: pytorch-grad-cam per batch", lib, t_lib),
                                ("Grad-CAM: fast engine (one backward per round)", fast_result.maps, t_fast)):
        rows.append({"method": name, "maps": pairs, "seconds": seconds, "maps_per_s": pairs / seconds,
                     "ratio_vs_reference": t_ref / seconds, "max_abs_diff": float(np.abs(maps - ref).max()),
                     "correlation": np.nan, "peak_memory_mb": peak_memory_mb()})

    shap_images = images[: args.shap_images]
    shap_targets = targets[: args.shap_images]
    ref_shap, t_ref_shap = timed(lambda: reference_shap(model, shap_images, shap_targets, background, args.nsamples,
                                                        args.seed))
    shap_rows = []
    options = GradientShapOptions(background, nsamples=args.nsamples, seed=args.seed)
    for engine in ("library", "fast"):
        result, seconds = timed(lambda: explain(model, shap_images, shap_targets, "gradient_shap", options=options,
                                                run=RunOptions(engine=engine, progress=False)).maps)
        label = "shap per target class" if engine == "library" else "fast engine (targets only, shared forward)"
        shap_rows.append((f"Gradient SHAP: {label}", result, seconds, correlation(result, ref_shap)))
    noise = explain(model, shap_images, shap_targets, "gradient_shap",
                    options=GradientShapOptions(background, nsamples=args.nsamples, seed=args.seed + 1000),
                    run=RunOptions(engine="library", progress=False)).maps
    shap_rows.insert(0, ("Gradient SHAP: reference usage (all classes, per image)", ref_shap, t_ref_shap,
                         correlation(noise, ref_shap)))
    for name, maps, seconds, corr in shap_rows:
        rows.append({"method": name, "maps": len(maps), "seconds": seconds, "maps_per_s": len(maps) / seconds,
                     "images_per_s": len(shap_images) / seconds, "ratio_vs_reference": t_ref_shap / seconds,
                     "max_abs_diff": np.nan, "correlation": corr, "peak_memory_mb": peak_memory_mb()})

    rows += analysis_rows(fast_result.maps, masks[fast_result.image_index], t_fast, "cpu", args.tiled_maps)
    if torch.cuda.is_available():
        gpu_model = model.to("cuda")
        explain(gpu_model, images, targets, "gradcam", run=RunOptions(progress=False, device="cuda"))  # warm-up
        torch.cuda.synchronize()
        gpu_result, t_gpu = timed(lambda: explain(gpu_model, images, targets, "gradcam",
                                                  run=RunOptions(progress=False, device="cuda")))
        t_gpu = min(t_gpu, best_of(lambda: explain(gpu_model, images, targets, "gradcam",
                                                   run=RunOptions(progress=False, device="cuda")), 2))
        rows.append({"method": "Grad-CAM: fast engine on CUDA", "maps": pairs, "seconds": t_gpu,
                     "maps_per_s": pairs / t_gpu, "ratio_vs_reference": t_ref / t_gpu,
                     "max_abs_diff": float(np.abs(gpu_result.maps - fast_result.maps).max())})
        rows += analysis_rows(gpu_result.maps, masks[gpu_result.image_index], t_gpu, "cuda", args.tiled_maps)
        model.to("cpu")

    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "benchmark.csv", index=False)
    (out / "benchmark.json").write_text(json.dumps({"settings": vars(args), "torch_threads": torch.get_num_threads(),
                                                    "rows": table.to_dict(orient="records")}, indent=2, default=float))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(f"image size {args.image_size} px, ResNet-18 ({args.classes} classes), {len(images)} images x 2 classes for Grad-CAM, "
              f"{len(shap_images)} images for SHAP (nsamples {args.nsamples}, background {args.background}), "
              f"{torch.get_num_threads()} torch threads\n")
        print(table.drop(columns=[c for c in ("maps",) if c in table]).to_string(index=False))
    print(f"\nwritten to {out}/benchmark.csv and benchmark.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
