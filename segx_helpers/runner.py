"""Run the tutorial notebooks in order with papermill (the ``make tutorial`` command).

Executed copies go to ``<root>/outputs/notebooks/``, figures to ``<root>/outputs/<dataset>/figures/``
(written by the notebooks themselves), run times to ``<root>/outputs/timings.json``.

    python -m segx_helpers.runner            # quick mode, every notebook
    python -m segx_helpers.runner --full     # full mode
    python -m segx_helpers.runner --only 01_dataset_prep 02_train_segmenter
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .notebook import NOTEBOOKS
from .report import write_report

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def available_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[str]:
    """The tutorial notebooks present in ``notebook_dir``, in order."""
    return [name for name in NOTEBOOKS if (notebook_dir / f"{name}.ipynb").is_file()]


def run_notebooks(root: str | Path, quick: bool = True, only: list[str] | None = None,
                  notebook_dir: Path = NOTEBOOK_DIR, extra_parameters: dict | None = None) -> dict[str, float]:
    """Execute the notebooks in order with ``QUICK`` and ``ROOT`` injected; returns seconds per notebook.

    Stops at the first failing notebook (papermill raises, and the executed copy with the error is kept).
    """
    import papermill

    root = Path(root).resolve()
    out_dir = root / "outputs" / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = only or available_notebooks(notebook_dir)
    unknown = [n for n in names if not (notebook_dir / f"{n}.ipynb").is_file()]
    if unknown:
        raise FileNotFoundError(f"No such notebook(s) in {notebook_dir}: {unknown}")
    timings: dict[str, float] = {}
    for name in names:
        print(f"[segx-tutorial] running {name} ({'quick' if quick else 'full'} mode) ...", flush=True)
        started = time.perf_counter()
        papermill.execute_notebook(
            str(notebook_dir / f"{name}.ipynb"), str(out_dir / f"{name}.ipynb"),
            parameters={"QUICK": quick, "ROOT": str(root), **(extra_parameters or {})},
            cwd=str(notebook_dir), progress_bar=False, kernel_name="python3",
        )
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"[segx-tutorial] {name} done in {timings[name]:.0f} s", flush=True)
    (root / "outputs" / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the SegX tutorial notebooks in order.")
    parser.add_argument("--full", action="store_true", help="full mode (default: quick mode)")
    parser.add_argument("--root", default=str(NOTEBOOK_DIR.parent), help="folder for data/, artifacts/ and outputs/")
    parser.add_argument("--only", nargs="*", help="run only these notebooks (names without .ipynb)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    timings = run_notebooks(args.root, quick=not args.full, only=args.only)
    outputs = Path(args.root).resolve() / "outputs"
    write_report(args.root)
    print(f"\n[segx-tutorial] {len(timings)} notebooks in {time.perf_counter() - started:.0f} s")
    print(f"[segx-tutorial] executed notebooks: {outputs / 'notebooks'}")
    print(f"[segx-tutorial] figures and results: {outputs}/<dataset>/")
    print(f"[segx-tutorial] summary report:     {outputs / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
