"""Notebook 05's analyses, one call each: the per-prediction score table (:func:`prediction_scores`, the
classifier's score named ``confidence``), SegU's AUROC per explanation variant or mask source
(:func:`separation_by_variant`, :func:`degraded_masks`, :func:`mask_dependence`), selective prediction
(:func:`selective_prediction`) and what the notebook writes (:func:`segu_summary`, :func:`segu_sections`,
:func:`distance_sections`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from segx_helpers.scores.analysis import analyse
from segx_helpers.scores.selective import augrc, aurc, combined_confidence, fit_combination, risk_coverage, separation_table
from segx_helpers.scores.segx import dilate

SEGU = "SegU c_IoU (Grad-CAM)"
LOGISTIC = "logistic (fit on val)"
PRODUCT = "confidence × c_IoU"
BASELINE = "classifier confidence (baseline)"


def prediction_scores(results: dict) -> pd.DataFrame:
    """Every method's prediction rows in one table (method after method, a fresh index). ``results``: method ->
    :class:`~segx_helpers.workflows.results.Results`."""
    return pd.concat([r.table for r in results.values()], ignore_index=True)


def separation_by_variant(tables: dict[str, pd.DataFrame], label: str = "variant", score: str = "c_IoU",
                          baseline: pd.DataFrame | None = None, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """How well a low ``score`` flags incorrect predictions (:func:`~segx_helpers.scores.segu.separation_table`)
    for each table of ``tables`` (name -> prediction rows), one row each with the name in column ``label``;
    with ``baseline`` (a results table) a last row for the classifier's confidence, the score to beat."""
    rows = [separation_table(table, [score], n_resamples=n_resamples, seed=seed).assign(**{label: name})
            for name, table in tables.items()]
    if baseline is not None:
        rows.append(separation_table(baseline, ["confidence"], n_resamples=n_resamples, seed=seed)
                    .assign(**{label: BASELINE}))
    return pd.concat(rows, ignore_index=True)


def degraded_masks(predicted: np.ndarray, true_masks: np.ndarray, dilation_px: int = 12) -> dict[str, np.ndarray]:
    """The mask sources of notebook 05's segmenter ablation, each bool ``(N, H, W)``: the segmenter's masks, the
    ground truth (a perfect segmenter), the segmenter's masks shifted by half the image (one that finds the
    wrong place) and dilated by ``dilation_px`` pixels (one that marks the surroundings too)."""
    shift = predicted.shape[-1] // 2
    return {"predicted (U-Net)": predicted, "ground truth": true_masks,
            "shifted by 1/2 image": np.roll(predicted, shift, axis=(1, 2)),
            f"dilated by {dilation_px} px": dilate(predicted, dilation_px)}


def mask_dependence(results, mask_sources: dict[str, np.ndarray], p: float = 5.0, n_resamples: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """SegU's dependence on the segmenter: ``c_IoU`` of the same maps (``results``, a
    :class:`~segx_helpers.workflows.results.Results`) recomputed against each mask source (name -> bool
    ``(N, H, W)`` per image, e.g. :func:`degraded_masks`), and its separation of incorrect predictions, one row per
    source (column ``masks``)."""
    rows = []
    for name, masks in mask_sources.items():
        table = results.table.assign(c_IoU=analyse(results.maps, masks, image_index=results.table["image_index"], p=p,
                                                   localisation=False)["c_IoU"])
        rows.append(separation_table(table, ["c_IoU"], n_resamples=n_resamples, seed=seed).assign(masks=name))
    return pd.concat(rows, ignore_index=True)


@dataclass
class SelectivePrediction:
    """Certainty scores of the test predictions and their risk-coverage curves: ``certainty`` (name -> ``(N,)``),
    ``curves`` (name -> ``(coverage, risk, AURC)``, for :func:`~segx_helpers.tutorial.viz.plot_risk_coverage`) and
    ``table`` (AURC and AUGRC per name)."""

    certainty: dict[str, np.ndarray]
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]]
    table: pd.DataFrame

    @property
    def combined(self) -> str:
        """The combination of confidence and SegU: the logistic model when it could be fitted, else the product."""
        return LOGISTIC if LOGISTIC in self.curves else PRODUCT

    def entry(self, column: str) -> dict[str, float]:
        """``column`` (``"AURC"`` or ``"AUGRC"``) of the confidence, SegU and their combination, keyed as
        ``outputs/summary.json`` keeps them."""
        return {"confidence": self.table.loc["confidence", column], "segu": self.table.loc[SEGU, column],
                "combined": self.table.loc[self.combined, column]}


