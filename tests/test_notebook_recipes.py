"""What the notebooks call instead of computing by hand: notebook 05's analyses (segu_recipes), the split
helpers of explanation_recipes, notebook 06's folder, model and command helpers (modality_recipes), the
galleries of several result sets, and the settings and paths the notebooks share."""
from __future__ import annotations

import subprocess

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from segx_helpers.data import DatasetFormatError, load_dataset
from segx_helpers.data.torch_dataset import SegXDataset
from segx_helpers.models.checkpoints import TrainedModel, split_tensors
from segx_helpers.models.training import make_loader
from segx_helpers.explain.cams import CamOptions
from segx_helpers.scores.selective import separation_table
from segx_helpers.tutorial import viz
from segx_helpers.workflows.explanation_recipes import score_split, segmenter_masks
from segx_helpers.tutorial.modality_recipes import FAULTS, SmallCNN, auroc_validation, broken_copy, run_segx
from segx_helpers.workflows.results import Results, rows_for_images
from segx_helpers.tutorial.segu_recipes import (BASELINE, DISTANCE_COLUMNS, LOGISTIC, NO_TWINS, PRODUCT, SEGU,
                                                SeguTables, degraded_masks, distance_sections, mask_dependence,
                                                prediction_scores, segu_sections, segu_summary, selective_prediction,
                                                separation_by_variant, shortcut_dial, shortcut_ground_truth)
from segx_helpers.studies.shortcut import DistanceBins
from segx_helpers.workflows.report import distance_findings
from segx_helpers.workflows.settings import QUICK_MODE, TutorialPaths, with_image_size

matplotlib.use("Agg")
SIZE = 32


def _results(table: pd.DataFrame, maps: np.ndarray | None = None) -> Results:
    maps = np.zeros((len(table), SIZE, SIZE), dtype=np.float32) if maps is None else maps
    return Results(table, maps, maps.copy())


