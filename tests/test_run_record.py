"""What the runner records per notebook in outputs/timings.json (mode, device, date, commit), read by the
report and the book. papermill is replaced by a stub that writes the executed copy, so no kernel starts."""
from __future__ import annotations

import datetime
import json
import subprocess

import nbformat
import pytest

from segx_helpers.cli import runner
from segx_helpers.workflows.report import read_run_records, run_line


def _notebooks(folder, names):
    folder.mkdir()
    for name in names:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("QUICK = True\nDATASET = 'synthetic-derm'", metadata={"tags": ["parameters"]})]
        nbformat.write(nb, folder / f"{name}.ipynb")


def test_run_notebooks_records_how_each_notebook_ran_and_keeps_the_others(tmp_path, monkeypatch):
    import papermill

    names = ["01_dataset_prep", "02_train_segmenter"]
    _notebooks(tmp_path / "notebooks", names)
    calls = []
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda source, target, parameters, **kw: calls.append(parameters) or
                        (tmp_path / "outputs" / "notebooks" / target.rsplit("/", 1)[-1]).write_text("{}"))
    monkeypatch.setattr(runner, "git_commit", lambda folder: "abc123-dirty")
    (tmp_path / "data" / "my-xrays").mkdir(parents=True)  # the runner refuses a dataset it cannot find
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    timings = runner.run_notebooks(tmp_path, quick=False, notebook_dir=tmp_path / "notebooks",
                                   extra_parameters={"DATASET": "my-xrays"})
    assert list(timings) == names and calls[0]["QUICK"] is False
    records = read_run_records(tmp_path)
    assert list(records) == names
    for name in names:
        record = records[name]
        assert record["seconds"] == timings[name] and record["mode"] == "full" and record["commit"] == "abc123-dirty"
        assert record["device"] in ("cpu", "cuda", "mps") and record["parameters"] == {"DATASET": "my-xrays"}
        assert datetime.datetime.fromisoformat(record["started"]) >= before
    # a second run of one notebook replaces its record only
    runner.run_notebooks(tmp_path, quick=True, only=["02_train_segmenter"], notebook_dir=tmp_path / "notebooks")
    records = read_run_records(tmp_path)
    assert records["01_dataset_prep"]["mode"] == "full" and records["02_train_segmenter"]["mode"] == "quick"
    assert "full and quick mode on" in run_line(records)


def test_run_record_is_utc_and_rounded():
    started = datetime.datetime(2026, 12, 4, 12, 30, 5, 123, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    record = runner.run_record(12.3456, True, "cpu", started, None, {"SEED": 1})
    assert record == {"seconds": 12.3, "mode": "quick", "device": "cpu", "started": "2026-12-04T11:30:05+00:00",
                      "commit": None, "parameters": {"SEED": 1}}
    json.dumps(record)


def test_git_commit_names_the_checkout_or_is_none_outside_one(tmp_path):
    assert runner.git_commit(tmp_path) is None
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=runner.NOTEBOOK_DIR, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the package is not in a git checkout")
    commit = runner.git_commit()
    assert commit is not None and head.stdout.startswith(commit.removesuffix("-dirty"))


def test_old_timings_format_is_read_as_seconds(tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "timings.json").write_text('{"01_dataset_prep": 12.5}')
    assert read_run_records(tmp_path) == {"01_dataset_prep": {"seconds": 12.5}}
