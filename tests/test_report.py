"""The run summary (outputs/summary.json) and the one-page report built from it."""
from __future__ import annotations

import json
import math

from segx_helpers.report import update_summary


def test_update_summary_merges_sections_per_dataset_and_writes_nan_as_null(tmp_path):
    update_summary(tmp_path, "synthetic-derm", quick=True, seed=0, segmenter={"dice": 0.9})
    update_summary(tmp_path, "synthetic-derm", classifier={"auroc": 0.8, "shortcut_driven_rate": math.nan})
    update_summary(tmp_path, "synthetic-derm", segmenter={"iou": 0.8})
    update_summary(tmp_path, "synthetic-cxr", quick=False)
    summary = json.loads((tmp_path / "outputs" / "summary.json").read_text())
    assert summary["synthetic-derm"] == {"quick": True, "seed": 0, "segmenter": {"dice": 0.9, "iou": 0.8},
                                         "classifier": {"auroc": 0.8, "shortcut_driven_rate": None}}
    assert summary["synthetic-cxr"] == {"quick": False}
