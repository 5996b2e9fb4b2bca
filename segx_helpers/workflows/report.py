"""The one-page summary of a tutorial run: ``outputs/report.md`` with the key tables and figures.

It reads only what the notebooks saved (metric CSVs, the SegU summary, figures) and says which
notebook to run for anything missing, so it can be rebuilt at any time:
``python -m segx_helpers.cli.runner --report-only [--root ROOT]``.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from segx_helpers.data.format import load_info
from segx_helpers.data.synthetic import shortcut_pairs
from segx_helpers.data.io import locked, write_json, write_text
from segx_helpers.scores.metrics import DECIDES_RULE, DecidesCheck
from segx_helpers.workflows.settings import TutorialPaths


SUMMARY = "summary.json"


def update_summary(root: str | Path, dataset: str, **sections) -> Path:
    """Merge ``sections`` into ``<root>/outputs/summary.json`` under ``dataset`` (nested dicts merge, values
    replace), atomically and under a lock: each notebook adds what it measured, and the report and README read it.
    Non-finite floats are written as null."""
    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if hasattr(value, "item"):
            value = value.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value

    def merge(into: dict, new: dict) -> dict:
        for key, value in new.items():
            into[key] = merge(into.get(key, {}), value) if isinstance(value, dict) and isinstance(into.get(key), dict) \
                else value
        return into

    path = Path(root) / "outputs" / SUMMARY
    with locked(path):  # notebooks run at once on one root take turns here
        current = json.loads(path.read_text()) if path.is_file() else {}
        current[dataset] = merge(current.get(dataset, {}), clean(sections))
        write_json(path, current)
    return path


def segu_findings(stats: pd.DataFrame, by_type: pd.DataFrame, ground_truth: pd.DataFrame | None,
                  check: DecidesCheck | None = None, method: str = "gradcam", score: str = "c_IoU") -> str:
    """One paragraph, in Markdown, of what held in this run: the paper's claim (mean SegU higher for
    correct predictions), SegU against the classifier's confidence for all errors, per error type and for
    shortcut-driven predictions. Written from the tables themselves, so the text cannot drift from the numbers.
    An AUROC below 0.5 is never called a win: when both scores are below chance the text says both are inverted.

    ``stats``: :func:`segx_helpers.scores.selective.separation_table` grouped by method; ``by_type``:
    :func:`segx_helpers.scores.selective.separation_by_error_type` for ``method``; ``ground_truth``: the separation
    table for shortcut-driven predictions (or None without twins); ``check``: whether the classifier decides
    (:func:`segx_helpers.scores.metrics.decides_check`). When it does not, the paragraph opens by saying the tables are
    not a valid test of SegU and never says the paper's claim "did not hold"."""
    def row(frame, **where):
        part = frame
        for key, value in where.items():
            part = part[part[key] == value]
        return part.iloc[0] if len(part) else None

    def auroc(r) -> str:
        return interval(r["auroc"], (r["auroc_low"], r["auroc_high"]))

    def versus(a, b, against: str) -> str:
        """``a`` (the SegU score) against ``b`` (confidence), in words."""
        if a["auroc"] < 0.5 and b["auroc"] < 0.5:
            return (f"{score} AUROC {auroc(a)} and {against}, {auroc(b)}, are **both inverted** (below 0.5: errors get "
                    "*higher* certainty than correct predictions), so neither flags errors here; this is what a test split "
                    "that reverses what the model learned (a trap split) does")
        if a["auroc"] < 0.5:
            return f"{score} AUROC {auroc(a)} is inverted (below 0.5), while {against} is {auroc(b)}"
        if a["auroc_low"] > b["auroc_high"]:
            verdict = "beats"
        elif a["auroc_high"] < b["auroc_low"]:
            verdict = "is beaten by"
        else:
            verdict = "overlaps, within the confidence intervals,"
        inverted = " (inverted: below 0.5)" if b["auroc"] < 0.5 else ""
        return f"{score} AUROC {auroc(a)} {verdict} {against}, {auroc(b)}{inverted}"

    lines = []
    valid = check is None or check.decides
    if not valid:
        lines.append(f"- **Not a valid test of SegU:** {check.verdict()} The numbers below are measured all the same, "
                     "for reading, not for a verdict on the paper.")
    seg, conf = row(stats, group=method, certainty=score), row(stats, group=method, certainty="confidence")
    if seg is not None and conf is not None and seg["n_incorrect"] > 0:
        held = ("held" if seg["rank_biserial"] > 0 and seg["p_value"] < 0.05 else
                "pointed the right way but was not significant" if seg["rank_biserial"] > 0 else "did not hold")
        held = held if valid else "cannot be judged here (the classifier does not decide)"
        lines.append(f"- **The paper's claim** (higher {score} for correct than for incorrect predictions) {held} for "
                     f"{method}: rank-biserial {seg['rank_biserial']:.2f}, p = {seg['p_value']:.3g}.")
        against = "the classifier's confidence"
        lines.append(f"- **Against confidence, all {int(seg['n_incorrect'])} errors:** {versus(seg, conf, against)}.")
    for kind in ("artefact present", "artefact absent", "other error"):
        a, b = row(by_type, errors=kind, certainty=score), row(by_type, errors=kind, certainty="confidence")
        if a is not None and b is not None and np.isfinite(a["auroc"]):
            below = [name for name, r in ((score, a), ("confidence", b)) if r["auroc_high"] < 0.5]
            note = f" (below chance: {' and '.join(below)} rate{'s' if len(below) == 1 else ''} these errors *more* certain)"
            lines.append(f"- **{kind}** ({int(a['n_incorrect'])} errors): {score} {auroc(a)}, confidence {auroc(b)}"
                         f"{note if below else ''}.")
    if ground_truth is not None:
        a, b = row(ground_truth, group=method, certainty=score), row(ground_truth, group=method, certainty="confidence")
        if a is not None and b is not None:
            by_class = row(ground_truth, group=method, certainty="predicted class")
            alone = f"; the predicted class alone {auroc(by_class)}" if by_class is not None else ""
            lines.append(f"- **Shortcut-driven predictions** ({int(a['n_incorrect'])}, by counterfactual twins): "
                         f"{versus(a, b, 'confidence')}{alone}.")
    return "\n".join(lines) if lines else "_Not enough correct and incorrect predictions to say anything._"