def selective_prediction(test: pd.DataFrame, val: pd.DataFrame, min_errors: int = 3) -> SelectivePrediction:
    """Selective prediction on the test split with the classifier's confidence, SegU ``c_IoU``, their product and a
    logistic model of correctness from both, **fitted on the validation split only** (skipped, with a message,
    when validation has fewer than ``min_errors`` wrong predictions). ``test`` / ``val``: results tables (columns
    ``confidence``, ``c_IoU``, ``correct``) of the same explanation method."""
    certainty = {"confidence": test["confidence"].to_numpy(), SEGU: test["c_IoU"].to_numpy()}
    certainty[PRODUCT] = certainty["confidence"] * certainty[SEGU]
    if val["correct"].nunique() == 2 and (~val["correct"]).sum() >= min_errors:
        combo = fit_combination(val["c_IoU"], val["confidence"], val["correct"])
        certainty[LOGISTIC] = combined_confidence(combo, certainty[SEGU], certainty["confidence"])
    else:
        print(f"Validation has {(~val['correct']).sum()} wrong predictions: too few to fit the logistic combination.")
    correct = test["correct"].to_numpy()
    curves = {name: (*risk_coverage(correct, value), aurc(correct, value)) for name, value in certainty.items()}
    table = pd.DataFrame({"AURC": {name: c[2] for name, c in curves.items()},
                          "AUGRC": {name: augrc(correct, value) for name, value in certainty.items()}})
    return SelectivePrediction(certainty, curves, table)


def segu_summary(dataset: str, quick: bool, p: float, table4: pd.DataFrame, stats: pd.DataFrame,
                 by_type: pd.DataFrame, selective: SelectivePrediction, ablation: pd.DataFrame,
                 dependence: pd.DataFrame) -> dict:
    """``outputs/<dataset>/segu/summary.json``: notebook 05's tables (group means, separation, per error type, AURC,
    the method and mask ablations) as plain values."""
    ci = ["auroc", "auroc_low", "auroc_high"]
    return {
        "dataset": dataset, "quick": quick, "p": p,
        "segu_means": {f"{m} {s} {o}": float(v) for (s, o), row in table4.T.iterrows() for m, v in row.items()},
        "separation": stats.to_dict(orient="records"),
        "by_error_type": by_type[["errors", "certainty", "n_incorrect", *ci]].to_dict(orient="records"),
        "aurc": {name: c[2] for name, c in selective.curves.items()},
        "ablation_method": ablation[["variant", *ci]].to_dict(orient="records"),
        "ablation_masks": dependence[["masks", *ci]].to_dict(orient="records"),
    }


def _aurocs(stats: pd.DataFrame, ground_truth: pd.DataFrame | None, method: str, score: str) -> dict:
    """AUROC (with CI) of a low ``score`` of ``method`` for incorrect and (with a ground truth) shortcut-driven
    predictions."""
    def pick(frame):
        row = frame[(frame["group"] == method) & (frame["certainty"] == score)].iloc[0]
        return row["auroc"], [row["auroc_low"], row["auroc_high"]]

    incorrect, incorrect_ci = pick(stats)
    shortcut, shortcut_ci = pick(ground_truth) if ground_truth is not None else (None, None)
    return {"auroc_incorrect": incorrect, "auroc_incorrect_ci": incorrect_ci, "auroc_shortcut": shortcut,
            "auroc_shortcut_ci": shortcut_ci}


def segu_sections(stats: pd.DataFrame, ground_truth: pd.DataFrame | None, methods, selective: SelectivePrediction,
                  confidence_method: str = "gradcam") -> dict:
    """Notebook 05's sections of ``outputs/summary.json`` (keyword arguments of
    :func:`~segx_helpers.workflows.report.update_summary`): per method the AUROC of ``c_IoU`` and ``c_AUITC`` for
    flagging incorrect and shortcut-driven predictions (``stats`` and ``ground_truth``:
    :func:`~segx_helpers.scores.segu.separation_table` per method), the same for the classifier's confidence, and
    the AURC and AUGRC of confidence, SegU and their combination."""
    return {"segu": {m: {"c_iou": _aurocs(stats, ground_truth, m, "c_IoU"),
                         "c_auitc": _aurocs(stats, ground_truth, m, "c_AUITC")} for m in methods},
            "confidence": _aurocs(stats, ground_truth, confidence_method, "confidence"),
            "aurc": selective.entry("AURC"), "augrc": selective.entry("AUGRC")}


def distance_sections(by_distance: dict[str, pd.DataFrame], present: dict[str, pd.DataFrame],
                      layers: tuple[str, str] = ("last block", "block before")) -> dict:
    """Notebook 05's shortcut-by-distance tables as sections of ``outputs/summary.json``: both layers of
    ``by_distance`` and the first layer of ``present`` (the images that carry the patch)."""
    last, before = layers
    return {"shortcut_by_distance": by_distance[last].to_dict(orient="records"),
            "shortcut_by_distance_block_before": by_distance[before].to_dict(orient="records"),
            "shortcut_by_distance_patch_present": present[last].to_dict(orient="records")}
