"""``python -m segx_helpers.cli.convert``: convert a downloaded raw dataset to the package's dataset format
(the last step of ``data_download.sh``; the converters live in :mod:`segx_helpers.data.converters`)."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd

from segx_helpers.data.converters import (CONVERTERS, ISIC_SPLITS, ISIC_TRAP_SETS, KAGGLE_LAYOUTS, convert_segx_kaggle,
                                          find_layout)
from segx_helpers.data.format import DatasetFormatError


def main(argv: Sequence[str] | None = None) -> int:
    """Command line used by data_download.sh; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m segx_helpers.cli.convert",
        description="Convert a downloaded raw dataset to the segx_helpers dataset format.",
    )
    parser.add_argument("dataset", choices=[*CONVERTERS, "segx-kaggle"])
    parser.add_argument("raw_dir", type=Path, help="the unpacked download (the layout may sit up to two levels down)")
    parser.add_argument("out_dir", type=Path, help="the dataset folder to create; an existing one is never replaced")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split (default 0)")
    parser.add_argument("--image-size", type=int, default=None, help="resize to a square of N pixels (default: keep)")
    parser.add_argument("--which", choices=sorted(KAGGLE_LAYOUTS), default="ham",
                        help="segx-kaggle only: the dermoscopy (ham) or chest X-ray (chestx) part (default ham)")
    parser.add_argument("--trap-set", type=int, choices=ISIC_TRAP_SETS, default=1,
                        help="isic2018-trap only: which trap set of Bissoto et al. gives the split (default 1)")
    parser.add_argument("--split", choices=ISIC_SPLITS, default="trap",
                        help="isic2018-trap only: the trap set's split (default) or a stratified random 7:1:2 split "
                             "of all annotated images (seed --seed), named isic2018-random")
    args = parser.parse_args(argv)
    options = {"seed": args.seed, "image_size": args.image_size}
    if args.dataset == "isic2018-trap":
        options.update(trap_set=args.trap_set, split=args.split)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            if args.dataset == "segx-kaggle":
                out = convert_segx_kaggle(args.raw_dir, args.out_dir, which=args.which, **options)
            else:
                _, root = find_layout(args.raw_dir, (args.dataset,))
                out = CONVERTERS[args.dataset](root, args.out_dir, **options)
        except (DatasetFormatError, FileExistsError) as err:
            error = err
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"converted {len(pd.read_csv(out / 'labels.csv'))} images into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