# ------------------------------------------------------------------------------ formatting for people

DIGITS = 3
"""The most decimals any number in the report shows."""


def number(value, digits: int = DIGITS) -> str:
    """A cell: a float with ``digits`` decimals, an integer as is, ``True``/``False`` as yes/no, None/NaN as ''."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value)


def interval(value, ci=None, digits: int = DIGITS) -> str:
    """``0.593 [0.514, 0.640]``: a value with its confidence interval (just the value when ``ci`` is missing or
    has a None; '' when the value is missing)."""
    text = number(value, digits)
    if not text or ci is None or len(ci) != 2 or any(number(c, digits) == "" for c in ci):
        return text
    return f"{text} [{number(ci[0], digits)}, {number(ci[1], digits)}]"


def markdown_table(frame: pd.DataFrame, digits: int = DIGITS) -> str:
    """A DataFrame as a Markdown table, every cell through :func:`number`; columns with no value are left out."""
    cells = pd.DataFrame({column: [number(v, digits) for v in frame[column]] for column in frame.columns},
                         index=frame.index)
    cells = cells.loc[:, [column for column in cells.columns if (cells[column] != "").any()]]
    if cells.empty:
        return "_No values._"
    lines = ["| " + " | ".join(str(c) for c in cells.columns) + " |", "|" + "---|" * len(cells.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def section(title: str, look_at: str, body: str) -> str:
    """A report section: a heading, one sentence saying what to look at, then ``body`` (tables, text)."""
    return f"## {title}\n\n{look_at}\n\n{body}\n"


def missing(notebook: str) -> str:
    return f"_Missing: run notebook {notebook}._"


class RunRecordWarning(UserWarning):
    """``outputs/timings.json`` is damaged (e.g. truncated); the run records in it are ignored."""


def read_run_records(root: str | Path) -> dict[str, dict]:
    """``<root>/outputs/timings.json`` as notebook -> record (see :func:`segx_helpers.cli.runner.run_record`);
    an entry of the older format (bare seconds) becomes ``{"seconds": value}``. Empty when there is none, and
    empty with one :class:`RunRecordWarning` when the file is damaged (not JSON, or not an object)."""
    path = Path(root) / "outputs" / "timings.json"
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        records = err
    if not isinstance(records, dict):
        problem = f"is not valid JSON ({records})" if isinstance(records, Exception) else \
            f"holds a {type(records).__name__}, not an object"
        warnings.warn(f"{path} {problem}: the pages say how the notebooks ran only once make tutorial writes it again",
                      RunRecordWarning, stacklevel=2)
        return {}
    return {name: value if isinstance(value, dict) else {"seconds": value} for name, value in records.items()}


def run_line(records: dict[str, dict]) -> str:
    """One sentence on how the notebooks ran: how many, how long, in which mode(s), on what, from which commit."""
    def values(key: str) -> str:
        found = sorted({str(r[key]) for r in records.values() if r.get(key) is not None})
        return " and ".join(found) if found else "unknown"

    total = sum(r.get("seconds", 0) for r in records.values())
    each = ", ".join(f"{name} {r.get('seconds', 0):.0f} s" for name, r in records.items())
    return (f"Notebooks run: {len(records)}, total {total:.0f} s ({each}); {values('mode')} mode on "
            f"{values('device')}, commit {values('commit')}.")


def dataset_kind(root: str | Path, dataset: str) -> str:
    """``"synthetic"`` for a generated dataset with a planted shortcut (reversed in its test split, with
    counterfactual twins), ``"real"`` for any other. Read from the dataset's ``dataset.json``; when the dataset
    folder is gone, from the run's summary.json (notebook 03 records a shortcut-driven rate only with twins)."""
    folder = TutorialPaths.at(root).dataset(dataset)
    if (folder / "dataset.json").is_file():
        return "synthetic" if shortcut_pairs(load_info(folder)) else "real"
    path = Path(root) / "outputs" / SUMMARY
    run = json.loads(path.read_text()).get(dataset, {}) if path.is_file() else {}
    return "synthetic" if run.get("classifier", {}).get("shortcut_driven_rate") is not None else "real"


