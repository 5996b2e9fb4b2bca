"""Annotated artefacts and lesion size on any dataset with an ``artefacts.csv`` (the ISIC 2018 trap sets,
the synthetic sets): the shortcut a split offers (:func:`artefact_label_correlation`, the phi correlation
of each artefact flag with a class, per split), the accuracy where each artefact agrees or disagrees with
the label (:func:`shortcut_breakdown`), lesion size as a shortcut (:func:`lesion_areas`,
:func:`lesion_size_auroc`), and a score (SegU, localisation) by artefact presence within lesion-size strata
(:func:`size_strata`, :func:`score_by_artefact`), and whether a classifier decides at all, against the
one-feature baselines the dataset offers (:func:`classifier_decides`). Counterfactual twins, which only the
synthetic sets have, are :mod:`segx_helpers.studies.shortcut`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from segx_helpers.data.format import LoadedDataset, read_mask
from segx_helpers.data.synthetic import phi_correlation, shortcut_pairs
from segx_helpers.scores.metrics import Baseline, DecidesCheck, decides_check
from segx_helpers.scores.segu import segu_iou_ceiling
from segx_helpers.scores.selective import separation_table


def positive_class(class_names: Sequence[str]) -> str:
    """The class artefacts are compared with: the second of two classes (``malignant`` in
    ``["benign", "malignant"]``); more classes need an explicit choice."""
    if len(class_names) != 2:
        raise ValueError(f"{len(class_names)} classes {list(class_names)}: name the class to compare artefacts with")
    return class_names[1]


def shortcut_breakdown(result: dict, artefacts: pd.DataFrame, shortcut: dict[str, str] | Sequence[str],
                       class_names: list[str]) -> pd.DataFrame:
    """Accuracy (and AUROC) where an artefact agrees vs disagrees with the label, per (class, artefact).

    ``result``: from :func:`segx_helpers.workflows.training_recipes.evaluate_classifier` (``image_id``, ``targets``,
    ``pred``, and ``probs`` for the AUROC column); ``shortcut`` maps a class name to the artefact column
    correlated with it (e.g. ``{"melanoma": "ink"}``), or is a list of artefact columns, each paired with
    the positive class (the last class of a two-class task, e.g. ``malignant``; see
    :func:`positive_class`). "agrees" means artefact present exactly when the class is present. The AUROC
    is that class's probability against its presence within the rows (NaN where one outcome is missing).
    """
    pairs = list(shortcut.items()) if isinstance(shortcut, dict) else [(positive_class(class_names), c) for c in shortcut]
    table = artefacts.set_index("image_id").loc[result["image_id"]]
    targets = np.asarray(result["targets"])
    pred = np.asarray(result["pred"])
    probs = np.asarray(result["probs"]) if "probs" in result else None
    rows = []
    for class_name, column in pairs:
        c = class_names.index(class_name)
        truth = targets == c if targets.ndim == 1 else targets[:, c] > 0.5
        decided = pred == c if pred.ndim == 1 else pred[:, c] > 0
        correct = (pred == targets) if targets.ndim == 1 else (decided == truth)
        agrees = table[column].to_numpy(dtype=bool) == truth
        for name, rows_mask in (("agrees", agrees), ("disagrees", ~agrees)):
            auroc = float("nan")
            if probs is not None and 0 < truth[rows_mask].sum() < rows_mask.sum():
                auroc = float(roc_auc_score(truth[rows_mask], probs[rows_mask, c]))
            rows.append({"class": class_name, "artefact": column, "artefact vs label": name, "images": int(rows_mask.sum()),
                         "accuracy": float(correct[rows_mask].mean()) if rows_mask.any() else float("nan"),
                         "auroc": auroc})
    return pd.DataFrame(rows)


def artefact_columns(root: str | Path) -> list[str]:
    """The artefact columns of a dataset's optional ``artefacts.csv`` (empty when it has none)."""
    path = Path(root) / "artefacts.csv"
    if not path.is_file():
        return []
    return [c for c in pd.read_csv(path, nrows=0).columns if c != "image_id"]


def artefact_table(data: LoadedDataset) -> pd.DataFrame:
    """``artefacts.csv`` joined with each image's split and label columns (one row per image, table order)."""
    path = data.root / "artefacts.csv"
    if not path.is_file():
        raise ValueError(f"{data.root} has no artefacts.csv: no artefact flags were recorded for this dataset")
    flags = pd.read_csv(path, dtype={"image_id": str})
    labels = data.table.drop(columns=["image_path", "mask_path"], errors="ignore")
    return labels.merge(flags, on="image_id", how="left", validate="one_to_one")


