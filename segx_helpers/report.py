"""The one-page summary of a tutorial run: ``outputs/report.md`` with the key tables and figures.

It reads only what the notebooks saved (metric CSVs, the SegU summary, figures) and says which
notebook to run for anything missing, so it can be rebuilt at any time:
``python -m segx_helpers.report [root]``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .io import write_text


SUMMARY = "summary.json"


def update_summary(root: str | Path, dataset: str, **sections) -> Path:
    """Merge ``sections`` into ``<root>/outputs/summary.json`` under ``dataset`` (nested dicts merge, values
    replace), atomically: each notebook adds what it measured, and the report and README read it.
    Non-finite floats are written as null."""
    import math

    from .io import write_json

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
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.is_file() else {}
    current[dataset] = merge(current.get(dataset, {}), clean(sections))
    write_json(path, current)
    return path


def segu_findings(stats: pd.DataFrame, by_type: pd.DataFrame, ground_truth: pd.DataFrame | None,
                  method: str = "gradcam", score: str = "c_IoU") -> str:
    """One paragraph, in Markdown, of what held in this run: the paper's claim (mean SegU higher for
    correct predictions), SegU against the classifier's confidence for all errors, per error type and for
    shortcut-driven predictions. Written from the tables themselves, so the text cannot drift from the numbers.

    ``stats``: :func:`segx_helpers.segu.separation_table` grouped by method; ``by_type``:
    :func:`segx_helpers.segu.separation_by_error_type` for ``method``; ``ground_truth``: the separation
    table for shortcut-driven predictions (or None without twins)."""
    def row(frame, **where):
        part = frame
        for key, value in where.items():
            part = part[part[key] == value]
        return part.iloc[0] if len(part) else None

    def auroc(r) -> str:
        return f"{r['auroc']:.2f} [{r['auroc_low']:.2f}, {r['auroc_high']:.2f}]"

    def verdict(a, b) -> str:
        if a["auroc_low"] > b["auroc_high"]:
            return "beats"
        if a["auroc_high"] < b["auroc_low"]:
            return "is beaten by"
        return "overlaps, within the confidence intervals,"

    lines = []
    seg, conf = row(stats, group=method, score=score), row(stats, group=method, score="confidence")
    if seg is not None and conf is not None and seg["n_incorrect"] > 0:
        held = ("held" if seg["rank_biserial"] > 0 and seg["p_value"] < 0.05 else
                "pointed the right way but was not significant" if seg["rank_biserial"] > 0 else "did not hold")
        lines.append(f"- **The paper's claim** (higher {score} for correct than for incorrect predictions) {held} for "
                     f"{method}: rank-biserial {seg['rank_biserial']:.2f}, p = {seg['p_value']:.3g}.")
        lines.append(f"- **Against confidence, all {int(seg['n_incorrect'])} errors:** {score} AUROC {auroc(seg)} "
                     f"{verdict(seg, conf)} the classifier's confidence, {auroc(conf)}.")
    for kind in ("artefact present", "artefact absent", "other error"):
        a, b = row(by_type, errors=kind, score=score), row(by_type, errors=kind, score="confidence")
        if a is not None and b is not None and np.isfinite(a["auroc"]):
            lines.append(f"- **{kind}** ({int(a['n_incorrect'])} errors): {score} {auroc(a)}, confidence {auroc(b)}"
                         f"{' (below chance: SegU rates these errors *more* certain)' if a['auroc_high'] < 0.5 else ''}.")
    if ground_truth is not None:
        a, b = row(ground_truth, group=method, score=score), row(ground_truth, group=method, score="confidence")
        if a is not None and b is not None:
            lines.append(f"- **Shortcut-driven predictions** ({int(a['n_incorrect'])}, by counterfactual twins): "
                         f"{score} {auroc(a)} {verdict(a, b)} confidence, {auroc(b)}.")
    return "\n".join(lines) if lines else "_Not enough correct and incorrect predictions to say anything._"


def _table(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (no extra dependency)."""
    cells = frame.astype(object).where(frame.notna(), "")
    lines = ["| " + " | ".join(str(c) for c in cells.columns) + " |", "|" + "---|" * len(cells.columns)]
    for row in cells.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def _format_auroc(value, ci) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "")


def _with_ci(frame: pd.DataFrame, value: str = "value", low: str = "ci_low", high: str = "ci_high") -> pd.Series:
    return frame.apply(lambda r: f"{r[value]:.3f} [{r[low]:.3f}, {r[high]:.3f}]", axis=1)


