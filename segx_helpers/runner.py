"""Run the tutorial notebooks in order with papermill (the ``make tutorial`` command).

Executed copies go to ``<root>/outputs/notebooks/``, figures to ``<root>/outputs/<dataset>/figures/``
(written by the notebooks themselves), how each notebook ran to ``<root>/outputs/timings.json`` (see
:func:`run_record`; ``make book`` prints it at the top of each page).

    python -m segx_helpers.runner            # quick mode, every notebook
    python -m segx_helpers.runner --full     # full mode
    python -m segx_helpers.runner --only 01_dataset_prep 02_train_segmenter
    python -m segx_helpers.runner --dataset my-xrays -p REAL_DATA=True -p ARCH=densenet121

``--dataset NAME`` sets ``DATASET`` (a folder ``data/NAME`` in the format, e.g. made by ``import_folder``)
and ``-p KEY=VALUE`` any other parameter, papermill style: the value is read as a Python/JSON literal
when it is one (``True``, ``3``, ``0.5``, ``None``, ``[1, 2]``), else as a string. Each notebook gets the
parameters its parameters cell declares; a key no selected notebook declares is an error.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from .notebook import NOTEBOOKS
from .report import write_report

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def available_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[str]:
    """The tutorial notebooks present in ``notebook_dir``, in order."""
    return [name for name in NOTEBOOKS if (notebook_dir / f"{name}.ipynb").is_file()]


def parse_value(text: str):
    """A ``-p`` value: a Python or JSON literal when it parses as one, else the text itself."""
    for parse in (ast.literal_eval, json.loads):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return text


def parse_parameter(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(KEY, value)`` (see :func:`parse_value`); raises ``ValueError`` naming the problem."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"-p expects KEY=VALUE with KEY a parameter name, got {item!r}")
    return key, parse_value(value)


def notebook_parameters(name: str, notebook_dir: Path = NOTEBOOK_DIR) -> list[str]:
    """The names a notebook's parameters cell (the code cell tagged ``parameters``) assigns, in order."""
    import nbformat

    nb = nbformat.read(notebook_dir / f"{name}.ipynb", as_version=4)
    names: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def parameters_per_notebook(names: list[str], parameters: dict, notebook_dir: Path = NOTEBOOK_DIR) -> dict[str, dict]:
    """For each notebook, the subset of ``parameters`` its parameters cell declares.

    Raises ``ValueError`` for a key that none of ``names`` declares (a typo would otherwise be ignored).
    """
    declared = {name: notebook_parameters(name, notebook_dir) for name in names}
    unknown = sorted(set(parameters) - {key for keys in declared.values() for key in keys})
    if unknown:
        known = sorted({key for keys in declared.values() for key in keys})
        raise ValueError(f"no selected notebook has the parameter(s) {unknown}; they have {known}")
    return {name: {k: v for k, v in parameters.items() if k in declared[name]} for name in names}


