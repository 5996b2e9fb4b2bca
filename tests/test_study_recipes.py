"""What notebooks 04, 05 and 07 read off the studies in one call: scores by annotated artefact within
lesion-size strata, the shortcut-driven examples at either end of the distance bins, the fix chosen per
method, the targets met, and the images every model's maps are compared on."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from segx_helpers.data import load_dataset
from segx_helpers.studies.mask_training import FixComparison, choose_per_method, shortcut_driven_examples, targets_met
from segx_helpers.studies.artefacts import pooled_differences, scores_by_artefact
from segx_helpers.studies.shortcut import DistanceBins, examples_by_distance
from segx_helpers.workflows.results import Results


def _with_artefacts(root, flags: dict[str, list[int]]) -> None:
    ids = load_dataset(root).table["image_id"]
    pd.DataFrame({"image_id": ids, **{k: [v[i % len(v)] for i in range(len(ids))] for k, v in flags.items()}}).to_csv(
        root / "artefacts.csv", index=False)


def test_scores_by_artefact_stacks_every_score_within_size_strata(make_tiny_dataset):
    root = make_tiny_dataset()
    _with_artefacts(root, {"ruler": [1, 0], "ink": [0, 0, 1]})
    data = load_dataset(root)
    test_ids = list(data.split("test")["image_id"])
    ruler = pd.read_csv(root / "artefacts.csv", dtype={"image_id": str}).set_index("image_id")["ruler"]
    table = pd.DataFrame({"image_id": test_ids, "c_IoU": 0.2 + 0.3 * ruler[test_ids].to_numpy(), "confidence": 0.9})
    out = scores_by_artefact(data, table, ["c_IoU", "confidence"], test_ids)
    assert set(out["score"]) == {"c_IoU", "confidence"} and set(out["artefact"]) == {"ruler", "ink"}
    assert out["stratum"].str.startswith(("small", "medium", "large", "all strata")).all()
    pooled = pooled_differences(out)
    assert list(pooled.index) == ["ink", "ruler"] and list(pooled.columns) == ["c_IoU", "confidence"]
    assert abs(pooled.loc["ruler", "c_IoU"] - 0.3) < 1e-9  # within every stratum the ruler adds 0.3
    assert pooled.loc["ruler", "confidence"] == 0.0


def test_scores_by_artefact_is_none_without_flags_or_with_twins(make_tiny_dataset):
    plain = make_tiny_dataset(name="plain")
    data = load_dataset(plain)
    ids = list(data.split("test")["image_id"])
    table = pd.DataFrame({"image_id": ids, "c_IoU": 0.5})
    assert scores_by_artefact(data, table, ["c_IoU"], ids) is None  # no artefacts.csv
    _with_artefacts(plain, {"patch": [1, 0]})
    flagged = load_dataset(plain)
    assert scores_by_artefact(flagged, table, ["c_IoU"], ids) is not None
    generator = {"shortcut_class": "a", "shortcut_artefact": "patch"}  # a synthetic set: its twins are the ground truth
    twins = dataclasses.replace(flagged, info=dataclasses.replace(flagged.info, generator=generator))
    assert scores_by_artefact(twins, table, ["c_IoU"], ids) is None


def test_examples_by_distance_take_driven_predictions_from_the_far_and_the_near_bin():
    distance = np.array([2.0, 30.0, 3.0, 35.0, 25.0, 5.0, 12.0, 40.0])
    driven = np.array([True, True, True, True, True, False, True, False])
    c_iou = np.array([0.5, 0.3, 0.9, 0.1, 0.2, 0.99, 0.0, 0.0])
    table = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)], "class": "x", "c_IoU": c_iou,
                          "distance_px": distance, "shortcut_driven": driven})
    maps = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), dtype=np.float32)
    examples = examples_by_distance(Results(table.drop(columns=["distance_px", "shortcut_driven"]), maps, maps), table,
                                    DistanceBins(cell_px=32), n=2)
    assert list(examples) == ["far from", "next to"]
    assert examples["far from"].table["image_id"].tolist() == ["i3", "i4"]  # 20+ px, lowest c_IoU first; i7 not driven
    assert examples["next to"].table["image_id"].tolist() == ["i2", "i0"]  # 0-8 px, highest first; i5 not driven
    assert examples["far from"].maps[:, 0, 0].tolist() == [3.0, 4.0]


def _comparison(predictions: dict, results: dict | None = None) -> FixComparison:
    return FixComparison(pd.DataFrame(), results or {}, predictions, pd.DataFrame(), {})


def test_choose_per_method_marks_the_lowest_criterion_of_each_fix():
    selection = pd.DataFrame({"model": ["control", "RRR λ=10", "RRR λ=100", "bg q=0.5", "bg q=1"],
                              "method": ["none", "rrr", "rrr", "background", "background"],
                              "criterion": [0.1, 0.9, 0.5, 0.7, 0.8], "chosen": [True, False, False, False, False]})
    chosen = choose_per_method(selection)
    assert chosen.loc[chosen["chosen"], "model"].tolist() == ["RRR λ=100", "bg q=0.5"]
    assert selection["chosen"].tolist()[0]  # the input is left as it was
    assert not choose_per_method(selection, methods=("other",))["chosen"].any()


def test_targets_met_needs_every_metric_of_a_model():
    targets = pd.DataFrame({"model": ["control (no fix)", "control (no fix)", "RRR", "RRR", "background"],
                            "met": [True, False, True, True, False]})
    assert targets_met(targets, {"control (no fix)": "control", "RRR": "rrr"}) == {
        "control": False, "rrr": True, "background": False}
    assert list(targets_met(targets)) == ["control (no fix)", "RRR", "background"]


def test_shortcut_driven_examples_prefer_the_baselines_shortcut_driven_images():
    rows = pd.DataFrame({"image_id": ["a", "b", "b", "c", "d"], "shortcut_driven": [False, True, True, False, True]})
    assert shortcut_driven_examples(_comparison({"baseline": rows}), n=4) == ["b", "d"]
    assert shortcut_driven_examples(_comparison({"baseline": rows}), n=1) == ["b"]
    table = pd.DataFrame({"image_id": ["a", "a", "b", "c"]})
    none = _comparison({"baseline": rows.assign(shortcut_driven=False)},
                       {"baseline": Results(table, np.zeros((4, 1, 1)), np.zeros((4, 1, 1)))})
    assert shortcut_driven_examples(none, n=2) == ["a", "b"]  # no shortcut-driven prediction: the first images
    real = _comparison({"baseline": rows.drop(columns="shortcut_driven")}, none.results)
    assert shortcut_driven_examples(real, n=4) == ["a", "b", "c"]  # real data has no twins