def build_report(root: str | Path, dataset: str = "synthetic-derm") -> str:
    """Markdown text of the summary for one dataset's run under ``root``: sections of one sentence and a table each,
    labelled for what the data is (a synthetic dataset's test split reverses its shortcut; a real one's does not)."""
    out = Path(root) / "outputs"
    here = out / dataset
    run = json.loads((out / SUMMARY).read_text()).get(dataset, {}) if (out / SUMMARY).is_file() else {}
    synthetic = dataset_kind(root, dataset) == "synthetic"
    test_split = "test split, shortcut reversed" if synthetic else "test split"
    kind = ("synthetic data: an artefact goes with one class in training and against it in the test split"
            if synthetic else "a dataset without a planted shortcut (real data): no counterfactual twins")
    parts = [f"# SegX tutorial: summary of the run on `{dataset}`", "", f"Data: {kind}.", ""]
    records = read_run_records(root)
    if records:
        parts += [run_line(records), ""]

    def metrics_table(path: Path) -> str:
        frame = pd.read_csv(path)
        return markdown_table(pd.DataFrame({"metric": frame["metric"], "value [95 % CI]": [
            interval(r["value"], (r["ci_low"], r["ci_high"])) for _, r in frame.iterrows()]}))

    path = here / "segmentation_metrics.csv"
    parts.append(section("Segmentation (test split)", "Dice and IoU of the predicted masks against the true ones: "
                         "SegX and SegU are only as good as this mask.",
                         metrics_table(path) if path.is_file() else missing("02_train_segmenter")))
    path = here / "classification_metrics.csv"
    look = ("Macro AUROC against chance (0.5): the test split reverses the shortcut, so a classifier that learned "
            "it loses here." if synthetic else "Macro AUROC against chance (0.5) and accuracy against the majority class.")
    parts.append(section(f"Classification ({test_split})", look,
                         metrics_table(path) if path.is_file() else missing("03_train_classifier")))
    classifier = run.get("classifier", {})
    parts.append(section("Does the classifier decide?", f"Rule: {DECIDES_RULE}. If it does not, no SegU table below "
                         "is a valid test of SegU.", decides_text(classifier) if "decides" in classifier
                         else missing("03_train_classifier")))

    path = here / "localisation_table.csv"
    if path.is_file():
        frame = pd.read_csv(path)
        frame = frame[frame["metric"].isin(["IoU@5%", "AUITC", "relevance mass", "pointing game"])]
        body = markdown_table(frame[[c for c in ("method", "order", "metric", "predictions", "original", "SegX",
                                                 "difference") if c in frame]])
    else:
        body = missing("04_segx_maps")
    parts.append(section("Localisation against the true lesion: original vs SegX maps",
                         "The difference column: how far SegX moves each method's top pixels onto the true region "
                         "(higher is better; an interval that excludes 0 is a real change).", body))

    path = here / "segu" / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        frame = pd.DataFrame(summary["separation"])
        frame = frame[frame["certainty"].isin(["c_IoU", "c_AUITC", "confidence"])]
        body = markdown_table(pd.DataFrame({
            "explanation": frame["group"], "certainty": frame["certainty"],
            "incorrect / all": [f"{int(i)} / {int(i + c)}" for i, c in zip(frame["n_incorrect"], frame["n_correct"])],
            "AUROC for flagging errors [95 % CI]": [interval(r["auroc"], (r["auroc_low"], r["auroc_high"]))
                                                    for _, r in frame.iterrows()]}))
        selective = {"certainty": list(summary["aurc"]), "AURC": list(summary["aurc"].values())}
        body += ("\n\nSelective prediction (Grad-CAM): the AURC is the mean risk as the least certain predictions are "
                 "set aside (lower is better).\n\n"
                 + markdown_table(pd.DataFrame(selective)))
        if summary.get("within"):
            body += ("\n\nWithin each predicted class and each third of lesion size (Grad-CAM, last block and the block "
                     "before; AUROC for flagging errors, with the size-aware variants, lesion area alone and the predicted "
                     "class alone):\n\n"
                     + within_table(summary["within"]))
        if summary.get("peaks_in_border_cell"):
            body += "\n\nMaps peaking in a border cell of their grid: " + ", ".join(
                f"{k} {v:.0%}" for k, v in summary["peaks_in_border_cell"].items()) + "."
        if classifier.get("decides") is False:
            body = "**Not a valid test of SegU: the classifier does not decide** (see above).\n\n" + body
    else:
        body = missing("05_segu_analysis")
    parts.append(section("SegU: does the explanation flag incorrect predictions?",
                         "Compare each SegU row with the confidence row: above 0.5 a low score flags errors, below "
                         "0.5 the score is inverted (errors look *more* certain).", body))

    if synthetic:
        rows = [{"certainty": f"{method} {score}",
                 "AUROC, shortcut-driven predictions": interval(v.get("auroc_shortcut"), v.get("auroc_shortcut_ci"))}
                for method, scores in run.get("segu", {}).items() for score, v in scores.items()]
        if "confidence" in run:
            rows.append({"certainty": "confidence", "AUROC, shortcut-driven predictions": interval(
                run["confidence"].get("auroc_shortcut"), run["confidence"].get("auroc_shortcut_ci"))})
        if "predicted_class" in run:
            rows.append({"certainty": "the predicted class alone", "AUROC, shortcut-driven predictions": interval(
                run["predicted_class"].get("auroc_shortcut"), run["predicted_class"].get("auroc_shortcut_ci"))})
        rate = run.get("classifier", {}).get("shortcut_driven_rate")
        head = f"Shortcut-driven test predictions (counterfactual twins): {rate:.1%}.\n\n" if rate is not None else ""
        parts.append(section("SegU against the ground truth of shortcut reliance",
                             "Whether low SegU marks the predictions that flip when only the shortcut artefact is "
                             "flipped, compared with confidence.",
                             head + (markdown_table(pd.DataFrame(rows)) if rows else missing("05_segu_analysis"))))

    if run.get("shortcut_by_distance"):
        parts.append(section("Where SegU can see the shortcut: by the artefact's distance from the lesion",
                             "Compare c_IoU with confidence bin by bin: SegU should flag shortcut-driven predictions "
                             "where the artefact is far from the lesion (more than half a Grad-CAM cell), not where it "
                             "touches it.", distance_table(run["shortcut_by_distance"])))

    fix = run.get("fix")
    parts.append(section("Training with the mask (notebook 07)",
                         "A fix works when the shortcut-driven rate and the artefact mass fall well below the baseline's "
                         "while accuracy holds; 'target met' is at most half the baseline's, with intervals apart.",
                         fix_table(fix) if fix else missing("07_train_with_the_mask")))

    reveal = run.get("reveal")
    if synthetic or reveal:
        parts.append(section("From where to what: what the least certain predictions looked at (notebook 08)",
                             "Each cluster of the predictions SegU marks least certain, named with the artefact maps "
                             "(the share of members whose off-region top touches each artefact); the revised classifier "
                             "was trained against the discovered region, with no artefact label.",
                             reveal_table(reveal) if reveal else missing("08_from_where_to_what")))

    figures = [("SegX gallery", "04_gallery.png"), ("Localisation", "04_localisation.png"),
               ("SegU by outcome", "05_segu_by_outcome.png"),
               ("SegU by the artefact's distance", "05_segu_by_distance.png"), ("Risk-coverage", "05_risk_coverage.png")]
    parts.append("## Key figures")
    for title, name in figures:
        path = here / "figures" / name
        parts.append(f"![{title}]({path.relative_to(out).as_posix()})" if path.is_file() else f"_{title}: missing._")
        parts.append("")
    return "\n".join(parts)


