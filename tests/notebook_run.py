"""One quick-mode run of the eight tutorial notebooks per pytest session, shared by every notebook assertion.

The ``tutorial_run`` fixture (tests/conftest.py) executes the notebooks once, as ``make tutorial`` does, into a
temporary root (in processes of their own, started with the session and running beside the other tests), and hands each test a :class:`TutorialRun` to read: ``summary()`` (``outputs/summary.json`` for
the dataset), ``segu_summary()`` (``outputs/<dataset>/segu/summary.json``), ``text(name)`` (what an executed
notebook printed) and paths under the run's root. Every test that takes ``tutorial_run`` is marked
``notebooks`` automatically (``pytest -m "not notebooks"`` skips them and the run). To check something new in
the tutorial, add one function::

    def test_something(tutorial_run):
        assert tutorial_run.summary()["segu"]["gradcam"]["c_iou"]["auroc_incorrect"] is not None

If the run itself fails (a notebook raises), every test using it fails with the runner's output, naming the cell.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pandas as pd


DATASET = "synthetic-derm"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TutorialRun:
    """The result of :class:`BackgroundTutorial`: ``root`` (with ``data/``, ``artifacts/``, ``outputs/``) and the
    seconds per notebook, in the order they ran."""

    root: Path
    timings: dict[str, float]
    dataset: str = DATASET

    @property
    def outputs(self) -> Path:
        """``<root>/outputs/<dataset>``: the dataset's figures, tables and SegU results."""
        return self.root / "outputs" / self.dataset

    def summary(self) -> dict:
        """The dataset's entry of ``outputs/summary.json`` (segmenter, classifier, segu, confidence, aurc,
        augrc, fix, ...: what each notebook measured)."""
        return json.loads((self.root / "outputs" / "summary.json").read_text())[self.dataset]

    def segu_summary(self) -> dict:
        """``outputs/<dataset>/segu/summary.json``, notebook 05's tables (separation, by error type, ablations)."""
        return json.loads((self.outputs / "segu" / "summary.json").read_text())

    def summary_rows(self, method: str) -> pd.DataFrame:
        """Notebook 05's per-prediction scores (``outputs/<dataset>/segu/scores.csv``) of one explanation method."""
        scores = pd.read_csv(self.outputs / "segu" / "scores.csv")
        return scores[scores["method"] == method]

    def executed(self, name: str) -> nbformat.NotebookNode:
        """The executed copy of notebook ``name`` (e.g. ``"05_segu_analysis"``), outputs included."""
        return nbformat.read(self.root / "outputs" / "notebooks" / f"{name}.ipynb", as_version=4)

    def text(self, name: str) -> str:
        """Everything notebook ``name`` printed or displayed as text, cell after cell."""
        return executed_text(self.executed(name))


def executed_text(notebook: nbformat.NotebookNode) -> str:
    """The streams and plain-text results of an executed notebook, joined by newlines."""
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


BESIDE = ("06_adapt_new_modality",)
"""Notebooks that read nothing the others write (notebook 06 makes its own dataset): the background run executes
them in a second runner process on the same root, beside the chain 01 -> 05, 07, 08. The summary and the run
records they share are updated under a lock (:func:`segx_helpers.data.io.locked`)."""


class BackgroundTutorial:
    """The quick-mode run of every notebook (``python -m segx_helpers.cli.runner --root <root>``, what ``make
    tutorial`` runs) in processes of their own, started when the test session starts, so the notebooks run while
    the other tests use the other core: ``make test`` on 2 cores takes the time of the longest of them instead of
    their sum. The notebooks in :data:`BESIDE` run in a second runner on the same root (one torch thread), the
    others in order in the first. ``result()`` waits for both; a failed run raises with the
    runner's last output (the executed notebook with papermill's error is under ``<root>/outputs/notebooks``)."""

    def __init__(self, root: Path, env: dict[str, str], beside_env: dict[str, str] | None = None) -> None:
        from segx_helpers.cli.runner import available_notebooks

        self.root = Path(root)
        names = available_notebooks()
        chain = [name for name in names if name not in BESIDE]
        beside = [name for name in names if name in BESIDE]
        self.runs = [self._start("runner.log", chain, env)]
        if beside:
            self.runs.append(self._start("runner_beside.log", beside, beside_env or env))

    def _start(self, log_name: str, names: list[str], env: dict[str, str]):
        log = self.root / log_name
        log_file = log.open("w")
        command = [sys.executable, "-m", "segx_helpers.cli.runner", "--root", str(self.root), "--only", *names]
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO), log, log_file

    def finished(self, name: str, timeout: float = 3600) -> Path:
        """Wait until the chain has finished notebook ``name`` (its record is in ``outputs/timings.json``), so a
        test can read what it wrote while the later notebooks still run; the run's root. Raises if the chain
        ended without it (with the runner's last output) or after ``timeout`` seconds."""
        timings = self.root / "outputs" / "timings.json"
        process, log, _ = self.runs[0]
        deadline = time.monotonic() + timeout
        while True:
            if timings.is_file() and name in json.loads(timings.read_text()):
                return self.root
            if process.poll() is not None:
                raise RuntimeError(f"the notebook chain ended (exit {process.returncode}) without {name}; "
                                   f"log {log}:\n{log.read_text()[-6000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not finish within {timeout:.0f} s; log {log}")
            time.sleep(2)

    def result(self) -> TutorialRun:
        failures = []
        for process, log, log_file in self.runs:
            code = process.wait()
            log_file.close()
            if code != 0:
                failures.append(f"runner exit {code}; log {log}:\n{log.read_text()[-6000:]}")
        if failures:
            raise RuntimeError("the tutorial notebooks failed (" + "\n".join(failures) + ")")
        records = json.loads((self.root / "outputs" / "timings.json").read_text())
        return TutorialRun(self.root, {name: records[name]["seconds"] for name in sorted(records)})

    def stop(self) -> None:
        """End the run if the session ends first (e.g. interrupted)."""
        for process, _, log_file in self.runs:
            if process.poll() is None:
                process.kill()
                process.wait()
            log_file.close()
