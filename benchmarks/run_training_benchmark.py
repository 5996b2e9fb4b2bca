"""Training throughput on the CPU: images/s of one optimiser step (forward + backward + AdamW) of the
tutorial's segmenter and classifier, at real image sizes, for each CPU setting.

    python benchmarks/run_training_benchmark.py [--sizes 128 256] [--threads 2] [--batch-size 32] [--steps 4]

Models as the tutorial builds them (random weights: speed does not depend on them): the U-Net with a
ResNet-18 encoder and ``decoder_channels`` of :data:`segx_helpers.models.networks.CPU_DECODER_CHANNELS` and of the
paper-size decoder, and the ResNet-18 classifier. Each row is one :class:`segx_helpers.models.networks.CpuTraining`
setting (float32 / channels_last / bfloat16 autocast / bfloat16 autocast with the fast kernels, the opt-in
``TrainConfig.cpu_fast_kernels``); bfloat16 rows appear only when this CPU runs bfloat16 matrix products natively
(:func:`segx_helpers.models.networks.cpu_supports_bf16`). Settings are run interleaved (A, B, A, B, ...) and the best of ``--repeats`` rounds is kept, so background load hurts all alike. The
machine's load average is recorded with each row.

With ``--dice``, also trains the tutorial's segmenter on synthetic-derm as quick mode's notebook 02 does
(``segmenter_config(QUICK_MODE)``, 1,000 images, ``--dice-size`` px) with ``TrainConfig(amp=False)`` (float32), with
``cpu_bf16=True`` (channels_last + bfloat16 autocast, what the notebooks use) and with ``cpu_bf16=True,
cpu_fast_kernels=True``, interleaved, and reports the test Dice and training seconds of each: the speed-up must
not cost accuracy.

Prints a table and writes ``benchmarks/results/training_benchmark.{csv,json}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from segx_helpers.models.networks import (CPU_DECODER_CHANNELS, PAPER_DECODER_CHANNELS, CpuTraining, build_classifier,
                                          build_segmenter, contiguous_narrow_norms, cpu_supports_bf16,
                                          prepare_for_cpu_training)
from segx_helpers.data import SyntheticConfig, generate_synthetic_derm, load_dataset
from segx_helpers.workflows.settings import QUICK_MODE
from segx_helpers.models.training import DiceBCELoss, make_optimizer
from segx_helpers.workflows.training_recipes import SegmenterSpec, evaluate_segmenter, segmenter_config, train_segmenter

ROOT = Path(__file__).resolve().parent.parent


def _model(kind: str, decoder_channels: tuple[int, ...]):
    if kind == "segmenter":
        return build_segmenter("resnet18", decoder_channels=decoder_channels), DiceBCELoss()
    return build_classifier("resnet18", num_classes=3), torch.nn.CrossEntropyLoss()


def images_per_second(kind: str, size: int, batch_size: int, steps: int, setting: CpuTraining,
                      decoder_channels: tuple[int, ...] = CPU_DECODER_CHANNELS) -> float:
    """Images/s over ``steps`` training steps after one warm-up step, random inputs ``(batch, 3, size, size)``,
    the model and optimiser prepared as :func:`segx_helpers.models.training.fit` prepares them."""
    torch.manual_seed(0)
    model, loss_fn = _model(kind, decoder_channels)
    model = prepare_for_cpu_training(model, setting)
    if setting.fast_kernels:
        contiguous_narrow_norms(model)
    model.train()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=1e-4, cpu=setting)
    images = torch.randn(batch_size, 3, size, size)
    target = ((torch.rand(batch_size, 1, size, size) > 0.5).float() if kind == "segmenter"
              else torch.randint(0, 3, (batch_size,)))
    started = 0.0
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with setting.autocast():
            loss = loss_fn(model(images), target)
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - started)


DICE_SETTINGS = {  # name -> TrainConfig fields; the first is the float32 reference
    "amp=False (float32)": {"amp": False, "cpu_bf16": False},
    "cpu_bf16=True (the notebooks' setting)": {"cpu_bf16": True},
    "cpu_bf16=True, cpu_fast_kernels=True": {"cpu_bf16": True, "cpu_fast_kernels": True},
}


def dice_rows(image_size: int, repeats: int, seed: int = 0) -> list[dict]:
    """Quick mode's segmenter trained on synthetic-derm with each of :data:`DICE_SETTINGS` (interleaved, ``repeats``
    rounds): one row per setting with the test Dice (at 128 px, as notebook 02 reports it) and the best training
    seconds. bfloat16 applies only where :func:`cpu_supports_bf16`."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic_derm(Path(tmp) / "derm", SyntheticConfig(n_images=QUICK_MODE.n_images, image_size=QUICK_MODE.image_size,
                                                                     seed=seed), progress=False)
        data = load_dataset(Path(tmp) / "derm")
        config = segmenter_config(QUICK_MODE, seed)
        found: dict[str, dict] = {}
        for round_ in range(repeats):
            for index, (name, fields) in enumerate(DICE_SETTINGS.items()):
                started = time.perf_counter()
                trained = train_segmenter(
                    data,
                    Path(tmp) / f"seg_{index}_{round_}.pt",
                    SegmenterSpec(image_size=image_size),
                    config=dataclasses.replace(config, **fields),
                )
                seconds = time.perf_counter() - started
                dice = float(evaluate_segmenter(trained, data, "test", image_size=QUICK_MODE.image_size)["dice"].mean())
                best = found.setdefault(name, {"seconds": seconds, "dice": dice})
                best["seconds"] = min(best["seconds"], seconds)
    return [{"model": "segmenter, quick notebook 02 on synthetic-derm", "image_size": image_size, "setting": name,
             "train_seconds": round(v["seconds"], 1), "test_dice": round(v["dice"], 4),
             "load_average_1min": round(os.getloadavg()[0], 2)} for name, v in found.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="the tutorial trains with 32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept")
    parser.add_argument("--kinds", nargs="+", default=["segmenter", "classifier"])
    parser.add_argument("--dice", action="store_true", help="also train quick mode's segmenter with each of DICE_SETTINGS")
    parser.add_argument("--dice-size", type=int, default=QUICK_MODE.seg_image_size)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [CpuTraining(channels_last=False, bf16=False), CpuTraining(channels_last=True, bf16=False)]
    if cpu_supports_bf16():
        settings.append(CpuTraining(channels_last=True, bf16=True))
    settings.append(CpuTraining(channels_last=True, bf16=cpu_supports_bf16(), fast_kernels=True))
    cases = [(kind, size, decoder) for kind in args.kinds for size in args.sizes
             for decoder in ((PAPER_DECODER_CHANNELS, CPU_DECODER_CHANNELS) if kind == "segmenter" else (None,))]
    best: dict = {}
    for _ in range(args.repeats):
        for kind, size, decoder in cases:
            for setting in settings:
                speed = images_per_second(kind, size, args.batch_size, args.steps, setting, decoder)
                key = (kind, size, decoder, setting)
                best[key] = max(best.get(key, 0.0), speed)
    rows = []
    for (kind, size, decoder, setting), speed in best.items():
        rows.append({"model": kind, "image_size": size,
                     "decoder_channels": "" if decoder is None else "-".join(map(str, decoder)),
                     "setting": setting.name, "images_per_s": round(speed, 2), "threads": args.threads,
                     "load_average_1min": round(os.getloadavg()[0], 2)})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    dice = dice_rows(args.dice_size, args.repeats) if args.dice else []
    if dice:
        print(pd.DataFrame(dice).to_string(index=False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "training_benchmark.csv", index=False)
    (out / "training_benchmark.json").write_text(json.dumps(
        {"settings": vars(args), "bf16_native": cpu_supports_bf16(), "torch": torch.__version__,
         "rows": rows, "dice": dice}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