def _rows(n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Prediction rows whose c_IoU is high exactly for the correct predictions, confidence is noise."""
    rng = np.random.default_rng(seed)
    correct = np.arange(n) % 3 != 0
    return pd.DataFrame({"image_id": [f"i{k:02d}" for k in range(n)], "class": "a", "image_index": np.arange(n),
                         "confidence": rng.uniform(0.4, 1.0, n), "correct": correct,
                         "c_IoU": np.where(correct, rng.uniform(0.5, 0.9, n), rng.uniform(0.0, 0.2, n))})


# ------------------------------------------------------------------------------ notebook 05 (segu_recipes)

def test_prediction_scores_stack_the_methods_in_order():
    a, b = _rows(4), _rows(3, seed=1)
    scores = prediction_scores({"gradcam": _results(a.assign(method="gradcam")),
                                "gradient_shap": _results(b.assign(method="gradient_shap"))})
    assert scores["confidence"].tolist() == a["confidence"].tolist() + b["confidence"].tolist()
    assert scores["method"].tolist() == ["gradcam"] * 4 + ["gradient_shap"] * 3 and list(scores.index) == list(range(7))


def test_separation_by_variant_gives_one_row_per_table_and_the_confidence_baseline():
    good = _rows()
    reversed_ = good.assign(c_IoU=1 - good["c_IoU"])
    table = separation_by_variant({"good": good, "reversed": reversed_}, label="masks", baseline=good, n_resamples=50)
    assert table["masks"].tolist() == ["good", "reversed", BASELINE]
    assert table["certainty"].tolist() == ["c_IoU", "c_IoU", "confidence"]
    assert table.loc[0, "auroc"] == 1.0 and table.loc[1, "auroc"] == 0.0  # a low c_IoU flags exactly the errors
    expected = separation_table(good, ["confidence"], n_resamples=50)
    assert table.loc[2, "auroc"] == expected.loc[0, "auroc"]
    assert "variant" in separation_by_variant({"good": good}, n_resamples=10)


def test_degraded_masks_shift_and_dilate_the_predicted_masks():
    predicted = np.zeros((2, SIZE, SIZE), dtype=bool)
    predicted[:, 4:8, 4:8] = True
    truth = ~predicted
    sources = degraded_masks(predicted, truth, dilation_px=2)
    assert list(sources) == ["predicted (U-Net)", "ground truth", "shifted by 1/2 image", "dilated by 2 px"]
    assert sources["ground truth"] is truth and sources["predicted (U-Net)"] is predicted
    assert sources["shifted by 1/2 image"][:, 20:24, 20:24].all() and sources["shifted by 1/2 image"].sum() == predicted.sum()
    dilated = sources["dilated by 2 px"]
    assert (dilated >= predicted).all() and dilated.sum() > predicted.sum() and dilated[0, 2, 6] and not dilated[0, 12, 6]


def test_mask_dependence_recomputes_c_iou_against_each_mask_source():
    """Correct predictions look inside the square, wrong ones outside: the right masks separate them perfectly,
    the masks shifted by half the image reverse the picture."""
    table = _rows(12)
    square = np.zeros((1, SIZE, SIZE), dtype=bool)
    square[0, 4:12, 4:12] = True
    maps = np.zeros((len(table), SIZE, SIZE), dtype=np.float32)
    maps[table["correct"].to_numpy(), 5:11, 5:11] = 1.0
    maps[~table["correct"].to_numpy(), 20:26, 20:26] = 1.0
    results = _results(table.assign(image_index=0), maps)
    out = mask_dependence(results, degraded_masks(square, square, dilation_px=1), p=5.0, n_resamples=20)
    assert out["masks"].tolist() == ["predicted (U-Net)", "ground truth", "shifted by 1/2 image", "dilated by 1 px"]
    auroc = out.set_index("masks")["auroc"]
    assert auroc["predicted (U-Net)"] == 1.0 and auroc["ground truth"] == 1.0 and auroc["shifted by 1/2 image"] == 0.0


def test_selective_prediction_fits_the_combination_on_validation_only_when_it_can(capsys):
    test = _rows(60)
    val = _rows(30, seed=2)
    with_fit = selective_prediction(test, val)
    assert list(with_fit.curves) == ["confidence", SEGU, PRODUCT, LOGISTIC] and with_fit.combined == LOGISTIC
    assert with_fit.table.loc[SEGU, "AURC"] < with_fit.table.loc["confidence", "AURC"]  # c_IoU ranks the errors last
    coverage, risk, area = with_fit.curves[SEGU]
    assert coverage[-1] == 1.0 and risk[-1] == pytest.approx((~test["correct"]).mean()) and area == with_fit.table.loc[SEGU, "AURC"]
    assert set(with_fit.entry("AUGRC")) == {"confidence", "segu", "combined"}
    assert capsys.readouterr().out == ""
    too_few = selective_prediction(test, val.assign(correct=True))
    assert too_few.combined == PRODUCT and LOGISTIC not in too_few.certainty
    assert "Validation has 0 wrong predictions" in capsys.readouterr().out
    assert too_few.entry("AURC")["combined"] == too_few.table.loc[PRODUCT, "AURC"]


def test_segu_summaries_take_their_numbers_from_the_tables():
    scores = pd.concat([_rows().assign(method="gradcam"), _rows(seed=3).assign(method="gradient_shap")],
                       ignore_index=True).assign(c_AUITC=lambda t: t["c_IoU"])
    stats = separation_table(scores, ["c_IoU", "c_AUITC", "confidence"], group="method", n_resamples=20)
    ground_truth = stats.assign(auroc=0.25)
    selective = selective_prediction(_rows(30), _rows(30, seed=4))
    sections = segu_sections(stats, ground_truth, ["gradcam", "gradient_shap"], selective)
    assert list(sections) == ["segu", "confidence", "aurc", "augrc"]
    entry = sections["segu"]["gradient_shap"]["c_iou"]
    row = stats[(stats["group"] == "gradient_shap") & (stats["certainty"] == "c_IoU")].iloc[0]
    assert entry["auroc_incorrect"] == row["auroc"] == 1.0 and entry["auroc_shortcut"] == 0.25
    assert entry["auroc_incorrect_ci"] == [row["auroc_low"], row["auroc_high"]]
    assert sections["confidence"]["auroc_incorrect"] == stats.iloc[2]["auroc"]
    assert sections["aurc"]["segu"] == selective.curves[SEGU][2]
    assert segu_sections(stats, None, ["gradcam"], selective)["confidence"]["auroc_shortcut"] is None
    by_class = pd.DataFrame([{"group": "gradcam", "certainty": "predicted class", "auroc": 0.8, "auroc_low": 0.7,
                              "auroc_high": 0.9}])
    with_class = segu_sections(stats, pd.concat([ground_truth, by_class]), ["gradcam"], selective)
    assert with_class["predicted_class"] == {"auroc_shortcut": 0.8, "auroc_shortcut_ci": [0.7, 0.9]}
    no_twins = segu_sections(stats, ground_truth.iloc[:0], ["gradcam"], selective)  # an empty ground truth: no twins
    assert no_twins["segu"]["gradcam"]["c_iou"]["auroc_shortcut"] is None and no_twins["segu"]["gradcam"]["c_iou"]["auroc_shortcut_ci"] is None

    table4 = (scores.assign(prediction=np.where(scores["correct"], "correct", "incorrect"))
              .pivot_table(index="method", columns="prediction", values=["c_IoU"], aggfunc="mean"))
    ablation = separation_by_variant({"x": _rows()}, n_resamples=10)
    dependence = separation_by_variant({"y": _rows()}, label="masks", n_resamples=10)
    tables = SeguTables(table4=table4, separation=stats, by_error_type=stats.assign(errors="all errors"),
                        selective=selective, ablation_method=ablation, ablation_masks=dependence)
    summary = segu_summary("d", True, 5.0, tables)
    assert summary["segu_means"]["gradcam c_IoU correct"] == pytest.approx(scores.query("method == 'gradcam' and correct")["c_IoU"].mean())
    assert summary["aurc"] == {name: c[2] for name, c in selective.curves.items()}
    assert summary["ablation_masks"][0]["masks"] == "y" and len(summary["separation"]) == 6

    by_distance = {"last block": pd.DataFrame({"bin": ["near"], "n": [3]}),
                   "block before": pd.DataFrame({"bin": ["near"], "n": [4]})}
    sections = distance_sections(by_distance, {"last block": pd.DataFrame({"bin": ["near"], "n": [1]})})
    assert [sections[k][0]["n"] for k in ("shortcut_by_distance", "shortcut_by_distance_block_before",
                                          "shortcut_by_distance_patch_present")] == [3, 4, 1]
    assert distance_sections({}, {}) == {}


def test_the_shortcut_dial_bins_the_predicted_class_for_every_layer(tmp_path):
    """The predicted class alone is a score of the prediction, not of the map: the block before's rows take it (and
    confidence) from the first layer's, matched by image and class, and both layers bin it."""
    from segx_helpers.data.synthetic import SyntheticConfig, generate_synthetic_derm
    from segx_helpers.tutorial.segu_recipes import ShortcutGroundTruth

    data = load_dataset(generate_synthetic_derm(tmp_path / "derm", SyntheticConfig(n_images=60, image_size=32),
                                                progress=False))
    rows = _rows(60).assign(image_id=[f"derm_{k:05d}" for k in range(60)], method="gradcam", patch=True,
                            c_AUITC=lambda t: t["c_IoU"], shortcut_driven=np.arange(60) % 2 == 0)
    rows["predicted class"] = np.where(rows["shortcut_driven"], 0.2, 0.8)
    truth = ShortcutGroundTruth(rows, pd.DataFrame(), pd.DataFrame())
    before = rows[["image_id", "class", "image_index", "correct", "c_IoU", "c_AUITC", "confidence"]]
    layers = {"last block": _results(rows), "block before": _results(before.assign(confidence=-1.0))}
    dial = shortcut_dial(truth, layers, DistanceBins(cell_px=8), data, SIZE, n_resamples=10)
    merged = dial.predictions["block before"].set_index("image_id")
    assert (merged["predicted class"] == rows.set_index("image_id")["predicted class"]).all()
    assert (merged["confidence"] == rows.set_index("image_id")["confidence"]).all()  # the prediction's, not the layer's
    table = dial.table()
    assert list(table) == DISTANCE_COLUMNS and (table["predicted_class_auroc"].dropna() == 1.0).all()
    assert table["predicted_class_auroc"].notna().sum() >= 2  # both layers, in every bin with both outcomes


