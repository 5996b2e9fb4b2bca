"""The run summary (outputs/summary.json) and the one-page report built from it."""
from __future__ import annotations

import json
import math

from segx_helpers.workflows.report import update_summary


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

    from segx_helpers.workflows.report import segu_findings

    stats = pd.DataFrame([
        {"group": "gradcam", "certainty": "c_IoU", "n_incorrect": 40, "rank_biserial": 0.3, "p_value": 0.001,
         "auroc": 0.65, "auroc_low": 0.58, "auroc_high": 0.72},
        {"group": "gradcam", "certainty": "confidence", "n_incorrect": 40, "rank_biserial": 0.6, "p_value": 1e-6,
         "auroc": 0.85, "auroc_low": 0.80, "auroc_high": 0.90}])
    by_type = pd.DataFrame([
        {"errors": "artefact present", "certainty": "c_IoU", "n_incorrect": 20, "auroc": 0.30, "auroc_low": 0.2, "auroc_high": 0.4},
        {"errors": "artefact present", "certainty": "confidence", "n_incorrect": 20, "auroc": 0.8, "auroc_low": 0.7, "auroc_high": 0.9}])
    text = segu_findings(stats, by_type, None)
    assert "held for gradcam" in text and "is beaten by the classifier's confidence" in text
    assert "artefact present** (20 errors)" in text and "below chance" in text
    truth = pd.concat([stats, stats.iloc[:1].assign(certainty="predicted class", auroc=0.7, auroc_low=0.6,
                                                    auroc_high=0.8)])
    shortcut = next(line for line in segu_findings(stats, by_type, truth).splitlines() if "Shortcut-driven" in line)
    assert shortcut.endswith("; the predicted class alone 0.700 [0.600, 0.800].")


def test_report_shows_the_ground_truth_and_the_fix_from_summary_json(tmp_path):
    from segx_helpers.workflows.report import build_report

    update_summary(tmp_path, "synthetic-derm", classifier={"shortcut_driven_rate": 0.33},
                   segu={"gradcam": {"c_iou": {"auroc_shortcut": 0.59, "auroc_shortcut_ci": [0.5, 0.67]}}},
                   confidence={"auroc_shortcut": 0.8, "auroc_shortcut_ci": [0.74, 0.86]},
                   predicted_class={"auroc_shortcut": 0.71, "auroc_shortcut_ci": [0.65, 0.77]},
                   fix={"baseline": {"accuracy": 0.7, "shortcut_driven_rate": 0.44},
                        "rrr": {"accuracy": 0.63, "shortcut_driven_rate": 0.03}})
    text = build_report(tmp_path)
    assert "Shortcut-driven test predictions (counterfactual twins): 33.0%" in text
    assert "| gradcam c_iou | 0.590 [0.500, 0.670] |" in text and "| confidence | 0.800 [0.740, 0.860] |" in text
    assert "| the predicted class alone | 0.710 [0.650, 0.770] |" in text
    assert "| rrr | 0.630 | 0.030 |" in text


def test_segu_findings_does_not_call_a_non_significant_difference_a_result():
    import pandas as pd

    from segx_helpers.workflows.report import segu_findings

    stats = pd.DataFrame([
        {"group": "gradcam", "certainty": "c_IoU", "n_incorrect": 40, "rank_biserial": 0.03, "p_value": 0.7,
         "auroc": 0.52, "auroc_low": 0.43, "auroc_high": 0.59},
        {"group": "gradcam", "certainty": "confidence", "n_incorrect": 40, "rank_biserial": 0.3, "p_value": 0.001,
         "auroc": 0.65, "auroc_low": 0.57, "auroc_high": 0.73}])
    text = segu_findings(stats, stats.iloc[:0].assign(errors=[]), None)
    assert "pointed the right way but was not significant" in text and "overlaps" in text


