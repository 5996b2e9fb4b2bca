"""Notebook 05's analyses, one call each: the per-prediction score table (:func:`prediction_scores`, the
classifier's probability named ``confidence``), SegU's AUROC per explanation variant or mask source
(:func:`separation_by_variant`, :func:`degraded_masks`, :func:`mask_dependence`), selective prediction
(:func:`selective_prediction`), what the counterfactual twins of a synthetic set show (:func:`shortcut_ground_truth`,
:func:`shortcut_dial`: empty on a dataset without twins, so the notebook needs no ``if``) and what the notebook
writes (:func:`segu_summary`, :func:`segu_sections`, :func:`distance_sections`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from segx_helpers.data.format import LoadedDataset
from segx_helpers.data.synthetic import shortcut_pairs
from segx_helpers.scores.analysis import AnalysisOptions, analyse
from segx_helpers.scores.selective import augrc, aurc, combined_confidence, fit_combination, risk_coverage, separation_table
from segx_helpers.scores.segx import dilate
from segx_helpers.studies.artefacts import segu_within, with_class_precision, with_size_columns
from segx_helpers.studies.shortcut import (DistanceBins, artefact_distance, examples_by_distance, shortcut_by_distance,
                                           shortcut_driven)
from segx_helpers.models.checkpoints import TrainedModel
from segx_helpers.workflows.results import Results

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
        scored = analyse(results.maps, masks, image_index=results.table["image_index"],
                         options=AnalysisOptions(p=p, localisation=False))
        table = results.table.assign(c_IoU=scored["c_IoU"])
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


@dataclass
class SeguTables:
    """Notebook 05's tables that ``outputs/<dataset>/segu/summary.json`` keeps: the paper's group means
    (``table4``: mean ``c_IoU`` / ``c_AUITC`` per method, columns (score, correct|incorrect)), the separation of
    incorrect predictions (``separation`` per method and ``by_error_type``, from
    :mod:`segx_helpers.scores.selective`), :func:`selective_prediction`, and the method and mask ablations
    (:func:`separation_by_variant`, :func:`mask_dependence`), SegU within predicted classes and lesion-size strata
    per layer (``within``, :func:`within_layers`) and the share of maps peaking in a border cell of their grid."""

    table4: pd.DataFrame
    separation: pd.DataFrame
    by_error_type: pd.DataFrame
    selective: SelectivePrediction
    ablation_method: pd.DataFrame
    ablation_masks: pd.DataFrame
    within: pd.DataFrame | None = None
    peaks_in_border_cell: dict[str, float] | None = None


def segu_summary(dataset: str, quick: bool, p: float, tables: SeguTables) -> dict:
    """``outputs/<dataset>/segu/summary.json``: notebook 05's tables (group means, separation, per error type, AURC,
    the method and mask ablations) as plain values."""
    ci = ["auroc", "auroc_low", "auroc_high"]
    return {
        "dataset": dataset, "quick": quick, "p": p,
        "segu_means": {f"{m} {s} {o}": float(v) for (s, o), row in tables.table4.T.iterrows() for m, v in row.items()},
        "separation": tables.separation.to_dict(orient="records"),
        "by_error_type": tables.by_error_type[["errors", "certainty", "n_incorrect", *ci]].to_dict(orient="records"),
        "aurc": {name: c[2] for name, c in tables.selective.curves.items()},
        "ablation_method": tables.ablation_method[["variant", *ci]].to_dict(orient="records"),
        "ablation_masks": tables.ablation_masks[["masks", *ci]].to_dict(orient="records"),
        "within": [] if tables.within is None else tables.within.to_dict(orient="records"),
        "peaks_in_border_cell": dict(tables.peaks_in_border_cell or {}),
    }


def _row(frame: pd.DataFrame, method: str, score: str) -> pd.Series:
    """The row of a separation table for ``method`` (column ``group``) and ``score`` (column ``certainty``)."""
    return frame[(frame["group"] == method) & (frame["certainty"] == score)].iloc[0]


def _aurocs(stats: pd.DataFrame, ground_truth: pd.DataFrame | None, method: str, score: str) -> dict:
    """AUROC (with CI) of a low ``score`` of ``method`` for incorrect and (with a ground truth, not empty)
    shortcut-driven predictions."""
    incorrect = _row(stats, method, score)
    shortcut = _row(ground_truth, method, score) if ground_truth is not None and len(ground_truth) else None
    return {"auroc_incorrect": incorrect["auroc"], "auroc_incorrect_ci": [incorrect["auroc_low"], incorrect["auroc_high"]],
            "auroc_shortcut": None if shortcut is None else shortcut["auroc"],
            "auroc_shortcut_ci": None if shortcut is None else [shortcut["auroc_low"], shortcut["auroc_high"]]}


def segu_sections(stats: pd.DataFrame, ground_truth: pd.DataFrame | None, methods, selective: SelectivePrediction,
                  confidence_method: str = "gradcam") -> dict:
    """Notebook 05's sections of ``outputs/summary.json`` (keyword arguments of
    :func:`~segx_helpers.workflows.report.update_summary`): per method the AUROC of ``c_IoU`` and ``c_AUITC`` for
    flagging incorrect and shortcut-driven predictions (``stats`` and ``ground_truth``:
    :func:`~segx_helpers.scores.segu.separation_table` per method; ``ground_truth`` None or empty without
    counterfactual twins), the same for the classifier's confidence, and the AURC and AUGRC of confidence, SegU and
    their combination. Where ``ground_truth`` rates the predicted class alone (certainty ``"predicted class"``),
    also ``predicted_class``: its AUROC for flagging shortcut-driven predictions (its AUROC for errors is in
    notebook 05's within table)."""
    sections = {"segu": {m: {"c_iou": _aurocs(stats, ground_truth, m, "c_IoU"),
                             "c_auitc": _aurocs(stats, ground_truth, m, "c_AUITC")} for m in methods},
                "confidence": _aurocs(stats, ground_truth, confidence_method, "confidence"),
                "aurc": selective.entry("AURC"), "augrc": selective.entry("AUGRC")}
    rated = ground_truth is not None and ((ground_truth["group"] == confidence_method)
                                          & (ground_truth["certainty"] == "predicted class")).any()
    if rated:
        row = _row(ground_truth, confidence_method, "predicted class")
        sections["predicted_class"] = {"auroc_shortcut": row["auroc"],
                                       "auroc_shortcut_ci": [row["auroc_low"], row["auroc_high"]]}
    return sections


def distance_sections(by_distance: dict[str, pd.DataFrame], present: dict[str, pd.DataFrame],
                      layers: tuple[str, str] = ("last block", "block before")) -> dict:
    """Notebook 05's shortcut-by-distance tables as sections of ``outputs/summary.json``: both layers of
    ``by_distance`` and the first layer of ``present`` (the images that carry the patch); none when the tables are
    empty (a dataset without counterfactual twins)."""
    if not by_distance:
        return {}
    last, before = layers
    return {"shortcut_by_distance": by_distance[last].to_dict(orient="records"),
            "shortcut_by_distance_block_before": by_distance[before].to_dict(orient="records"),
            "shortcut_by_distance_patch_present": present[last].to_dict(orient="records")}


# ------------------------------------------------------------------------------ what the counterfactual twins show

NO_TWINS = ("This dataset has no counterfactual twins (real data): sections 5 and 6 need a synthetic set, so their "
            "tables stay empty.")
SEPARATION_COLUMNS = ["group", "certainty", "n_correct", "n_incorrect", "mann_whitney_u", "p_value", "rank_biserial",
                      "auroc", "auroc_low", "auroc_high", "auprc", "auprc_low", "auprc_high", "error_rate"]
"""The columns of :func:`~segx_helpers.scores.selective.separation_table` grouped by method."""
DISTANCE_COLUMNS = ["bin", "n", "n_shortcut_driven", "c_iou_auroc", "c_auitc_auroc", "confidence_auroc",
                    "predicted_class_auroc"]
DIAL_SCORES = ("c_IoU", "c_AUITC", "confidence", "predicted class")
"""The scores :func:`shortcut_dial` bins, where the prediction rows have them: the paper's two, the classifier's
confidence and the predicted class alone (:func:`~segx_helpers.studies.artefacts.with_class_precision`)."""
TABLE4_COLUMNS = ["n", "c_iou_correct", "c_iou_incorrect", "c_auitc_correct", "c_auitc_incorrect"]


@dataclass
class ShortcutGroundTruth:
    """Which predictions relied on the shortcut, by counterfactual twins (notebook 05, section 5).

    ``scores``: the prediction rows with a ``shortcut_driven`` column; ``rates``: per method the predictions
    (``size``), the shortcut-driven ones (``sum``) and their share (``mean``); ``separation``: how well a low score
    flags a shortcut-driven prediction, per method (column ``group``) and ``certainty``, as
    :func:`~segx_helpers.scores.selective.separation_table` (``n_incorrect`` counts the shortcut-driven ones).
    Every table is empty on a dataset without twins."""

    scores: pd.DataFrame
    rates: pd.DataFrame
    separation: pd.DataFrame


def shortcut_ground_truth(classifier: TrainedModel, data: LoadedDataset, scores: pd.DataFrame,
                          certainties: Sequence[str], n_resamples: int = 1000, seed: int = 0) -> ShortcutGroundTruth:
    """:class:`ShortcutGroundTruth` for the prediction rows ``scores`` (columns ``method``, ``image_id``, ``class``
    and the ``certainties``): each prediction's counterfactual twin (the shortcut artefact flipped) is classified
    again (:func:`~segx_helpers.studies.shortcut.shortcut_driven`). Without twins it says so and returns empty
    tables."""
    if not shortcut_pairs(data.info):
        print(NO_TWINS)
        return ShortcutGroundTruth(scores.iloc[:0].assign(shortcut_driven=np.zeros(0, dtype=bool)),
                                   pd.DataFrame(columns=["size", "sum", "mean"]), pd.DataFrame(columns=SEPARATION_COLUMNS))
    scores = scores.assign(shortcut_driven=shortcut_driven(classifier.model, classifier.meta, data, scores))
    separation = separation_table(scores.assign(correct=~scores["shortcut_driven"]), list(certainties), group="method",
                                  n_resamples=n_resamples, seed=seed)
    rates = scores.groupby("method")["shortcut_driven"].agg(["size", "sum", "mean"])
    return ShortcutGroundTruth(scores, rates, separation)


@dataclass
class ShortcutDial:
    """Where SegU can see the shortcut, by the artefact's distance from the lesion (notebook 05, section 6).

    ``predictions``: layer name -> that layer's prediction rows with ``distance_px``, ``shortcut_driven`` and
    ``patch``; ``by_distance`` / ``present``: layer name -> :func:`~segx_helpers.studies.shortcut.shortcut_by_distance`
    over every prediction / over the images that carry the patch; ``examples``: shortcut-driven predictions of the
    first layer far from and next to the lesion (:func:`~segx_helpers.studies.shortcut.examples_by_distance`).
    Every entry is missing on a dataset without twins, and the tables below are then empty."""

    predictions: dict[str, pd.DataFrame]
    by_distance: dict[str, pd.DataFrame]
    present: dict[str, pd.DataFrame]
    examples: dict[str, Results]

    def table(self, patch_present: bool = False) -> pd.DataFrame:
        """The AUROC of each score for flagging shortcut-driven predictions, per layer and distance bin (over the
        images that carry the patch with ``patch_present``)."""
        tables = self.present if patch_present else self.by_distance
        if not tables:
            return pd.DataFrame(columns=DISTANCE_COLUMNS)
        return pd.concat(tables, names=["layer"]).reindex(columns=DISTANCE_COLUMNS)  # NaN for a score not binned

    def table4(self) -> pd.DataFrame:
        """The paper's Table 4 format per distance bin of the first layer: mean ``c_IoU`` and ``c_AUITC`` of correct
        and incorrect predictions."""
        if not self.by_distance:
            return pd.DataFrame(columns=TABLE4_COLUMNS)
        return next(iter(self.by_distance.values())).set_index("bin")[TABLE4_COLUMNS]

    def caption(self, row: dict) -> str:
        """A gallery caption for a prediction row of the first layer: image, class, the patch's distance, ``c_IoU``."""
        first = next(iter(self.predictions.values()))
        distance = first.set_index(["image_id", "class"]).loc[(row["image_id"], row["class"]), "distance_px"]
        return f"{row['image_id']} → {row['class']}\npatch {distance:.0f} px, c_IoU {row['c_IoU']:.2f}"


def shortcut_dial(truth: ShortcutGroundTruth, layers: dict[str, Results], bins: DistanceBins, data: LoadedDataset,
                  image_size: int, n_resamples: int = 1000, seed: int = 0) -> ShortcutDial:
    """:class:`ShortcutDial` for the explanations of ``layers`` (layer name -> Grad-CAM results of the same
    predictions; the first is the method whose rows ``truth.scores`` holds as ``gradcam``), binned by ``bins``;
    ``image_size``: the classifier's input size, at which the artefact's distance is measured. The scores binned
    are those of :data:`DIAL_SCORES` that ``truth.scores`` has. Empty when ``truth`` is (no counterfactual twins)."""
    if truth.scores.empty:
        return ShortcutDial({}, {}, {}, {})
    (first_name, first), *others = layers.items()
    rows = truth.scores[truth.scores["method"] == "gradcam"]
    rows = rows.assign(distance_px=artefact_distance(data, rows["image_id"], image_size))
    binned = [score for score in DIAL_SCORES if score in rows]
    of_the_prediction = [score for score in ("confidence", "predicted class") if score in rows]  # not the map's
    shared = rows[["image_id", "class", "shortcut_driven", "distance_px", "patch", *of_the_prediction]]
    predictions = {first_name: rows}
    for name, results in others:  # the same predictions, this layer's scores
        predictions[name] = results.table.drop(columns="confidence").merge(shared, on=["image_id", "class"])
    by_distance = {name: shortcut_by_distance(table, bins, binned, n_resamples=n_resamples, seed=seed)
                   for name, table in predictions.items()}
    present = {name: shortcut_by_distance(table[table["patch"]], bins, binned, n_resamples=n_resamples, seed=seed)
               for name, table in predictions.items()}
    return ShortcutDial(predictions, by_distance, present, examples_by_distance(first, rows, bins, n=4))


@dataclass
class WithinInputs:
    """What :func:`within_layers` reads besides the layers' results: the test images' predicted mask shares
    (``predicted_area``, by image id), the same classifier's results table on the validation split
    (``validation``: ``class``, ``correct``; for the predicted-class baseline, left out when ``None``) and the
    saliency percentage ``p``."""

    predicted_area: pd.Series
    validation: pd.DataFrame | None = None
    p: float = 5.0


def within_layers(results: dict, data: LoadedDataset, inputs: WithinInputs, n_resamples: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """:func:`segx_helpers.studies.artefacts.segu_within` for each layer's Grad-CAM results (``results``: layer name ->
    :class:`~segx_helpers.workflows.results.Results` of the same test split), with the lesion-size columns
    (:func:`~segx_helpers.studies.artefacts.with_size_columns`) and, given validation results, the predicted class
    alone (:func:`~segx_helpers.studies.artefacts.with_class_precision`). One table with a ``layer`` column first."""
    def columns(table: pd.DataFrame) -> pd.DataFrame:
        sized = with_size_columns(table, data, inputs.predicted_area, p=inputs.p)
        return sized if inputs.validation is None else with_class_precision(sized, inputs.validation)

    frames = [segu_within(columns(r.table), n_resamples, seed).assign(layer=name) for name, r in results.items()]
    out = pd.concat(frames, ignore_index=True)
    return out[["layer", *[c for c in out.columns if c != "layer"]]]


def within_display(within: pd.DataFrame) -> pd.DataFrame:
    """:func:`within_layers` as people read it: one row per (layer, certainty), one column per view and group,
    each cell "AUROC [low, high]" for flagging incorrect predictions (n incorrect / n in the column header)."""
    frame = within.copy()
    frame["cell"] = [f"{a:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(a) else "n/a"
                     for a, lo, hi in zip(frame["auroc"], frame["auroc_low"], frame["auroc_high"])]
    sizes = frame.groupby(["view", "group"], sort=False)[["n_incorrect", "n_correct"]].first()
    frame["column"] = [f"{v}: {g} ({int(sizes.loc[(v, g), 'n_incorrect'])}/"
                       f"{int(sizes.loc[(v, g)].sum())})" for v, g in zip(frame["view"], frame["group"])]
    order = list(dict.fromkeys(frame["column"]))
    table = frame.pivot_table(index=["layer", "certainty"], columns="column", values="cell", aggfunc="first", sort=False)
    return table[order]