def test_without_counterfactual_twins_the_synthetic_only_sections_are_empty_and_say_so(make_tiny_dataset, capsys):
    """Notebook 05's sections 5 and 6 run straight through on a dataset without twins (real data): no ``if`` in the
    notebook, empty tables, figures and a paragraph that say there is nothing to show, nothing for summary.json."""
    data = load_dataset(make_tiny_dataset())
    scores = _rows().assign(method="gradcam", image_id="img_000", **{"class": "a", "patch": False})
    truth = shortcut_ground_truth(None, data, scores, ["c_IoU", "confidence"], n_resamples=10)
    assert NO_TWINS in capsys.readouterr().out
    assert truth.scores.empty and "shortcut_driven" in truth.scores and truth.rates.empty
    assert truth.separation.empty and {"group", "certainty", "n_incorrect", "auroc"} <= set(truth.separation)
    layers = {"last block": Results(scores, np.zeros((len(scores), 4, 4)), np.zeros((len(scores), 4, 4)))}
    dial = shortcut_dial(truth, layers, DistanceBins(cell_px=8), data, 32)
    assert dial.by_distance == {} and dial.present == {} and dial.examples == {}
    assert dial.table().empty and list(dial.table(patch_present=True)) == DISTANCE_COLUMNS and dial.table4().empty
    assert distance_sections(dial.by_distance, dial.present) == {}
    assert "no counterfactual twins" in distance_findings(dial.by_distance)
    for fig in (viz.plot_auroc_by_distance(dial.by_distance, "by distance"),
                viz.plot_certainty_by_outcome(truth.scores, "artefact mass", "mass", outcome="shortcut_driven")):
        assert "Nothing to plot" in " ".join(text.get_text() for text in fig.axes[0].texts)
        plt.close(fig)