def _write_run(root, dataset, generator):
    """A run's saved results with raw floats (long decimals, as the notebooks write them) for ``dataset``."""
    import pandas as pd

    from segx_helpers.data.io import write_json

    here = root / "outputs" / dataset
    (here / "segu").mkdir(parents=True)
    data = root / "data" / dataset
    data.mkdir(parents=True)
    write_json(data / "dataset.json", {"name": dataset, "modality": "dermoscopy", "task": "multiclass",
                                       "class_names": ["benign", "malignant"], "mask_description": "lesion",
                                       "generator": generator})
    metrics = pd.DataFrame({"metric": ["macro AUROC", "accuracy"], "value": [0.6536082474226804, 0.71],
                            "ci_low": [0.5928391959798995, 0.64], "ci_high": [0.7187185929648241, 0.78]})
    metrics.to_csv(here / "classification_metrics.csv", index=False)
    metrics.assign(metric=["Dice", "IoU"]).to_csv(here / "segmentation_metrics.csv", index=False)
    pd.DataFrame({"method": ["gradcam"], "order": ["top-then-mask"], "metric": ["IoU@5%"], "predictions": [200],
                  "original": ["0.213 [0.190, 0.236]"], "SegX": ["0.412 [0.390, 0.431]"],
                  "difference": ["0.199 [0.180, 0.219]"], "original_mean": [0.21312345], "SegX_mean": [0.4123456],
                  "difference_mean": [0.1992222]}).to_csv(here / "localisation_table.csv", index=False)
    separation = [{"group": "gradcam", "certainty": s, "n_incorrect": 40, "n_correct": 160, "auroc": a,
                   "auroc_low": a - 0.0712345, "auroc_high": a + 0.0698765, "rank_biserial": 2 * a - 1, "p_value": 0.01}
                  for s, a in (("c_IoU", 0.3212345), ("c_AUITC", 0.3345678), ("confidence", 0.2012345))]
    write_json(here / "segu" / "summary.json", {"separation": separation, "aurc": {"confidence": 0.2512345,
                                                                                  "SegU c_IoU (Grad-CAM)": 0.2612345}})
    update_summary(root, dataset, classifier={"auroc": 0.6536082474226804})
    (root / "outputs" / "timings.json").write_text(json.dumps({
        "01_dataset_prep": {"seconds": 12.345, "mode": "quick", "device": "cpu", "started": "2026-12-04T11:00:00+00:00",
                            "commit": "5956656a1b", "parameters": {}},
        "02_train_segmenter": 30.25}))