def decides_text(classifier: dict) -> str:
    """The ``classifier`` section of ``outputs/summary.json`` as a verdict and a table: the share of test images
    decided as each class, sensitivity and specificity, and the one-feature baselines' AUROC beside the classifier's."""
    verdict = ("**It decides.**" if classifier["decides"] else
               "**It does not decide** (" + "; ".join(classifier.get("decides_reasons", [])) + ").")
    classes = pd.DataFrame({"predicted share": classifier.get("predicted_share", {}),
                            "sensitivity": classifier.get("sensitivity", {}),
                            "specificity": classifier.get("specificity", {})}).rename_axis("class").reset_index()
    baselines = pd.DataFrame({"score": ["classifier (macro AUROC)", *classifier.get("baseline_auroc", {})],
                              "test AUROC": [classifier.get("auroc"), *classifier.get("baseline_auroc", {}).values()]})
    return (f"{verdict} Started from: {classifier.get('weights', 'n/a')}; cut-offs "
            f"{[round(t, 3) for t in classifier.get('thresholds', [])]}.\n\n" + markdown_table(classes)
            + "\n\n" + markdown_table(baselines))


def within_table(rows: list[dict]) -> str:
    """SegU within predicted classes and lesion-size strata (``segu/summary.json``'s ``within``) as a Markdown table:
    one row per (layer, certainty), one column per view and group."""
    frame = pd.DataFrame(rows)
    frame["cell"] = [interval(r["auroc"], (r["auroc_low"], r["auroc_high"])) for _, r in frame.iterrows()]
    frame["column"] = frame["view"] + ": " + frame["group"].astype(str)
    table = frame.pivot_table(index=["layer", "certainty"], columns="column", values="cell", aggfunc="first",
                              sort=False).reset_index()
    return markdown_table(table)