def git_commit(folder: Path = NOTEBOOK_DIR) -> str | None:
    """``git describe --always --dirty`` of the repository holding ``folder`` (e.g. ``5956656a1b-dirty``), or None
    outside a git checkout or without git."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=folder,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def run_record(seconds: float, quick: bool, device: str, started: datetime.datetime, commit: str | None,
               parameters: dict) -> dict:
    """What ``timings.json`` keeps per notebook: ``seconds``, ``mode`` (``"quick"``/``"full"``), ``device``
    (e.g. ``"cpu"``, ``"cuda"``), ``started`` (UTC, ISO 8601), ``commit`` (None outside git) and the
    ``parameters`` given besides QUICK and ROOT."""
    return {"seconds": round(seconds, 1), "mode": "quick" if quick else "full", "device": device,
            "started": started.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "parameters": parameters}


def record_run(root: Path, name: str, record: dict) -> Path:
    """Store ``record`` under ``name`` in ``<root>/outputs/timings.json``, keeping the other notebooks' records
    (a run with ``--only`` replaces only what it ran)."""
    path = root / "outputs" / "timings.json"
    records = json.loads(path.read_text()) if path.is_file() else {}
    records[name] = record
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def run_notebooks(root: str | Path, quick: bool = True, only: list[str] | None = None,
                  notebook_dir: Path = NOTEBOOK_DIR, extra_parameters: dict | None = None) -> dict[str, float]:
    """Execute the notebooks in order with ``QUICK`` and ``ROOT`` injected; returns seconds per notebook.

    ``extra_parameters`` go to the notebooks whose parameters cell declares them (see
    :func:`parameters_per_notebook`). Stops at the first failing notebook (papermill raises, and the
    executed copy with the error is kept). Each finished notebook's :func:`run_record` goes to
    ``<root>/outputs/timings.json``.
    """
    import papermill

    from .models import pick_device

    root = Path(root).resolve()
    out_dir = root / "outputs" / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = only or available_notebooks(notebook_dir)
    unknown = [n for n in names if not (notebook_dir / f"{n}.ipynb").is_file()]
    if unknown:
        raise FileNotFoundError(f"No such notebook(s) in {notebook_dir}: {unknown}")
    per_notebook = parameters_per_notebook(names, extra_parameters or {}, notebook_dir)
    timings: dict[str, float] = {}
    device, commit = pick_device().type, git_commit(notebook_dir)
    for name in names:
        extra = "".join(f", {k}={v!r}" for k, v in per_notebook[name].items())
        print(f"[segx-tutorial] running {name} ({'quick' if quick else 'full'} mode{extra}) ...", flush=True)
        started, clock = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
        papermill.execute_notebook(
            str(notebook_dir / f"{name}.ipynb"), str(out_dir / f"{name}.ipynb"),
            parameters={"QUICK": quick, "ROOT": str(root), **per_notebook[name]},
            cwd=str(notebook_dir), progress_bar=False, kernel_name="python3",
        )
        timings[name] = round(time.perf_counter() - clock, 1)
        record_run(root, name, run_record(timings[name], quick, device, started, commit, per_notebook[name]))
        print(f"[segx-tutorial] {name} done in {timings[name]:.0f} s", flush=True)
    return timings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m segx_helpers.runner",
                                     description="Run the SegX tutorial notebooks in order.")
    parser.add_argument("--full", action="store_true", help="full mode (default: quick mode)")
    parser.add_argument("--root", default=str(NOTEBOOK_DIR.parent), help="folder for data/, artifacts/ and outputs/")
    parser.add_argument("--only", nargs="*", help="run only these notebooks (names without .ipynb)")
    parser.add_argument("--dataset", help="set DATASET in every notebook that has it: data/<NAME> under --root")
    parser.add_argument("-p", "--parameter", dest="parameters", action="append", default=[], metavar="KEY=VALUE",
                        help="set a notebook parameter (repeatable); VALUE is read as a Python/JSON literal "
                             "when it is one, else as a string")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The command line and the notebook parameters it sets (``--dataset`` and every ``-p``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parameters: dict = {}
    for item in args.parameters:
        try:
            key, value = parse_parameter(item)
        except ValueError as err:
            parser.error(str(err))
        if key in ("QUICK", "ROOT"):
            parser.error(f"set {key} with {'--full' if key == 'QUICK' else '--root'}, not -p")
        parameters[key] = value
    if args.dataset is not None:
        if parameters.get("DATASET", args.dataset) != args.dataset:
            parser.error("--dataset and -p DATASET=... disagree")
        parameters["DATASET"] = args.dataset
    return args, parameters


def main(argv: list[str] | None = None) -> int:
    args, parameters = parse_args(argv)
    try:  # a typo in a parameter name fails here, before anything runs
        parameters_per_notebook(args.only or available_notebooks(), parameters)
    except (ValueError, FileNotFoundError) as err:
        build_parser().error(str(err))
    started = time.perf_counter()
    timings = run_notebooks(args.root, quick=not args.full, only=args.only, extra_parameters=parameters)
    outputs = Path(args.root).resolve() / "outputs"
    write_report(args.root, parameters.get("DATASET", "synthetic-derm"))
    print(f"\n[segx-tutorial] {len(timings)} notebooks in {time.perf_counter() - started:.0f} s")
    print(f"[segx-tutorial] executed notebooks: {outputs / 'notebooks'}")
    print(f"[segx-tutorial] figures and results: {outputs}/<dataset>/")
    print(f"[segx-tutorial] summary report:     {outputs / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