# ------------------------------------------------------------------------------ galleries and rows of results

def test_rows_for_images_takes_each_images_first_row_in_the_order_asked():
    table = pd.DataFrame({"image_id": ["a", "b", "b", "c"], "class": ["x", "x", "y", "x"], "image_index": [0, 1, 1, 2]})
    maps = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), dtype=np.float32)
    picked = rows_for_images(Results(table, maps, maps), ["c", "b"])
    assert picked.table[["image_id", "class"]].values.tolist() == [["c", "x"], ["b", "x"]]
    assert picked.maps[:, 0, 0].tolist() == [3.0, 1.0]
    with pytest.raises(KeyError, match="z"):
        rows_for_images(Results(table, maps, maps), ["a", "z"])


def test_plot_results_rows_draws_one_gallery_row_per_result_set_with_its_own_images():
    images = np.stack([np.full((SIZE, SIZE, 3), v, dtype=np.float32) for v in (0.0, 0.5, 1.0)])
    masks = np.zeros((3, SIZE, SIZE), dtype=bool)
    table = pd.DataFrame({"image_id": ["a", "c"], "class": ["x", "y"], "image_index": [0, 2], "c_IoU": [0.1, 0.2],
                          "correct": [True, False]})
    rows = {"first": _results(table), "second": _results(table)}
    fig = viz.plot_results_rows(images, masks, rows, "title")
    drawn = [ax for ax in fig.axes if ax.get_images()]
    assert len(drawn) == 4 and [ax.get_title() for ax in drawn][:2] == ["first: a → x\nc_IoU 0.10", "first: c → y\nc_IoU 0.20"]
    red = [int(ax.get_images()[0].get_array()[..., 0].max()) for ax in drawn]
    assert drawn[2].get_title().startswith("second: a") and red == [0, 127, 0, 127]  # images 0 and 2, half-blended
    fig = viz.plot_results_rows(images, masks, rows, "t", caption=lambda name, r: f"{name}/{r['correct']}")
    assert [ax.get_title() for ax in fig.axes if ax.get_images()][3] == "second/False"


def test_a_gallerys_two_line_titles_do_not_cover_the_images_of_the_row_above():
    """Notebook 05's least-certain gallery titles each panel with two lines; they must sit below the images above."""
    rng = np.random.default_rng(0)
    n = 8
    fig = viz.plot_prediction_gallery(rng.random((n, SIZE, SIZE, 3)), rng.random((n, SIZE, SIZE)),
                                      np.zeros((n, SIZE, SIZE)), ["derm_00292: melanoma\nINCORRECT, c_IoU 0.00, patch"] * n,
                                      "title")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    first, second = fig.axes[:4], fig.axes[4:8]
    lowest_image = min(ax.get_window_extent(renderer).y0 for ax in first)
    highest_title = max(ax.title.get_window_extent(renderer).y1 for ax in second)
    assert highest_title <= lowest_image
    plt.close(fig)