def _tables(text):
    """Every Markdown table in ``text`` as a list of rows (lists of cell strings), header first."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _assert_readable(text):
    import re

    long_numbers = re.findall(r"\d+\.\d{4,}", text)
    assert not long_numbers, f"numbers with more than 3 decimals: {long_numbers}"
    tables = _tables(text)
    assert tables
    for table in tables:
        header, rows = table[0], table[1:]
        assert rows, f"a table without rows: {header}"
        for i, column in enumerate(header):
            assert any(row[i] for row in rows), f"column {column!r} is empty in {header}"
    return tables


def test_report_labels_a_real_dataset_and_prints_no_shortcut_table(tmp_path):
    from segx_helpers.workflows.report import build_report

    _write_run(tmp_path, "isic2018-trap", generator={})
    text = build_report(tmp_path, "isic2018-trap")
    _assert_readable(text)
    assert "## Classification (test split)" in text and "shortcut reversed" not in text
    assert "counterfactual twins" in text.split("## Segmentation")[0]  # the data line says there are none
    assert "ground truth of shortcut reliance" not in text and "AUROC, shortcut-driven" not in text
    assert "| macro AUROC | 0.654 [0.593, 0.719] |" in text
    assert "Notebooks run: 2, total 43 s" in text and "quick mode on cpu, commit 5956656a1b" in text


def test_report_of_a_synthetic_run_has_short_numbers_no_empty_column_and_a_sentence_per_table(tmp_path):
    from segx_helpers.workflows.report import build_report

    _write_run(tmp_path, "synthetic-derm", generator={"shortcut_class": "melanoma", "shortcut_artefact": "ink"})
    ci = [0.5123456789, 0.6712345678]
    fix = {model: {"accuracy": 0.7012345678, "accuracy_ci": ci, "auroc": 0.8, "auroc_ci": ci,
                   "shortcut_driven_rate": rate, "shortcut_driven_rate_ci": [rate - 0.05, rate + 0.05],
                   "artefact_mass": 0.1234567, "artefact_mass_ci": [0.1, 0.15], "segu_c_iou_mean": None,
                   "segu_c_iou_mean_ci": [None, None], "accuracy_gap": 0.3, "accuracy_gap_ci": [0.2, 0.4]}
           for model, rate in (("baseline", 0.4412345), ("control", 0.40), ("rrr", 0.0312345), ("background", 0.1))}
    fix["chosen"] = {"rrr": "RRR (λ=10)", "background": "background (q=0.5)", "masks": "ground truth",
                     "criterion": "validation loss"}
    fix["targets_met"] = {"control": False, "rrr": True, "background": True}
    update_summary(tmp_path, "synthetic-derm", classifier={"shortcut_driven_rate": 0.3312345}, fix=fix,
                   segu={"gradcam": {"c_iou": {"auroc_shortcut": 0.5912345, "auroc_shortcut_ci": [0.5, 0.67]},
                                     "c_auitc": {"auroc_shortcut": None, "auroc_shortcut_ci": [None, None]}}},
                   confidence={"auroc_shortcut": 0.8, "auroc_shortcut_ci": [0.74, 0.86]})
    text = build_report(tmp_path)
    tables = _assert_readable(text)
    assert "## Classification (test split, shortcut reversed)" in text
    assert "| gradcam c_iou | 0.591 [0.500, 0.670] |" in text
    fix_table = next(t for t in tables if t[0][0] == "model")
    assert fix_table[0] == ["model", "accuracy", "shortcut-driven rate", "artefact mass", "what was chosen", "target met"]
    assert fix_table[3] == ["rrr", "0.701 [0.512, 0.671]", "0.031 [-0.019, 0.081]", "0.123 [0.100, 0.150]",
                            "RRR (λ=10)", "yes"]
    assert fix_table[1][4] == "notebook 03's classifier" and fix_table[1][5] == ""
    # every table comes after its heading and one sentence saying what to look at
    for block in text.split("\n## ")[1:]:
        if "|" in block:
            heading, sentence = block.split("\n\n")[:2]
            assert sentence.endswith(".") and not sentence.startswith("|"), heading


def test_segu_findings_calls_two_aurocs_below_chance_inverted_not_a_win():
    import pandas as pd

    from segx_helpers.workflows.report import segu_findings

    stats = pd.DataFrame([
        {"group": "gradcam", "certainty": "c_IoU", "n_incorrect": 60, "rank_biserial": -0.36, "p_value": 1e-4,
         "auroc": 0.32, "auroc_low": 0.26, "auroc_high": 0.38},
        {"group": "gradcam", "certainty": "confidence", "n_incorrect": 60, "rank_biserial": -0.6, "p_value": 1e-8,
         "auroc": 0.20, "auroc_low": 0.15, "auroc_high": 0.25}])
    text = segu_findings(stats, stats.iloc[:0].assign(errors=[]), None)
    assert "beats" not in text and "both inverted" in text and "trap split" in text
    assert "0.320 [0.260, 0.380]" in text and "did not hold" in text
    # one of them below chance: still no win for it
    stats.loc[1, ["auroc", "auroc_low", "auroc_high"]] = [0.7, 0.62, 0.78]
    text = segu_findings(stats, stats.iloc[:0].assign(errors=[]), None)
    assert "beats" not in text and "is inverted (below 0.5)" in text


def test_a_classifier_that_predicts_one_class_makes_the_report_say_not_a_valid_test(tmp_path):
    """Issue 32: the decides check of a classifier that calls every image benign fails, the report's decides section
    says so with its reasons and labels the SegU tables "not a valid test", and the what-held paragraph never says
    the paper's claim "did not hold"."""
    import numpy as np
    import pandas as pd

    from segx_helpers.scores.metrics import decides_check
    from segx_helpers.workflows.report import build_report, segu_findings

    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.2).astype(int)
    p1 = np.clip(0.05 + 0.1 * y + rng.normal(0, 0.05, 300), 0.01, 0.45)  # never above 0.5: always "benign"
    check = decides_check(y, np.stack([1 - p1, p1], 1), "multiclass", ["benign", "malignant"], n_resamples=50)
    assert not check.decides and check.predicted_share["malignant"] == 0.0
    _write_run(tmp_path, "isic2018-random", generator={})
    update_summary(tmp_path, "isic2018-random", classifier={"auroc": 0.65, "weights": "random", **check.summary()})
    text = build_report(tmp_path, "isic2018-random")
    decides = text.split("## Does the classifier decide?")[1].split("\n## ")[0]
    assert "It does not decide" in decides and "recall below 20% for malignant" in decides
    assert "| malignant | 0.000 |" in decides
    assert "Not a valid test of SegU" in text.split("## SegU: does the explanation")[1]
    stats = pd.DataFrame([
        {"group": "gradcam", "certainty": s, "n_incorrect": 60, "rank_biserial": r, "p_value": 0.001, "auroc": a,
         "auroc_low": a - 0.05, "auroc_high": a + 0.05} for s, r, a in (("c_IoU", -0.2, 0.4), ("confidence", 0.3, 0.65))])
    findings = segu_findings(stats, stats.iloc[:0].assign(errors=[]), None, check)
    assert findings.startswith("- **Not a valid test of SegU:**") and "did not hold" not in findings
    assert "cannot be judged here" in findings
    assert "did not hold" in segu_findings(stats, stats.iloc[:0].assign(errors=[]), None)


