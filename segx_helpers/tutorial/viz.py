"""Plots for the notebooks: dataset overviews, training curves, overlays, galleries, SegU figures.

Every function returns the matplotlib ``Figure`` so notebooks can show and save it; every figure
has a title, axis labels and a legend where one is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from sklearn.metrics import auc, roc_curve

from segx_helpers.data.format import LoadedDataset, read_image, read_mask
from segx_helpers.scores.decisions import one_hot
from segx_helpers.scores.segx import top_percent
from segx_helpers.workflows.results import overlay

MASK_COLOUR = "#00e5ff"


def _outline(ax, mask: np.ndarray, colour: str = MASK_COLOUR, width: float = 1.2) -> None:
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=width)


def _as_display(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return image


# ------------------------------------------------------------------------------ datasets

def describe_dataset(data: LoadedDataset) -> pd.DataFrame:
    """One row per image: id, split, label(s) and the mask's share of the image (NaN without a mask)."""
    table = data.table.copy()
    areas = []
    for path in table["mask_path"]:
        areas.append(float(read_mask(path).mean()) if path is not None else np.nan)
    table["mask_area"] = areas
    if data.info.task == "multilabel":
        names = data.info.class_names
        table["label"] = [", ".join(n for n in names if row[n]) or "none" for _, row in table[names].iterrows()]
    return table.drop(columns=["image_path", "mask_path"])