def build_report(root: str | Path, dataset: str = "synthetic-derm") -> str:
    """Markdown text of the summary for one dataset's run under ``root``."""
    out = Path(root) / "outputs"
    here = out / dataset
    parts = [f"# SegX tutorial: summary of the run on `{dataset}`", ""]
    timings = out / "timings.json"
    if timings.is_file():
        times = json.loads(timings.read_text())
        parts += [f"Notebooks run: {len(times)}, total {sum(times.values()):.0f} s "
                  f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}).", ""]

    def section(title: str, path: Path, made_by: str, render) -> None:
        parts.append(f"## {title}")
        parts.append(render(path) if path.exists() else f"_Missing: run notebook {made_by}._")
        parts.append("")

    def metrics(path: Path) -> str:
        frame = pd.read_csv(path)
        return _table(pd.DataFrame({"metric": frame["metric"], "test value [95 % CI]": _with_ci(frame)}))

    section("Segmentation (test split)", here / "segmentation_metrics.csv", "02_train_segmenter", metrics)
    section("Classification (test split, shortcut reversed)", here / "classification_metrics.csv", "03_train_classifier",
            metrics)

    def localisation(path: Path) -> str:
        frame = pd.read_csv(path)
        keep = frame["metric"].isin(["IoU@5%", "AUITC", "relevance mass", "pointing game"])
        columns = ["method", "order", "metric", "predictions", "original", "SegX", "difference"]
        return _table(frame.loc[keep, [c for c in columns if c in frame]])

    section("Localisation against the true lesion: original vs SegX maps", here / "localisation_table.csv",
            "04_segx_maps", localisation)

    def segu(path: Path) -> str:
        summary = json.loads(path.read_text())
        frame = pd.DataFrame(summary["separation"])
        frame = frame[frame["score"].isin(["c_IoU", "c_AUITC", "confidence"])]
        table = pd.DataFrame({"explanation": frame["group"], "certainty": frame["score"],
                              "incorrect / all": frame["n_incorrect"].astype(str) + " / "
                              + (frame["n_incorrect"] + frame["n_correct"]).astype(str),
                              "AUROC for flagging errors [95 % CI]": _with_ci(frame, "auroc", "auroc_low", "auroc_high")})
        aurc = pd.DataFrame({"certainty": list(summary["aurc"]), "AURC (lower is better)": list(summary["aurc"].values())})
        return _table(table) + "\n\nSelective prediction (Grad-CAM):\n\n" + _table(aurc)

    section("SegU: does the explanation flag incorrect predictions?", here / "segu" / "summary.json",
            "05_segu_analysis", segu)

    def ground_truth(path: Path) -> str:
        run = json.loads(path.read_text()).get(dataset, {})
        rows = [{"certainty": f"{method} {score}", "AUROC, shortcut-driven predictions":
                 _format_auroc(values.get("auroc_shortcut"), values.get("auroc_shortcut_ci"))}
                for method, scores in run.get("segu", {}).items() for score, values in scores.items()]
        if "confidence" in run:
            rows.append({"certainty": "confidence", "AUROC, shortcut-driven predictions":
                         _format_auroc(run["confidence"].get("auroc_shortcut"), run["confidence"].get("auroc_shortcut_ci"))})
        rate = run.get("classifier", {}).get("shortcut_driven_rate")
        head = f"Shortcut-driven test predictions (counterfactual twins): {rate:.1%}.\n\n" if rate is not None else ""
        return head + (_table(pd.DataFrame(rows)) if rows else "_No SegU results yet._")

    section("SegU against the ground truth of shortcut reliance", out / SUMMARY, "05_segu_analysis", ground_truth)

    def fix(path: Path) -> str:
        entry = json.loads(path.read_text()).get(dataset, {}).get("fix")
        if not entry:
            return "_Missing: run notebook 07_train_with_the_mask._"
        return _table(pd.DataFrame(entry).T.rename_axis("model").reset_index())

    section("Training with the mask (notebook 07)", out / SUMMARY, "07_train_with_the_mask", fix)
    figures = [("SegX gallery", "04_gallery.png"), ("Localisation", "04_localisation.png"),
               ("SegU by outcome", "05_segu_by_outcome.png"), ("Risk-coverage", "05_risk_coverage.png")]
    parts.append("## Key figures")
    for title, name in figures:
        path = here / "figures" / name
        parts.append(f"![{title}]({path.relative_to(out).as_posix()})" if path.is_file() else f"_{title}: missing._")
        parts.append("")
    return "\n".join(parts)


def write_report(root: str | Path, dataset: str = "synthetic-derm") -> Path:
    """Write ``<root>/outputs/report.md`` and return its path."""
    return write_text(Path(root) / "outputs" / "report.md", build_report(root, dataset))


if __name__ == "__main__":
    print(write_report(sys.argv[1] if len(sys.argv) > 1 else "."))


def distance_findings(by_distance: dict[str, pd.DataFrame], score: str = "c_IoU") -> str:
    """One paragraph, in Markdown, of where SegU flagged shortcut-driven predictions and where it did not, by the
    artefact's distance from the region: per bin, ``score``'s AUROC against the classifier's confidence (for
    the first layer of ``by_distance``, then where another layer changes the verdict), and the paper's Table 4
    pattern (mean ``score`` correct vs incorrect) in the nearest and farthest bins. ``by_distance``: layer name ->
    :func:`segx_helpers.shortcut.shortcut_by_distance`. Written from the tables, so it cannot drift from them."""
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