def test_report_shows_notebook_08s_clusters_and_the_revision(tmp_path):
    from segx_helpers.workflows.report import build_report

    shares = {"patch": 0.9, "ruler": 0.0, "hair": 0.1, "vignette": 0.2}
    update_summary(tmp_path, "synthetic-derm", classifier={"shortcut_driven_rate": 0.5}, reveal={
        "n_low_segu": 100, "n_clusters": 2, "patch_cluster_purity": 0.94, "patch_cluster_recall": 1.0,
        "clusters": [{"size": 60, "shortcut_driven_share": 0.8, "artefact_share": shares},
                     {"size": 40, "shortcut_driven_share": 0.3, "artefact_share": {k: 0.0 for k in shares}}],
        "revise": {"baseline_shortcut_driven_rate": 0.5, "revised_shortcut_driven_rate": 0.05, "revised_accuracy": 0.7}})
    text = build_report(tmp_path)
    assert "100 least certain predictions, 2 clusters." in text
    assert "| 0 | 60 | 0.800 | 0.900 | 0.000 | 0.100 | 0.200 |" in text
    assert "purity 0.940, recall 1.000" in text and "0.500 (baseline) → 0.050" in text
    update_summary(tmp_path / "without", "synthetic-derm", classifier={"shortcut_driven_rate": 0.5})
    assert "Missing: run notebook 08" in build_report(tmp_path / "without")  # a synthetic run without notebook 08


def _update_many(root: str, writer: int, n: int) -> None:
    for i in range(n):
        update_summary(root, "shared-set", **{f"writer{writer}": {f"entry{i}": i}})


def test_notebooks_updating_one_summary_at_once_keep_every_entry(tmp_path):
    """Two notebooks run at once on one root (the test suite's notebook run does this) each merge their sections
    into outputs/summary.json: under the lock, no read-modify-write loses another process's entry."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_update_many, args=(str(tmp_path), w, 40)) for w in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join()
    assert all(process.exitcode == 0 for process in writers)
    summary = json.loads((tmp_path / "outputs" / "summary.json").read_text())["shared-set"]
    assert summary == {f"writer{w}": {f"entry{i}": i for i in range(40)} for w in range(4)}