def show_examples(data: LoadedDataset, per_class: int = 4, seed: int = 0) -> plt.Figure:
    """A grid of images with their mask outline, one row per class (multilabel: images with that finding)."""
    rng = np.random.default_rng(seed)
    names = data.info.class_names
    fig, axes = plt.subplots(len(names), per_class, figsize=(2.2 * per_class, 2.3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        if data.info.task == "multiclass":
            rows = data.table[data.table["label"] == name]
        else:
            rows = data.table[data.table[name] == 1]
        chosen = rows.iloc[rng.permutation(len(rows))[:per_class]]
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(chosen):
                ax.axis("off")
                continue
            row = chosen.iloc[c]
            image = read_image(row["image_path"], channels=data.info.channels)
            ax.imshow(_as_display(image), cmap="gray" if data.info.channels == 1 else None)
            if row["mask_path"] is not None:
                _outline(ax, read_mask(row["mask_path"]))
            ax.set_title(row["image_id"], fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=11)
    fig.suptitle(f"{data.info.name}: examples per class (outline = {data.info.mask_description})")
    fig.legend(handles=[plt.Line2D([], [], color=MASK_COLOUR, label=f"mask: {data.info.mask_description}")],
               loc="lower center", ncol=1, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig


def plot_class_balance(summary: pd.DataFrame, data: LoadedDataset) -> plt.Figure:
    """Images per class and split (multilabel: images carrying each finding)."""
    if data.info.task == "multiclass":
        counts = summary.groupby(["split", "label"]).size().rename("images").reset_index()
    else:
        counts = summary.melt(id_vars=["split"], value_vars=data.info.class_names, var_name="label")
        counts = counts[counts["value"] == 1].groupby(["split", "label"]).size().rename("images").reset_index()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.barplot(data=counts, x="label", y="images", hue="split", hue_order=["train", "val", "test"],
                order=data.info.class_names, ax=ax)
    ax.set(title=f"{data.info.name}: class balance per split", xlabel="class", ylabel="number of images")
    fig.tight_layout()
    return fig


def plot_mask_area(summary: pd.DataFrame, data: LoadedDataset) -> plt.Figure:
    """Distribution of the mask's share of the image, per class."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.histplot(data=summary.dropna(subset=["mask_area"]), x="mask_area", hue="label", element="step",
                 stat="density", common_norm=False, ax=ax)
    ax.set(title=f"{data.info.name}: area of the {data.info.mask_description} (share of image)",
           xlabel="mask area / image area", ylabel="density")
    fig.tight_layout()
    return fig


def plot_shortcut_correlation(table: pd.DataFrame) -> plt.Figure:
    """Measured phi correlation between artefact and class per split, next to the generator's setting.

    ``table`` columns: split, pair (e.g. "ink ~ melanoma"), measured, parameter.
    """
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.barplot(data=table, x="split", y="measured", hue="pair", order=["train", "val", "test"], ax=ax)
    for i, split in enumerate(["train", "val", "test"]):
        value = table.loc[table["split"] == split, "parameter"].iloc[0]
        ax.hlines(value, i - 0.4, i + 0.4, colors="black", linestyles="--", label="generator setting" if i == 0 else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Spurious artefact vs class: phi correlation per split", xlabel="split",
           ylabel="phi correlation", ylim=(-1.05, 1.05))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ training

def plot_history(history: pd.DataFrame, metric: str, title: str) -> plt.Figure:
    """Training loss and a validation metric per epoch, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(history["epoch"], history["train_loss"], marker="o", label="train loss")
    axes[0].set(title="training loss", xlabel="epoch", ylabel="loss")
    axes[1].plot(history["epoch"], history[metric], marker="o", color="C1", label=metric)
    axes[1].set(title=f"validation {metric}", xlabel="epoch", ylabel=metric)
    for ax in axes:
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_segmentation_grid(images: np.ndarray, true: np.ndarray, pred: np.ndarray, titles: Sequence[str],
                           title: str) -> plt.Figure:
    """Rows of image / true mask / predicted mask / error overlay (images ``(N, H, W, C)`` in [0, 1])."""
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(9, 2.3 * n), squeeze=False)
    for i in range(n):
        error = np.zeros(true[i].shape + (3,))
        error[true[i] & ~pred[i]] = (1.0, 0.2, 0.2)
        error[~true[i] & pred[i]] = (1.0, 0.8, 0.0)
        error[true[i] & pred[i]] = (0.2, 0.8, 0.3)
        panels = [(_as_display(images[i]), "image"), (true[i], "true mask"), (pred[i], "predicted mask"), (error, "errors")]
        for j, (panel, name) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
        axes[i, 0].set_ylabel(titles[i], fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, label=lbl) for c, lbl in
               (((0.2, 0.8, 0.3), "hit"), ((1.0, 0.2, 0.2), "missed"), ((1.0, 0.8, 0.0), "false alarm"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    return fig


def plot_score_distribution(values: np.ndarray, name: str, title: str) -> plt.Figure:
    """Histogram of per-image scores with the mean marked."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sns.histplot(values, bins=30, ax=ax, label="images")
    ax.axvline(np.mean(values), color="C3", ls="--", label=f"mean = {np.mean(values):.3f}")
    ax.set(title=title, xlabel=name, ylabel="number of images")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], title: str) -> plt.Figure:
    """Row-normalised confusion matrix with counts."""
    k = len(class_names)
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (np.asarray(y_true), np.asarray(y_pred)), 1)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    annot = np.array([[f"{share[i, j]:.2f}\n({counts[i, j]})" for j in range(k)] for i in range(k)])
    fig, ax = plt.subplots(figsize=(4.8, 4))
    sns.heatmap(share, annot=annot, fmt="", cmap="Blues", vmin=0, vmax=1, xticklabels=class_names,
                yticklabels=class_names, ax=ax, cbar_kws={"label": "share of true class"})
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    fig.tight_layout()
    return fig


def plot_roc_curves(y_true: np.ndarray, y_score: np.ndarray, class_names: Sequence[str], title: str) -> plt.Figure:
    """One-vs-rest ROC curve per class with its AUROC in the legend."""
    onehot = one_hot(y_true, len(class_names))
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for c, name in enumerate(class_names):
        if 0 < onehot[:, c].sum() < len(onehot):
            fpr, tpr, _ = roc_curve(onehot[:, c], y_score[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="chance")
    ax.set(title=title, xlabel="false positive rate", ylabel="true positive rate")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_shortcut_accuracy(table: pd.DataFrame, title: str) -> plt.Figure:
    """Accuracy where the artefact agrees vs disagrees with the label (from ``artefacts.shortcut_breakdown``)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.barplot(data=table, x="class", y="accuracy", hue="artefact vs label", ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.2f", fontsize=8)
    ax.set(title=title, xlabel="class the artefact is correlated with", ylabel="accuracy", ylim=(0, 1.1))
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ explanations

def plot_segx_gallery(images: np.ndarray, rows: Sequence[tuple[int, str]], maps: dict[str, tuple[np.ndarray, np.ndarray]],
                      masks: np.ndarray, p: float = 5.0, title: str = "Original vs SegX maps") -> plt.Figure:
    """Gallery: per row an image with its mask, then each method's original and SegX map.

    ``rows``: ``(image index, row label)``; ``maps``: method -> ``(original, segx)``, each ``(len(rows), H, W)``
    in row order; ``masks`` ``(N, H, W)`` the clinical-interest masks used by SegX.
    """
    methods = list(maps)
    n_cols = 1 + 2 * len(methods)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.1 * n_cols, 2.2 * len(rows)), squeeze=False)
    for r, (index, label) in enumerate(rows):
        mask = masks[index] >= 0.5
        axes[r, 0].imshow(overlay(images[index], np.zeros(mask.shape), mask, alpha=0.0))
        axes[r, 0].set_ylabel(label, fontsize=8)
        for m, method in enumerate(methods):
            original, aligned = maps[method]
            for c, (heat, kind) in enumerate(((original[r], "original"), (aligned[r], "SegX"))):
                top = top_percent(heat, p)[0]
                axes[r, 1 + 2 * m + c].imshow(overlay(images[index], heat, mask, top))
                if r == 0:
                    axes[r, 1 + 2 * m + c].set_title(f"{method}\n{kind}", fontsize=9)
        if r == 0:
            axes[r, 0].set_title("image + mask", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], color=(0.0, 0.9, 1.0), label="clinical-interest mask"),
               plt.Line2D([], [], color="white", marker="s", markerfacecolor="white", markeredgecolor="black",
                          linestyle="none", label=f"top {p:g} % pixels"),
               plt.Rectangle((0, 0), 1, 1, color="red", alpha=0.6, label="map (jet: blue low, red high)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def plot_localisation_change(summary: pd.DataFrame, title: str) -> plt.Figure:
    """Mean of each localisation metric, original vs SegX (per SegX order when ``summary`` has an
    ``order`` column), per method. ``summary``: columns method, metric, original_mean, SegX_mean
    (as :func:`segx_helpers.scores.analysis.localisation_summary` returns)."""
    orders = summary["order"] if "order" in summary else pd.Series("", index=summary.index)
    original = summary.assign(map="original", mean=summary["original_mean"]).drop_duplicates(["method", "metric"])
    aligned = summary.assign(map=("SegX " + orders).str.strip(), mean=summary["SegX_mean"])
    long = pd.concat([original, aligned], ignore_index=True)
    palette = ["#9e9e9e", "#1f77b4", "#ff7f0e"][: long["map"].nunique()]
    grid = sns.catplot(data=long, x="metric", y="mean", hue="map", col="method", kind="bar", height=3.4, aspect=1.5,
                       palette=palette)
    grid.set_xticklabels(rotation=30, ha="right")
    grid.set_axis_labels("localisation metric (vs ground-truth mask)", "mean over test predictions")
    grid.set(ylim=(0, 1.05))
    grid.figure.suptitle(title, y=1.03)
    return grid.figure


def plot_nothing_to_show(title: str, reason: str) -> plt.Figure:
    """A small figure with ``title`` that says in words why there is nothing to plot (e.g. a synthetic-only
    analysis on real data), so a notebook cell can show and save it like any other."""
    fig, ax = plt.subplots(figsize=(7, 1.4))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.4, reason, ha="center", va="center", wrap=True, fontsize=9)
    return fig


NO_ROWS = "Nothing to plot: no rows (a synthetic-only analysis on a dataset without counterfactual twins?)."


def plot_certainty_by_outcome(table: pd.DataFrame, score: str, title: str, by: str = "method",
                              outcome: str = "correct", labels: tuple[str, str] = ("correct", "incorrect")) -> plt.Figure:
    """Violin plots with points of a certainty score for the two values of a boolean ``outcome`` column
    (True first, named by ``labels``), per ``by``; :func:`plot_nothing_to_show` for a table without rows."""
    if table.empty:
        return plot_nothing_to_show(title, NO_ROWS)
    frame = table.assign(prediction=np.where(table[outcome], labels[0], labels[1]))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.violinplot(data=frame, x=by, y=score, hue="prediction", hue_order=list(labels), cut=0,
                   inner=None, split=False, ax=ax, palette=["#4caf50", "#e53935"], alpha=0.35)
    sns.stripplot(data=frame, x=by, y=score, hue="prediction", hue_order=list(labels), dodge=True,
                  size=3, ax=ax, palette=["#2e7d32", "#b71c1c"], legend=False)
    ax.set(title=title, xlabel=by, ylabel=score)
    ax.legend(title="prediction", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> plt.Figure:
    """Risk-coverage curves; ``curves``: name -> ``(coverage, risk, AURC)``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (coverage, risk, area) in curves.items():
        ax.plot(coverage, risk, label=f"{name} (AURC {area:.3f})")
    base = next(iter(curves.values()))[1][-1]
    ax.axhline(base, color="grey", ls=":", label=f"no abstention (risk {base:.3f})")
    ax.set(title=title, xlabel="coverage (share of predictions kept)", ylabel="risk (error rate among kept)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_auroc_with_ci(table: pd.DataFrame, label: str, title: str) -> plt.Figure:
    """Horizontal bars of AUROC with 95 % CIs (``table`` columns: ``label``, auroc, auroc_low, auroc_high)."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.4))
    y = np.arange(len(table))
    ax.barh(y, table["auroc"], color="#90caf9", label="AUROC")
    ax.errorbar(table["auroc"], y, xerr=[table["auroc"] - table["auroc_low"], table["auroc_high"] - table["auroc"]],
                fmt="none", ecolor="black", capsize=3, label="95 % CI")
    ax.axvline(0.5, color="grey", ls=":", label="chance")
    ax.set_yticks(y, table[label])
    ax.set(title=title, xlabel="AUROC for detecting incorrect predictions", xlim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_auroc_by_distance(tables: dict[str, pd.DataFrame], title: str) -> plt.Figure:
    """AUROC (95 % CI as error bars) for flagging shortcut-driven predictions against the artefact's distance
    bin: one line per SegU score and layer, the classifier's confidence dashed and, where the tables have it, the
    predicted class alone dotted. ``tables``: layer name -> :func:`segx_helpers.studies.shortcut.shortcut_by_distance`
    (same bins); confidence and the predicted class come from the first.
    :func:`plot_nothing_to_show` without tables."""
    if not tables:
        return plot_nothing_to_show(title, NO_ROWS)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    first = next(iter(tables.values()))
    x = np.arange(len(first))
    styles = {"c_iou": ("o", "-"), "c_auitc": ("s", "-")}
    colours = iter(["#1565c0", "#64b5f6", "#2e7d32", "#81c784", "#6a1b9a", "#ba68c8"])
    lines = [(f"{score} ({layer})", table, key, *styles[key]) for layer, table in tables.items()
             for score, key in (("c_IoU", "c_iou"), ("c_AUITC", "c_auitc"))]
    lines.append(("classifier confidence", first, "confidence", "D", "--"))
    if "predicted_class_auroc" in first:
        lines.append(("the predicted class alone", first, "predicted_class", "v", ":"))
    baselines = {"confidence": "black", "predicted_class": "#8d6e63"}
    for k, (label, table, key, marker, style) in enumerate(lines):
        shift = (k - (len(lines) - 1) / 2) * 0.05
        colour = baselines.get(key) or next(colours)
        auroc = table[f"{key}_auroc"].to_numpy(dtype=float)
        error = [auroc - table[f"{key}_auroc_low"].to_numpy(dtype=float),
                 table[f"{key}_auroc_high"].to_numpy(dtype=float) - auroc]
        ax.errorbar(x + shift, auroc, yerr=error, marker=marker, linestyle=style, color=colour, capsize=3, label=label)
    ax.axhline(0.5, color="grey", ls=":", label="chance")
    ax.set_xticks(x, [f"{b}\n(n={n}, {d} shortcut-driven)" for b, n, d in
                      zip(first["bin"], first["n"], first["n_shortcut_driven"])], fontsize=8)
    ax.set(title=title, xlabel="distance of the artefact from the lesion's edge",
           ylabel="AUROC for flagging\nshortcut-driven predictions", ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_prediction_gallery(images: np.ndarray, maps: np.ndarray, masks: np.ndarray, titles: Sequence[str],
                            title: str, p: float = 5.0, ncols: int = 4) -> plt.Figure:
    """One panel per prediction: the image with its original map, mask outline and top-p % outline."""
    n = len(maps)
    nrows = max(1, int(np.ceil(n / ncols)))
    # constrained layout leaves room for two-line titles above square images (tight_layout let them overlap the row above)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 3.2 * nrows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for k in range(n):
        ax = axes.ravel()[k]
        ax.imshow(overlay(images[k], maps[k], masks[k] >= 0.5, top_percent(maps[k], p)[0]))
        ax.set_title(titles[k], fontsize=8)
    handles = [plt.Line2D([], [], color=(0.0, 0.9, 1.0), label="predicted clinical-interest mask"),
               plt.Line2D([], [], color="white", marker="s", markerfacecolor="white", markeredgecolor="black",
                          linestyle="none", label=f"top {p:g} % of the original map")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False, fontsize=9)
    fig.suptitle(title)
    return fig


def plot_results_gallery(images: np.ndarray, masks: np.ndarray, rows, title: str, caption=None, p: float = 5.0,
                         ncols: int = 4) -> plt.Figure:
    """:func:`plot_prediction_gallery` for prediction rows that travel with their maps (a
    :class:`~segx_helpers.workflows.results.Results`, or anything with ``table`` (with ``image_index``) and ``maps``):
    ``images`` ``(N, H, W, C)`` and ``masks`` ``(N, H, W)`` are the whole split's, indexed here by each row's
    ``image_index``. ``caption(row) -> str`` titles a panel (default: image id, class, ``c_IoU``)."""
    caption = caption or (lambda r: f"{r['image_id']} → {r['class']}\nc_IoU {r['c_IoU']:.2f}")
    index = rows.table["image_index"].to_numpy()
    titles = [caption(r) for r in rows.table.to_dict("records")]
    return plot_prediction_gallery(np.asarray(images)[index], rows.maps, np.asarray(masks)[index], titles, title, p=p,
                                   ncols=ncols)


def plot_results_rows(images: np.ndarray, masks: np.ndarray, rows: dict, title: str, caption=None, p: float = 5.0
                      ) -> plt.Figure:
    """:func:`plot_results_gallery` with one gallery row per entry of ``rows`` (name -> prediction rows with their
    maps, e.g. several methods' or models' :class:`~segx_helpers.workflows.results.Results` of the same predictions,
    all of the same length): each panel shows its row's image and mask, found by ``image_index`` in the whole split's
    ``images`` and ``masks``. ``caption(name, row) -> str`` titles a panel (default: name, image id, class, ``c_IoU``)."""
    caption = caption or (lambda name, r: f"{name}: {r['image_id']} → {r['class']}\nc_IoU {r['c_IoU']:.2f}")
    index = np.concatenate([res.table["image_index"].to_numpy() for res in rows.values()])
    maps = np.concatenate([res.maps for res in rows.values()])
    titles = [caption(name, r) for name, res in rows.items() for r in res.table.to_dict("records")]
    ncols = max(1, len(next(iter(rows.values()))))
    return plot_prediction_gallery(np.asarray(images)[index], maps, np.asarray(masks)[index], titles, title, p=p,
                                   ncols=ncols)


def plot_augmented_views(plain: dict, views: Sequence[dict], norm, title: str) -> plt.Figure:
    """A training image as stored, then augmented views of it, each with its mask outlined (yellow).
    ``plain`` and ``views``: items of a :class:`~segx_helpers.data.torch_dataset.SegXDataset` (``image``
    ``(C, H, W)`` normalised with ``norm``, ``mask`` ``(1, H, W)``); a one-channel image is shown in grey."""
    items = [plain, *views]
    fig, axes = plt.subplots(1, len(items), figsize=(13 * len(items) / 6, 2.6))
    for ax, item, label in zip(axes, items, ["as stored"] + [f"augmented {k + 1}" for k in range(len(views))]):
        picture = norm.denormalize(item["image"][None])[0]
        grey = picture.shape[-1] == 1
        ax.imshow(picture[..., 0] if grey else picture, cmap="gray" if grey else None)
        ax.contour(item["mask"][0].numpy(), levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    return fig


def plot_audit_maps(audit_out, rows: Sequence[dict], image_paths, title: str) -> plt.Figure:
    """Predictions of a ``segx audit`` run read back from its shards with numpy alone: per row of its table
    (``image_id``, ``class``, ``outcome``, ``c_IoU``, ``shard``, ``map_row``) the image (``image_paths``: image id ->
    file), the map with the predicted mask outlined, and the SegX map (map x mask)."""
    from PIL import Image

    fig, axes = plt.subplots(len(rows), 3, figsize=(10, 3.4 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        shard = np.load(Path(audit_out) / "shards" / f"shard-{row['shard']:05d}.npz")
        saliency = shard["maps"][row["map_row"]]
        mask = shard["predicted_masks"][shard["mask_row"][row["map_row"]]]
        picture = np.asarray(Image.open(image_paths[row["image_id"]]))
        for ax, shown, cmap in zip(ax_row, [picture, saliency, saliency * mask], ["gray", "magma", "magma"]):
            ax.imshow(shown, cmap=cmap)  # (an RGB image ignores the colour map)
            ax.axis("off")
        if mask.any():
            ax_row[1].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        ax_row[0].set_title(f"{row['image_id']}: {row['class']} ({row['outcome']})", fontsize=9)
        ax_row[1].set_title(f"Grad-CAM map, predicted mask; c_IoU {row['c_IoU']:.3f}", fontsize=9)
        ax_row[2].set_title("SegX map (map x mask)", fontsize=9)
    fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------ training with the mask (notebook 07)

def plot_fix_comparison(metrics: pd.DataFrame, names: Sequence[str], title: str, ncols: int = 4) -> plt.Figure:
    """One panel per metric in ``names``: each model's value with its 95 % CI (``metrics`` columns model,
    metric, value, ci_low, ci_high, as :func:`segx_helpers.studies.mask_training.compare_fixes` returns)."""
    names = [n for n in names if n in set(metrics["metric"])]
    models = list(dict.fromkeys(metrics["model"]))
    ncols = min(ncols, max(1, len(names)))
    nrows = int(np.ceil(len(names) / ncols)) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 0.42 * len(models) * nrows + 1.4 * nrows),
                             squeeze=False)
    colours = sns.color_palette("tab10", len(models))
    for ax, name in zip(axes.ravel(), names):
        rows = metrics[metrics["metric"] == name].set_index("model").reindex(models)
        y = np.arange(len(models))
        ax.errorbar(rows["value"], y, xerr=[rows["value"] - rows["ci_low"], rows["ci_high"] - rows["value"]],
                    fmt="none", ecolor="black", capsize=3)
        ax.scatter(rows["value"], y, c=colours, zorder=3)
        ax.set_yticks(y, models if ax in axes[:, 0] else [""] * len(models))
        ax.invert_yaxis()
        ax.set(title=name, xlabel="value [95 % CI]")
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_background_intervention(before: np.ndarray, after: np.ndarray, masks: np.ndarray,
                                 title: str = "Background intervention") -> plt.Figure:
    """Training images before (top row) and after (bottom row) the background intervention, with the
    clinical-interest mask outlined. ``before``/``after`` ``(N, H, W, C)`` in [0, 1], ``masks`` ``(N, H, W)``."""
    n = len(before)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for k in range(n):
        for row, images in enumerate((before, after)):
            axes[row, k].imshow(overlay(images[k], np.zeros(masks[k].shape), masks[k] >= 0.5, alpha=0.0))
            axes[row, k].set_xticks([])
            axes[row, k].set_yticks([])
    axes[0, 0].set_ylabel("as drawn", fontsize=9)
    axes[1, 0].set_ylabel("outside the mask\nreplaced", fontsize=9)
    fig.legend(handles=[plt.Line2D([], [], color=(0.0, 0.9, 1.0), label="clinical-interest mask (kept)")],
               loc="lower center", frameon=False, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG (creating folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------ from where to what (notebook 08)

def plot_cluster_choice(criteria: dict[str, pd.DataFrame], chosen: dict[str, int], title: str) -> plt.Figure:
    """One panel per clustering: its criterion against the number of clusters k, the chosen k marked. ``criteria``:
    name -> table with ``k`` and one criterion column (e.g. ``silhouette``, ``eigengap``, as
    :func:`segx_helpers.studies.reveal.cluster_descriptors` keeps them); ``chosen``: name -> k."""
    fig, axes = plt.subplots(1, len(criteria), figsize=(4.2 * len(criteria), 3.0), squeeze=False)
    for ax, (name, table) in zip(axes[0], criteria.items()):
        column = [c for c in table.columns if c not in ("k", "eigenvalue")][0]
        ax.plot(table["k"], table[column], marker="o", color="#4c72b0")
        best = table[table["k"] == chosen[name]]
        ax.scatter(best["k"], best[column], s=140, facecolors="none", edgecolors="#c44e52", linewidths=2,
                   label=f"chosen: k = {chosen[name]}", zorder=3)
        ax.set(title=name, xlabel="number of clusters k", ylabel=column)
        ax.set_xticks(table["k"])
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_cluster_crops(crops: np.ndarray, labels: np.ndarray, table: pd.DataFrame, title: str,
                       per_cluster: int = 8) -> plt.Figure:
    """A gallery row per cluster: the first ``per_cluster`` crops ``(M, s, s, C)`` in [0, 1] of its members (what each
    looked at off the region), titled with the row of ``table`` (:func:`segx_helpers.studies.reveal.cluster_table`:
    size, shortcut-driven share when known, mean confidence, the predicted class)."""
    labels = np.asarray(labels)
    clusters = table["cluster"].tolist()
    fig, axes = plt.subplots(len(clusters), per_cluster, figsize=(1.25 * per_cluster, 1.75 * len(clusters)),
                             squeeze=False)
    for ax_row, row in zip(axes, table.to_dict("records")):
        members = np.flatnonzero(labels == row["cluster"])[:per_cluster]
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        for ax, k in zip(ax_row, members):
            ax.imshow(_as_display(crops[k]), cmap="gray" if crops.shape[-1] == 1 else None)
        driven = (f", shortcut-driven {row['shortcut-driven share']:.0%}" if "shortcut-driven share" in row
                  and np.isfinite(row["shortcut-driven share"]) else "")
        label = ax_row[0].text(0.0, 1.04, f"cluster {row['cluster']}: {row['size']} predictions{driven}, mean "
                               f"confidence {row['mean confidence']:.2f}, predicted {row['predicted']}", fontsize=8,
                               transform=ax_row[0].transAxes, va="bottom")
        label.set_in_layout(False)  # it spans the row: a title would make tight_layout squeeze the first crop
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_region_intervention(before: np.ndarray, after: np.ndarray, regions: np.ndarray, masks: np.ndarray,
                             title: str) -> plt.Figure:
    """Training images before (top row, the discovered artefact region outlined in orange, the lesion in cyan) and
    after (bottom row) the region intervention. ``before``/``after`` ``(N, H, W, C)`` in [0, 1]; ``regions`` and
    ``masks`` bool ``(N, H, W)``."""
    n = len(before)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for k in range(n):
        for row, images in enumerate((before, after)):
            axes[row, k].imshow(overlay(images[k], np.zeros(masks[k].shape), masks[k] >= 0.5, alpha=0.0))
            _outline(axes[row, k], np.asarray(regions[k], bool), colour="#ff9f1c", width=1.5)
            axes[row, k].set_xticks([])
            axes[row, k].set_yticks([])
    axes[0, 0].set_ylabel("as drawn", fontsize=9)
    axes[1, 0].set_ylabel("regions swapped", fontsize=9)
    handles = [plt.Line2D([], [], color="#ff9f1c", label="where the discovered concept fires"),
               plt.Line2D([], [], color=(0.0, 0.9, 1.0), label="lesion (kept)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig
