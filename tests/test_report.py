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


def test_segu_findings_states_what_the_tables_say():
    import pandas as pd

    from segx_helpers.report import segu_findings

    stats = pd.DataFrame([
        {"group": "gradcam", "score": "c_IoU", "n_incorrect": 40, "rank_biserial": 0.3, "p_value": 0.001,
         "auroc": 0.65, "auroc_low": 0.58, "auroc_high": 0.72},
        {"group": "gradcam", "score": "confidence", "n_incorrect": 40, "rank_biserial": 0.6, "p_value": 1e-6,
         "auroc": 0.85, "auroc_low": 0.80, "auroc_high": 0.90}])
    by_type = pd.DataFrame([
        {"errors": "artefact present", "score": "c_IoU", "n_incorrect": 20, "auroc": 0.30, "auroc_low": 0.2, "auroc_high": 0.4},
        {"errors": "artefact present", "score": "confidence", "n_incorrect": 20, "auroc": 0.8, "auroc_low": 0.7, "auroc_high": 0.9}])
    text = segu_findings(stats, by_type, None)
    assert "held for gradcam" in text and "is beaten by the classifier's confidence" in text
    assert "artefact present** (20 errors)" in text and "below chance" in text


def test_report_shows_the_ground_truth_and_the_fix_from_summary_json(tmp_path):
    from segx_helpers.report import build_report

    update_summary(tmp_path, "synthetic-derm", classifier={"shortcut_driven_rate": 0.33},
                   segu={"gradcam": {"c_iou": {"auroc_shortcut": 0.59, "auroc_shortcut_ci": [0.5, 0.67]}}},
                   confidence={"auroc_shortcut": 0.8, "auroc_shortcut_ci": [0.74, 0.86]},
                   fix={"baseline": {"accuracy": 0.7, "shortcut_driven_rate": 0.44},
                        "rrr": {"accuracy": 0.63, "shortcut_driven_rate": 0.03}})
    text = build_report(tmp_path)
    assert "Shortcut-driven test predictions (counterfactual twins): 33.0%" in text
    assert "| gradcam c_iou | 0.590 [0.500, 0.670] |" in text and "| confidence | 0.800 [0.740, 0.860] |" in text
    assert "| rrr | 0.630 | 0.030 |" in text


def test_segu_findings_does_not_call_a_non_significant_difference_a_result():
    import pandas as pd

    from segx_helpers.report import segu_findings

    stats = pd.DataFrame([
        {"group": "gradcam", "score": "c_IoU", "n_incorrect": 40, "rank_biserial": 0.03, "p_value": 0.7,
         "auroc": 0.52, "auroc_low": 0.43, "auroc_high": 0.59},
        {"group": "gradcam", "score": "confidence", "n_incorrect": 40, "rank_biserial": 0.3, "p_value": 0.001,
         "auroc": 0.65, "auroc_low": 0.57, "auroc_high": 0.73}])
    text = segu_findings(stats, stats.iloc[:0].assign(errors=[]), None)
    assert "pointed the right way but was not significant" in text and "overlaps" in text