def distance_table(rows: list[dict]) -> str:
    """The ``shortcut_by_distance`` rows of summary.json as a Markdown table: per bin the shortcut-driven count and
    the AUROC [95 % CI] of ``c_IoU``, ``c_AUITC``, confidence and (where the rows have it) the predicted class alone
    for flagging them, then Table 4's mean ``c_IoU`` for correct vs incorrect predictions."""
    scores = [("c_IoU", "c_iou"), ("c_AUITC", "c_auitc"), ("confidence", "confidence")]
    if any("predicted_class_auroc" in r for r in rows):
        scores.append(("predicted class", "predicted_class"))
    frame = pd.DataFrame({
        "distance": [r["bin"] for r in rows],
        "shortcut-driven / predictions": [f"{r['n_shortcut_driven']} / {r['n']}" for r in rows],
        **{f"{name} AUROC": [interval(r.get(f"{key}_auroc"), (r.get(f"{key}_auroc_low"), r.get(f"{key}_auroc_high")))
                             for r in rows]
           for name, key in scores},
        "mean c_IoU, correct / incorrect": [f"{number(r.get('c_iou_correct'))} / {number(r.get('c_iou_incorrect'))}"
                                            for r in rows]})
    return markdown_table(frame)


FIX_MODELS = {"baseline": "notebook 03's classifier", "control": "the same extra training without a fix"}