def artefact_label_correlation(data: LoadedDataset, columns: Sequence[str] | None = None,
                               class_name: str | None = None) -> pd.DataFrame:
    """Phi correlation of each artefact flag with one class, per split: the shortcut a split offers.

    ``columns``: artefacts to report (default every column of ``artefacts.csv``); ``class_name``: the
    class (default :func:`positive_class`). Columns: split, artefact, class, phi, prevalence (share of the
    split's images with the artefact), with class (images with the artefact and the class), images.
    A positive phi in train and a negative one in test is a trap: a model that learnt the artefact fails.
    """
    table = artefact_table(data)
    columns = list(columns or artefact_columns(data.root))
    class_name = class_name or positive_class(data.info.class_names)
    has_class = _has_class(table, data, class_name)
    rows = []
    for split in ("train", "val", "test"):
        in_split = (table["split"] == split).to_numpy()
        for column in columns:
            flag = table[column].to_numpy(dtype=bool)
            rows.append({"split": split, "artefact": column, "class": class_name,
                         "phi": phi_correlation(flag[in_split], has_class[in_split]),
                         "prevalence": float(flag[in_split].mean()) if in_split.any() else float("nan"),
                         "with class": int((flag & has_class)[in_split].sum()), "images": int(in_split.sum())})
    return pd.DataFrame(rows)


def _has_class(table: pd.DataFrame, data: LoadedDataset, class_name: str) -> np.ndarray:
    if data.info.task == "multiclass":
        return (table["label"] == class_name).to_numpy()
    return table[class_name].to_numpy() == 1


def lesion_areas(data: LoadedDataset, image_ids: Sequence[str] | None = None) -> pd.Series:
    """Share of each image covered by its ground-truth mask (the lesion size), indexed by image id; NaN
    for an image without a mask. Default: every image of the dataset."""
    table = data.table.set_index("image_id")
    ids = list(table.index if image_ids is None else image_ids)
    areas = [float(read_mask(path).mean()) if isinstance(path, str) else float("nan")
             for path in table.loc[ids, "mask_path"]]
    return pd.Series(areas, index=pd.Index(ids, name="image_id"), name="lesion area")


def lesion_size_auroc(data: LoadedDataset, class_name: str | None = None,
                      areas: pd.Series | None = None) -> pd.DataFrame:
    """Per split: AUROC of the ground-truth lesion area alone as a score for ``class_name`` (default
    :func:`positive_class`), and the median area with and without the class. Far from 0.5 means lesion
    size is itself a shortcut a classifier can use; a change between splits means the split moved it."""
    class_name = class_name or positive_class(data.info.class_names)
    areas = lesion_areas(data) if areas is None else areas
    table = data.table.assign(area=areas.reindex(data.table["image_id"]).to_numpy())
    table["has_class"] = _has_class(table, data, class_name)
    rows = []
    for split in ("train", "val", "test"):
        part = table[(table["split"] == split) & table["area"].notna()]
        y = part["has_class"].to_numpy()
        rows.append({"split": split, "class": class_name, "images": len(part),
                     "AUROC of lesion area": float(roc_auc_score(y, part["area"])) if 0 < y.sum() < len(y) else float("nan"),
                     f"median area, {class_name}": float(part.loc[y, "area"].median()),
                     f"median area, not {class_name}": float(part.loc[~y, "area"].median())})
    return pd.DataFrame(rows)


def size_strata(areas: pd.Series, n_strata: int = 3) -> pd.Series:
    """Lesion-size strata of equal counts (quantiles of ``areas``), labelled ``small``/``medium``/``large``
    for three (``size 1`` .. ``size n`` otherwise) with the area range in the label."""
    names = ["small", "medium", "large"] if n_strata == 3 else [f"size {k + 1}" for k in range(n_strata)]
    codes, edges = pd.qcut(areas.rank(method="first"), n_strata, labels=False, retbins=True)
    out = pd.Series(index=areas.index, dtype=object, name="size stratum")
    for k in range(n_strata):
        members = codes == k
        if members.any():
            low, high = areas[members].min(), areas[members].max()
            out[members] = f"{names[k]} ({low:.0%}-{high:.0%})"
    return out


