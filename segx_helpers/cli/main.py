"""The ``segx`` command (also ``python -m segx_helpers``): ``segx audit`` and ``segx train``.

Both run in one process as they are, and on several under torchrun, e.g.
``torchrun --nproc_per_node 2 -m segx_helpers audit ...`` (see :mod:`segx_helpers.cli.audit` and
:mod:`segx_helpers.cli.distributed`). Refusals (a foreign output folder, results of other inputs, an
existing checkpoint, a bad value) print one line and exit with status 2; a file that cannot be read or
written (a full disk, a read-only folder) prints one line and exits with status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from segx_helpers.cli.audit import MAPS_DTYPES, AuditError, AuditOptions, format_summary, run_audit
from segx_helpers.cli.distributed import Processes, TrainSpec, train
import segx_helpers.explain.api  # noqa: F401 (importing it registers the built-in methods)
from segx_helpers.explain.registry import method_names


def _audit_parser(sub) -> None:
    p = sub.add_parser("audit", help="SegX and SegU over a whole archive: streamed, sharded, resumable",
                       description="Explain every prediction of a classifier over an archive, score it with SegU "
                                   "(c_IoU, c_AUITC, ...) and localisation, and write a Parquet table and the maps.",
                       epilog="The output folder, resuming, the refusals and torchrun: docs/audit.md.")
    p.add_argument("--data", required=True, help="a dataset folder (dataset.json) or a plain folder of images")
    p.add_argument("--classifier", required=True, help="classifier checkpoint (.pt) of segx_helpers")
    p.add_argument("--masks", required=True, help="segmenter checkpoint (.pt) or a folder of <id>.png masks")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier audit of the same inputs")
    p.add_argument("--method", dest="methods", action="append", choices=method_names(),
                   help="explanation method; repeat for several (default gradcam)")
    p.add_argument("--split", default="all", choices=("all", "train", "val", "test"), help="dataset split (default all)")
    p.add_argument("--nsamples", type=int, default=50, help="Gradient SHAP samples per image (default 50)")
    p.add_argument("--background", type=int, default=50, help="Gradient SHAP background images (default 50)")
    p.add_argument("--p", type=float, default=5.0, help="top-p %% saliency region (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maps", default="float32", choices=MAPS_DTYPES, help="store maps as (default float32), or none")
    p.add_argument("--no-localisation", dest="localisation", action="store_false",
                   help="skip localisation scores against ground-truth masks")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--max-shards", type=int, default=None,
                   help="process at most this many unfinished shards, then stop (resume by running again)")
    p.add_argument("--timeout-minutes", type=float, default=60.0,
                   help="torch.distributed timeout (longer than one shard takes)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a classifier or segmenter, on 1..N processes (torchrun: DDP)",
                       description="Train a classifier or segmenter on a dataset folder; under torchrun with "
                                   "DistributedDataParallel and a DistributedSampler, --batch-size being the global batch.")
    p.add_argument("kind", choices=("classifier", "segmenter"))
    p.add_argument("--data", required=True, help="dataset folder (dataset.json)")
    p.add_argument("--checkpoint", required=True, help="where to write the checkpoint (.pt)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (divided over the processes)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--arch", default="resnet18", help="classifier architecture")
    p.add_argument("--encoder", default="resnet18", help="segmenter encoder")
    p.add_argument("--max-batches-per-epoch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <checkpoint>.last.pt (the same arguments; a torchrun run "
                        "with torchrun and the same number of processes)")
    p.add_argument("--timeout-minutes", type=float, default=60.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _audit_parser(sub)
    _train_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "audit":
        values = {k: v for k, v in vars(args).items() if k != "command"}
        values["methods"] = tuple(values["methods"] or ("gradcam",))
        try:
            result = run_audit(AuditOptions(**values), arguments=values)
        except (AuditError, ValueError) as err:
            print(f"segx audit: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # a read-only or full disk: nothing half-written is trusted on the next run
            print(f"segx audit: cannot read or write a file: {err}. Finished shards are kept: run the same command "
                  "again once the problem is solved.", file=sys.stderr)
            return 1
        if result is not None:
            _print_main(f"{result.out}: {result.shards} shards, {result.done_before} done before, "
                        f"{len(result.done_now)} now")
            if result.summary is not None:
                _print_main(f"table: {result.table}\n{format_summary(result.summary)}")
            else:
                _print_main("unfinished shards remain: run the same command again to continue")
        return 0

    try:
        spec = TrainSpec(args.kind, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, arch=args.arch, encoder=args.encoder,
                         max_batches_per_epoch=args.max_batches_per_epoch, seed=args.seed)
        processes = Processes(device=args.device, num_workers=args.num_workers, sync_batchnorm=args.sync_bn,
                              timeout_minutes=args.timeout_minutes)
        result = train(args.data, args.checkpoint, spec, processes, overwrite=args.overwrite, resume=args.resume)
    except (FileExistsError, ValueError) as err:
        print(f"segx train: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"segx train: cannot read or write a file: {err}", file=sys.stderr)
        return 1
    if result is not None:
        print(f"wrote {result['checkpoint']} ({result['epochs']} epochs on {result['world_size']} process(es)): "
              f"{result['metrics']}")
    return 0


def _print_main(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(text)


if __name__ == "__main__":
    sys.exit(main())