def test_cluster_crops_label_each_row_without_squeezing_the_layout_or_covering_the_row_above():
    """Notebook 08's crops: each row's label spans the row; as an axes title it made tight_layout give up (a warning
    in every run of notebook 08) and squeeze the first crop."""
    import warnings

    labels = np.repeat([0, 1, 2], 8)
    table = pd.DataFrame({"cluster": [0, 1, 2], "size": [8, 8, 8], "mean confidence": [0.9, 0.8, 0.7],
                          "predicted": ["benign (96%)", "malignant (100%)", "benign (94%)"],
                          "shortcut-driven share": [0.9, 0.1, 0.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" fails here
        fig = viz.plot_cluster_crops(np.random.default_rng(0).random((24, 40, 40, 3)), labels, table, "crops")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    rows = np.array(fig.axes).reshape(3, 8)
    widths = [ax.get_window_extent(renderer).width for ax in rows[:, 0]] + [rows[0, 1].get_window_extent(renderer).width]
    assert max(widths) - min(widths) < 1  # the first crop as wide as the others
    for above, row in zip(rows[:-1], rows[1:]):
        label = row[0].texts[0]
        assert label.get_text().startswith("cluster ")
        assert label.get_window_extent(renderer).y1 <= above[0].get_window_extent(renderer).y0
        assert label.get_window_extent(renderer).y0 >= row[0].get_window_extent(renderer).y1
    plt.close(fig)


def test_plot_audit_maps_reads_each_rows_map_and_mask_from_its_shard(tmp_path):
    from PIL import Image

    (tmp_path / "shards").mkdir()
    maps = np.zeros((2, 8, 8), dtype=np.float32)
    maps[1, 2:4, 2:4] = 1.0
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2:6, 2:6] = True
    np.savez(tmp_path / "shards" / "shard-00003.npz", maps=maps, predicted_masks=masks, mask_row=np.array([0, 0]))
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "img.png")
    row = pd.Series({"image_id": "img", "class": "x", "outcome": "TP", "c_IoU": 0.25, "shard": 3, "map_row": 1})
    fig = viz.plot_audit_maps(tmp_path, [row], {"img": tmp_path / "img.png"}, "audit")
    axes = fig.axes
    assert axes[0].get_title() == "img: x (TP)" and "c_IoU 0.250" in axes[1].get_title()
    assert axes[1].get_images()[0].get_array().sum() == 4 and axes[2].get_images()[0].get_array().sum() == 4
    assert axes[1].collections  # the predicted mask outlined


def test_plot_augmented_views_shows_the_stored_image_then_each_view(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(channels=1))
    train = SegXDataset(data, "train", SIZE, train=True)
    fig = viz.plot_augmented_views(SegXDataset(data, "train", SIZE)[0], [train[0], train[0]], train.normalization, "aug")
    assert [ax.get_title() for ax in fig.axes] == ["as stored", "augmented 1", "augmented 2"]
    assert fig.axes[0].get_images()[0].get_array().ndim == 2  # one channel: shown in grey


# ------------------------------------------------------------------------------ explanation_recipes

class _Constant(nn.Module):
    """A 'segmenter' whose foreground logit is ``bias`` everywhere."""

    def __init__(self, bias: float):
        super().__init__()
        self.bias = bias

    def forward(self, x):
        return torch.full((len(x), 1, *x.shape[2:]), self.bias)


def _meta(**extra) -> dict:
    return {"image_size": SIZE, "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, **extra}


def test_segmenter_masks_binarise_with_the_segmenters_threshold(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset())
    n_test = len(data.split("test"))
    low = segmenter_masks(TrainedModel(_Constant(0.0), _meta(threshold=0.4), None), data, "test", 16)
    high = segmenter_masks(TrainedModel(_Constant(0.0), _meta(threshold=0.6), None), data, "test", 16)
    assert low.shape == (n_test, 16, 16) and low.dtype == bool and low.all() and not high.any()


def test_score_split_explains_and_scores_every_prediction_of_the_split(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset())
    torch.manual_seed(0)
    model = SmallCNN(3, 3).eval()
    classifier = TrainedModel(model, _meta(task="multiclass"), None)
    tensors = split_tensors(data, "test", classifier.meta)
    n = len(tensors["image_id"])
    everywhere, nowhere = np.ones((n, SIZE, SIZE), dtype=bool), np.zeros((n, SIZE, SIZE), dtype=bool)
    full = score_split(classifier, data, tensors, "gradcam", everywhere, options=CamOptions(target_layers=[model.features[-1]]))
    assert full.table["image_id"].tolist() == list(tensors["image_id"]) and full.maps.shape == (n, SIZE, SIZE)
    assert full.table["correct"].dtype == bool and set(full.table["class"]) <= {"a", "b", "c"}
    assert np.allclose(full.table["c_IoU"], 0.05, atol=0.01)  # the top 5 % over a mask covering everything
    with pytest.warns(Warning, match="empty predicted mask"):
        empty = score_split(classifier, data, tensors, "gradcam", nowhere, options=CamOptions(target_layers=[model.features[-1]]))
    assert (empty.table["c_IoU"] == 0).all() and np.allclose(empty.maps, full.maps)
    finer = score_split(classifier, data, tensors, "gradcam", everywhere, options=CamOptions(target_layers=[model.features[10]]))
    assert not np.allclose(finer.maps, full.maps)  # the options reach explain


# ------------------------------------------------------------------------------ notebook 06 (modality_recipes)

@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_broken_copy_breaks_a_copy_and_the_validator_names_the_file(make_tiny_dataset, tmp_path, task):
    source = make_tiny_dataset(name=f"ok-{task}", task=task)
    messages = {"missing_image": "img_", "wrong_mask_size": ".png", "class_typo": "labels.csv"}
    for fault in FAULTS:
        target = broken_copy(source, tmp_path / f"broken_{fault}", fault)
        if fault == "grey_mask":
            with pytest.warns(UserWarning):
                load_dataset(target)
        else:
            with pytest.raises(DatasetFormatError, match=messages[fault]):
                load_dataset(target)
    load_dataset(source)  # the original is untouched
    (tmp_path / "broken_missing_image" / "marker").write_text("old copy")
    broken_copy(source, tmp_path / "broken_missing_image", "class_typo")  # replaces an earlier copy
    assert not (tmp_path / "broken_missing_image" / "marker").exists()
    with pytest.raises(ValueError, match="unknown fault"):
        broken_copy(source, tmp_path / "x", "typo")


def test_small_cnn_and_its_validation_metric(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(channels=1))
    torch.manual_seed(0)
    model = SmallCNN(1, 3)
    assert model(torch.zeros(2, 1, SIZE, SIZE)).shape == (2, 3) and isinstance(model.features[-1], nn.ReLU)
    validate = auroc_validation(make_loader(SegXDataset(data, "val", SIZE), 8, shuffle=False), "multiclass")
    result = validate(model)
    assert list(result) == ["val_auroc"] and 0.0 <= result["val_auroc"] <= 1.0


def test_run_segx_prints_the_command_relative_to_root_and_raises_on_failure(tmp_path, capsys):
    with pytest.raises(subprocess.CalledProcessError):
        run_segx("audit", "--data", tmp_path / "data" / "x", "--p", 5.0, root=tmp_path)
    out = capsys.readouterr().out
    assert out.startswith("$ segx audit --data data/x --p 5.0\n") and "error" in out.lower()


# ------------------------------------------------------------------------------ settings and paths

def test_with_image_size_changes_the_classifiers_size_and_caps_the_segmenters():
    assert with_image_size(QUICK_MODE, None) is QUICK_MODE
    small = with_image_size(QUICK_MODE, 32)
    assert (small.image_size, small.seg_image_size) == (32, 32) and small.cls_epochs == QUICK_MODE.cls_epochs
    large = with_image_size(QUICK_MODE, 256)
    assert (large.image_size, large.seg_image_size) == (256, QUICK_MODE.seg_image_size)
    with pytest.raises(ValueError, match="multiple of 32"):
        with_image_size(QUICK_MODE, 100)


def test_tutorial_paths_keep_checkpoints_and_fixes_under_artifacts(tmp_path):
    paths = TutorialPaths.at(tmp_path)
    assert paths.artifacts("d") == tmp_path.resolve() / "artifacts" / "d"
    assert paths.fixes("d") == paths.artifacts("d") / "fix"
    assert paths.segmenter("d").parent == paths.classifier("d").parent == paths.artifacts("d")