def fix_table(fix: dict) -> str:
    """Notebook 07's ``fix`` entry of summary.json as one row per model: accuracy, shortcut-driven rate and artefact
    mass with their intervals, what was chosen (the strength picked on validation) and whether the target was met."""
    chosen, met = fix.get("chosen", {}), fix.get("targets_met", {})
    rows = []
    for model, entry in fix.items():
        if not isinstance(entry, dict) or "accuracy" not in entry:
            continue
        rows.append({"model": model,
                     **{name: interval(entry.get(key), entry.get(f"{key}_ci"))
                        for key, name in (("accuracy", "accuracy"), ("shortcut_driven_rate", "shortcut-driven rate"),
                                          ("artefact_mass", "artefact mass"))},
                     "what was chosen": chosen.get(model, FIX_MODELS.get(model)),
                     "target met": met.get(model)})
    if not rows:
        return "_No models in the fix entry._"
    how = f"\n\nChosen on the validation split by {chosen['criterion']}." if chosen.get("criterion") else ""
    return markdown_table(pd.DataFrame(rows)) + how


def reveal_table(reveal: dict) -> str:
    """Notebook 08's ``reveal`` entry of summary.json as Markdown: one row per cluster (size, shortcut-driven share,
    share on each artefact), then the best patch cluster's purity and recall and the shortcut-driven rate before and
    after the revision."""
    rows = [{"cluster": k, "size": c["size"], "shortcut-driven": c.get("shortcut_driven_share"),
             **{f"on {kind}": share for kind, share in (c.get("artefact_share") or {}).items()}}
            for k, c in enumerate(reveal.get("clusters", []))]
    revise = reveal.get("revise", {})
    text = (f"{reveal.get('n_low_segu')} least certain predictions, {reveal.get('n_clusters')} clusters.\n\n"
            + (markdown_table(pd.DataFrame(rows)) if rows else "_No clusters._")
            + f"\n\nBest patch cluster: purity {number(reveal.get('patch_cluster_purity'))}, recall "
            f"{number(reveal.get('patch_cluster_recall'))}. Shortcut-driven rate "
            f"{number(revise.get('baseline_shortcut_driven_rate'))} (baseline) → "
            f"{number(revise.get('revised_shortcut_driven_rate'))} (revised against the discovered region), revised "
            f"accuracy {number(revise.get('revised_accuracy'))}.")
    return text