def score_by_artefact(scores: pd.DataFrame, artefacts: pd.DataFrame, columns: Sequence[str], score: str = "c_IoU",
                      strata: pd.Series | None = None) -> pd.DataFrame:
    """Does ``score`` differ between predictions on images with and without each artefact, within strata?

    ``scores``: one row per prediction with ``image_id`` and ``score`` (e.g. SegU's ``c_IoU``, or a
    localisation column); ``artefacts``: ``image_id`` + 0/1 columns; ``strata``: a label per image id
    (e.g. :func:`size_strata` of :func:`lesion_areas`), default one stratum. Per artefact and stratum:
    images with / without, mean score with / without, their difference, and the AUROC of the score for
    "artefact absent" (0.5: no difference; above: lower scores where the artefact is). The ``all strata``
    row pools the strata with weights n_with * n_without / n (a size-adjusted difference), so a difference
    that only comes from lesion size (small lesions leave more of a map outside them) disappears there.
    """
    flags = artefacts.set_index("image_id")
    frame = scores[["image_id", score]].dropna().copy()
    frame["stratum"] = "all images" if strata is None else strata.reindex(frame["image_id"]).to_numpy()
    frame = frame[frame["stratum"].notna()]
    rows = []
    for column in columns:
        present = flags[column].reindex(frame["image_id"]).to_numpy(dtype=float) > 0.5
        pooled, weights = [], []
        for stratum in sorted(frame["stratum"].unique(), key=str):
            inside = (frame["stratum"] == stratum).to_numpy()
            with_, without = frame[score].to_numpy()[inside & present], frame[score].to_numpy()[inside & ~present]
            difference = float(with_.mean() - without.mean()) if len(with_) and len(without) else float("nan")
            auroc = float("nan")
            if len(with_) and len(without):
                values = np.concatenate([with_, without])
                auroc = float(roc_auc_score(np.r_[np.zeros(len(with_)), np.ones(len(without))], values))
                weight = len(with_) * len(without) / (len(with_) + len(without))
                pooled.append(difference)
                weights.append(weight)
            rows.append({"artefact": column, "stratum": stratum, "with": len(with_), "without": len(without),
                         "mean with": float(with_.mean()) if len(with_) else float("nan"),
                         "mean without": float(without.mean()) if len(without) else float("nan"),
                         "difference": difference, "AUROC (absent vs present)": auroc})
        if strata is not None:
            rows.append({"artefact": column, "stratum": "all strata (size-adjusted)",
                         "with": int(present.sum()), "without": int((~present).sum()),
                         "mean with": float(frame[score][present].mean()) if present.any() else float("nan"),
                         "mean without": float(frame[score][~present].mean()) if (~present).any() else float("nan"),
                         "difference": float(np.average(pooled, weights=weights)) if weights else float("nan"),
                         "AUROC (absent vs present)": float("nan")})
    return pd.DataFrame(rows)


def scores_by_artefact(data: LoadedDataset, table: pd.DataFrame, scores: Sequence[str],
                       image_ids: Sequence[str]) -> pd.DataFrame | None:
    """:func:`score_by_artefact` for several ``scores`` columns of a prediction table, within lesion-size strata
    (:func:`size_strata` of the ground-truth :func:`lesion_areas` of ``image_ids``, the split's images), stacked
    with a ``score`` column. ``None`` for a dataset without annotated artefacts (no ``artefacts.csv`` columns) or a
    synthetic one with counterfactual twins, whose ground truth is the twins."""
    columns = artefact_columns(data.root)
    if not columns or shortcut_pairs(data.info):
        return None
    strata = size_strata(lesion_areas(data, list(image_ids)))
    return pd.concat([score_by_artefact(table, artefact_table(data), columns, score=s, strata=strata).assign(score=s)
                      for s in scores], ignore_index=True)


def pooled_differences(by_artefact: pd.DataFrame) -> pd.DataFrame:
    """The size-adjusted difference (with the artefact minus without) of each score, pooled over the strata: one
    row per artefact, one column per score, from :func:`scores_by_artefact`."""
    pooled = by_artefact[by_artefact["stratum"].str.startswith("all strata")]
    return pooled.pivot(index="artefact", columns="score", values="difference")


def decision_baselines(data: LoadedDataset) -> dict[str, Baseline]:
    """The one-feature baselines ``data`` offers on its validation and test splits (table order): ``"lesion area"``
    (the ground-truth mask's share of the image; when every validation and test image has a mask) and each 0/1
    column of ``artefacts.csv`` (an annotated artefact, e.g. a ruler on the ISIC trap sets)."""
    parts = {split: data.table[data.table["split"] == split] for split in ("val", "test")}
    out = {}
    if all(part["mask_path"].notna().all() and len(part) for part in parts.values()):
        out["lesion area"] = Baseline(*(lesion_areas(data, part["image_id"]).to_numpy() for part in parts.values()))
    columns = artefact_columns(data.root)
    if columns:
        flags = artefact_table(data).set_index("image_id")
        for column in columns:
            values = flags[column]
            if values.isin([0, 1]).all():
                out[column] = Baseline(*(values.loc[part["image_id"]].to_numpy(float) for part in parts.values()))
    return out


def classifier_decides(test: dict, data: LoadedDataset, meta: dict, n_resamples: int = 1000) -> DecidesCheck:
    """Does the classifier decide on the test split (:data:`segx_helpers.scores.metrics.DECIDES_RULE`)? ``test``:
    :func:`~segx_helpers.workflows.training_recipes.evaluate_classifier`'s result on ``"test"`` (its ``targets``,
    ``probs`` and ``image_id`` in table order); ``meta``: the classifier's checkpoint metadata (task, class names,
    the cut-offs chosen on validation). Compared with :func:`decision_baselines`."""
    order = data.table.loc[data.table["split"] == "test", "image_id"].tolist()
    if list(test["image_id"]) != order:
        raise ValueError(
            "classifier_decides: test predictions must be in the dataset's test order (evaluate_classifier)"
        )
    validation_labels = data.targets[(data.table["split"] == "val").to_numpy()]
    return decides_check(test["targets"], test["probs"], meta["task"], meta["class_names"], meta.get("thresholds"),
                         decision_baselines(data), validation_labels, n_resamples)


def with_size_columns(table: pd.DataFrame, data: LoadedDataset, predicted_area: pd.Series, p: float = 5.0,
                      n_strata: int = 3) -> pd.DataFrame:
    """``table`` (one row per prediction, with ``image_id`` and ``c_IoU``) with the columns that let SegU be read
    apart from lesion size: ``lesion area`` (the ground-truth mask's share of the image), ``size stratum``
    (:func:`size_strata` of the lesion areas of the table's images), and ``c_IoU / max``, the paper's ``c_IoU``
    over the largest value it can reach for that image's predicted mask (``predicted_area``: its share of the
    image, indexed by image id; :func:`segx_helpers.scores.segu.segu_iou_ceiling`)."""
    ids = table["image_id"].astype(str)
    areas = lesion_areas(data, sorted(set(ids)))
    ceiling = segu_iou_ceiling(predicted_area.reindex(ids).to_numpy(), p)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(ceiling > 0, table["c_IoU"].to_numpy() / ceiling, 0.0)
    return table.assign(**{"lesion area": areas.reindex(ids).to_numpy(),
                           "size stratum": size_strata(areas, n_strata).reindex(ids).to_numpy(),
                           "c_IoU / max": relative})


def with_class_precision(table: pd.DataFrame, validation: pd.DataFrame) -> pd.DataFrame:
    """``table`` (one row per prediction, with ``class``) with a ``predicted class`` column: the share of the
    validation split's predictions of that class that were correct (``validation``: a results table of the same
    classifier on validation, with ``class`` and ``correct``). A certainty that knows only which class was
    predicted, fitted without a test label: where one class's calls are mostly wrong (a cut-off chosen for
    sensitivity), it flags errors by itself, and SegU must beat it. A class never predicted on validation gets
    the validation accuracy of all predictions."""
    for name, frame, needed in (("table", table, {"class"}), ("validation", validation, {"class", "correct"})):
        missing = needed - set(frame.columns)
        if missing:
            raise ValueError(f"with_class_precision: {name} has no column {sorted(missing)} (a results table has)")
    precision = validation.groupby("class")["correct"].mean()
    values = table["class"].map(precision).astype(float).fillna(float(validation["correct"].mean()))
    return table.assign(**{"predicted class": values.to_numpy()})


SIZE_AWARE_CERTAINTIES = ("c_IoU", "c_AUITC", "SegU share inside", "c_IoU / max", "confidence", "lesion area",
                          "predicted class")
"""The certainty columns of :func:`segu_within` (those the table has): the paper's two scores, two size-aware
variants, the classifier's confidence (of its decision), the lesion's area alone (a score that knows nothing of
the explanation) and the predicted class alone (:func:`with_class_precision`; constant within a predicted class,
so left blank (NaN) there)."""


def segu_within(table: pd.DataFrame, n_resamples: int = 1000, seed: int = 0,
                certainties: Sequence[str] = SIZE_AWARE_CERTAINTIES) -> pd.DataFrame:
    """How well each certainty flags incorrect predictions (AUROC of *low* certainty with its 95 % interval),
    overall, within each predicted class and within each lesion-size stratum. ``table``: one row per prediction
    with ``correct``, ``class``, the certainty columns and ``size stratum`` (:func:`with_size_columns`). Columns:
    view ("all", "predicted class", "lesion size"), group, certainty, n_correct, n_incorrect, auroc, auroc_low,
    auroc_high. Within a predicted class SegU cannot ride on which class was predicted; within a size stratum it
    cannot ride on lesion size. Certainties the table lacks are left out."""
    views = (("all", None), ("predicted class", "class"), ("lesion size", "size stratum"))
    present = [c for c in certainties if c in table.columns]
    frames = []
    for view, column in views:
        part = separation_table(table, present, group=column, n_resamples=n_resamples, seed=seed)
        frames.append(part.assign(view=view))
    out = pd.concat(frames, ignore_index=True)
    constant = (out["view"] == "predicted class") & (out["certainty"] == "predicted class")  # nothing to rank
    out.loc[constant, ["auroc", "auroc_low", "auroc_high"]] = np.nan
    return out[["view", "group", "certainty", "n_correct", "n_incorrect", "auroc", "auroc_low", "auroc_high"]]