def write_report(root: str | Path, dataset: str = "synthetic-derm") -> Path:
    """Write ``<root>/outputs/report.md`` and return its path."""
    return write_text(Path(root) / "outputs" / "report.md", build_report(root, dataset))


def distance_findings(by_distance: dict[str, pd.DataFrame], score: str = "c_IoU") -> str:
    """One paragraph, in Markdown, of where SegU flagged shortcut-driven predictions and where it did not, by the
    artefact's distance from the region: per bin, ``score``'s AUROC against the classifier's confidence (for
    the first layer of ``by_distance``, then where another layer changes the verdict), and the paper's Table 4
    pattern (mean ``score`` correct vs incorrect) in the nearest and farthest bins. ``by_distance``: layer name ->
    :func:`segx_helpers.studies.shortcut.shortcut_by_distance`; empty without counterfactual twins. Written from the
    tables, so it cannot drift from them."""
    if not by_distance:
        return "_No distance tables (this dataset has no counterfactual twins): nothing to say here._"
    key = score.lower()

    def interval(row, name) -> str:
        return f"{row[f'{name}_auroc']:.2f} [{row[f'{name}_auroc_low']:.2f}, {row[f'{name}_auroc_high']:.2f}]"

    def verdict(row) -> str:
        seg, conf = row[f"{key}_auroc"], row["confidence_auroc"]
        if row[f"{key}_auroc_high"] < 0.5:
            return "is below chance (it rates these predictions *more* certain)"
        if row[f"{key}_auroc_low"] > row["confidence_auroc_high"]:
            return "beats"
        if row[f"{key}_auroc_high"] < row["confidence_auroc_low"]:
            return "is beaten by"
        return "is above" if seg > conf else "is below" if seg < conf else "ties with"

    lines = []
    layers = list(by_distance.items())
    first_name, first = layers[0]
    for row in first.to_dict("records"):
        if not np.isfinite(row[f"{key}_auroc"]):
            lines.append(f"- **{row['bin']}** ({row['n']} predictions, {row['n_shortcut_driven']} shortcut-driven): "
                         "too few of one kind to say.")
            continue
        ci_note = "" if verdict(row) in ("beats", "is beaten by") or "chance" in verdict(row) else \
            " (the intervals overlap)"
        lines.append(f"- **{row['bin']}** ({row['n']} predictions, {row['n_shortcut_driven']} shortcut-driven), "
                     f"{first_name}: {score} AUROC {interval(row, key)} {verdict(row)} confidence, "
                     f"{interval(row, 'confidence')}{ci_note}.")
    for name, table in layers[1:]:
        better = [r["bin"] for r, b in zip(table.to_dict("records"), first.to_dict("records"))
                  if np.isfinite(r[f"{key}_auroc"]) and np.isfinite(b[f"{key}_auroc"]) and r[f"{key}_auroc"] > b[f"{key}_auroc"]]
        values = ", ".join(f"{r[f'{key}_auroc']:.2f}" for r in table.to_dict("records"))
        lines.append(f"- **{name}**: {score} AUROC by bin {values}; higher than {first_name} in "
                     f"{', '.join(better) if better else 'no bin'}.")
    for position, where in ((0, "nearest"), (-1, "farthest")):
        row = first.iloc[position]
        correct, incorrect = row[f"{key}_correct"], row[f"{key}_incorrect"]
        if np.isfinite(correct) and np.isfinite(incorrect):
            pattern = ("the paper's pattern holds (correct at least twice incorrect)" if correct >= 2 * incorrect
                       else "correct above incorrect, but less than twice" if correct > incorrect
                       else "the paper's pattern is absent or inverted")
            lines.append(f"- **Table 4 format, {where} bin**: mean {score} correct {correct:.3f} vs incorrect "
                         f"{incorrect:.3f}: {pattern}.")
    return "\n".join(lines)
