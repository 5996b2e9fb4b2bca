"""From where to what (issue 34, notebook 08): collecting the off-region evidence of low-SegU predictions,
describing, clustering and naming it, the label-free concept detector, and the region intervention."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from segx_helpers.data.format import load_dataset
from segx_helpers.data.synthetic import SyntheticConfig, artefact_masks, generate_synthetic_derm
from segx_helpers.models.checkpoints import TrainedModel, split_tensors
from segx_helpers.models.networks import build_classifier
from segx_helpers.models.training import TrainConfig
from segx_helpers.studies.mask_training import (MaskFix, NewClassifier, RegionDataset, RegionIntervention, swap_regions,
                                                train_with_mask)
from segx_helpers.studies.reveal import (Concept, OffRegion, RevealOptions, artefact_hits, best_match,
                                         cluster_descriptors, cluster_table, concept_cells, concept_detector,
                                         flag_auroc, lowest, off_region_maps, peak_crops, reveal_study,
                                         what_descriptors, where_descriptors)
from segx_helpers.workflows.results import Results


def test_off_region_maps_keep_only_what_lies_outside_the_mask():
    maps = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    masks = np.zeros((2, 4, 4), bool)
    masks[:, 1:3, 1:3] = True
    off = off_region_maps(maps, masks)
    assert (off[masks] == 0).all() and (off[~masks] == maps[~masks]).all()
    with pytest.raises(ValueError, match="same shape"):
        off_region_maps(maps, masks[:1])


def test_lowest_takes_the_share_with_the_lowest_score_lowest_first():
    table = pd.DataFrame({"c_IoU": [0.5, 0.1, 0.3, 0.0, 0.9, 0.2]})
    assert lowest(table, "c_IoU", 0.5).tolist() == [3, 1, 5]
    assert lowest(table, "c_IoU", 0.01).tolist() == [3]  # at least one
    with pytest.raises(KeyError, match="c_AUITC"):
        lowest(table, "c_AUITC", 0.5)


def test_what_pools_the_features_under_the_off_region_top_and_where_downsamples_the_map():
    features = np.zeros((2, 3, 2, 2), np.float32)
    features[0, 0] = 1.0                    # image 0: channel 0 everywhere ...
    features[0, :, 1, 1] = [0.0, 0.0, 5.0]  # ... but channel 2 in its bottom-right cell
    features[1, 1] = 2.0
    top = np.zeros((3, 8, 8), bool)
    top[0, 5:7, 5:7] = True  # inside image 0's bottom-right cell
    top[1, 0:2, 0:2] = True  # image 0's top-left cell
    what = what_descriptors(features, top, np.array([0, 0, 1]))  # row 2 has no top pixels: its image's mean
    np.testing.assert_allclose(what[0], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(what[1], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(what[2], [0, 1, 0], atol=1e-6)
    off = np.zeros((1, 8, 8), np.float32)
    off[0, :4, :4] = 2.0
    off[0, 4:, 4:] = 1.0
    np.testing.assert_allclose(where_descriptors(off, grid=2), [[1.0, 0.0, 0.0, 0.5]])


def _blobs(n: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    truth = np.repeat(np.arange(3), n)
    return (centres[truth] + rng.normal(0, 0.3, (3 * n, 3))).astype(np.float32), truth


@pytest.mark.parametrize("method, criterion", [("kmeans", "silhouette"), ("spectral", "eigengap")])
def test_clustering_finds_the_number_of_well_separated_groups_by_its_criterion(method, criterion):
    points, truth = _blobs()
    found = cluster_descriptors(points, method, max_clusters=6)
    assert found.k == 3 and found.criterion_name == criterion and list(found.criterion["k"]) == [2, 3, 4, 5, 6]
    assert pd.crosstab(found.labels, truth).gt(0).sum(axis=1).eq(1).all()  # every cluster holds one group
    assert cluster_descriptors(points, method, k=2).k == 2
    with pytest.raises(ValueError, match="at least 3"):
        cluster_descriptors(points[:2], method)


def test_naming_counts_hits_per_cluster_and_scores_the_best_match():
    top = np.zeros((4, 4, 4), bool)
    top[:, 0, 0] = True
    patch = np.zeros((4, 4, 4), bool)
    patch[[0, 1, 2], 0, 0] = True
    hits = artefact_hits(top, {"patch": patch, "ruler": np.zeros_like(patch)})
    assert hits["patch"].tolist() == [True, True, True, False] and not hits["ruler"].any()
    near = np.zeros((4, 4, 4), bool)
    near[3, 0, 2] = True  # prediction 3's artefact lies 2 px from its top pixel
    assert artefact_hits(top, {"near": near}, tolerance_px=1.5)["near"].tolist() == [False] * 4
    assert artefact_hits(top, {"near": near}, tolerance_px=2.0)["near"].tolist() == [False, False, False, True]
    labels = np.array([0, 0, 1, 1])
    rows = pd.DataFrame({"class": ["a", "a", "b", "b"], "confidence": [0.9, 0.7, 0.6, 0.8],
                         "shortcut_driven": [True, True, False, False]})
    table = cluster_table(rows, labels, hits)
    assert table["size"].tolist() == [2, 2] and table["on patch"].tolist() == [1.0, 0.5]
    assert table["mean confidence"].tolist() == pytest.approx([0.8, 0.7])
    assert table["shortcut-driven share"].tolist() == [1.0, 0.0] and table["predicted"][0] == "a (100%)"
    best = best_match(labels, hits["patch"].to_numpy())
    assert best["cluster"] == 0 and best["purity"] == 1.0 and best["recall"] == pytest.approx(2 / 3)
    assert np.isnan(best_match(labels, np.zeros(4, bool))["purity"])


def test_flag_auroc_beats_random_clusters_only_for_a_flag_the_clusters_follow():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    flags = pd.DataFrame({"ruler": labels == 1, "ink": rng.random(60) < 0.4, "never": np.zeros(60, bool)})
    table = flag_auroc(labels, flags, n_random=100).set_index("artefact")
    assert table.loc["ruler", "AUROC"] == 1.0 and table.loc["ruler", "cluster"] == 1 and table.loc["ruler", "above random"]
    assert table.loc["ruler", "random AUROC"] < 0.75
    assert not table.loc["ink", "above random"]
    assert np.isnan(table.loc["never", "AUROC"]) and table.loc["never", "with"] == 0
    from sklearn.metrics import roc_auc_score

    ink = flags["ink"].to_numpy()
    assert table.loc["ink", "AUROC"] == pytest.approx(max(roc_auc_score(ink, labels == c) for c in range(3)))


def test_flag_auroc_sets_the_clusters_beside_what_the_predicted_class_alone_says():
    """A classifier that learnt an artefact calls its images one class: clusters that only split the predicted classes
    name that artefact no better than the prediction does, and the table must say so."""
    rng = np.random.default_rng(0)
    predicted = np.repeat(["malignant", "benign"], 30)
    labels = np.repeat([0, 1, 2], 20)                    # cluster 0 inside the malignant calls, 2 inside the benign
    flags = pd.DataFrame({"ruler": predicted == "malignant", "patch": labels == 2, "ink": rng.random(60) < 0.4})
    table = flag_auroc(labels, flags, n_random=50, predicted=predicted).set_index("artefact")
    assert table.loc["ruler", "predicted class AUROC"] == 1.0 and not table.loc["ruler", "beyond predicted class"]
    assert table.loc["ruler", "above random"]             # above random clusters, yet nothing the prediction lacks
    assert table.loc["patch", "AUROC"] == 1.0
    assert table.loc["patch", "predicted class AUROC"] == 0.875   # benign calls: (1 + 20/20 - 10/40) / 2
    assert table.loc["patch", "beyond predicted class"]
    assert "predicted class AUROC" not in flag_auroc(labels, flags, n_random=5).columns  # only when given


def test_concept_detector_fires_on_the_cells_like_its_cluster_without_labels():
    centroid = np.array([0.0, 0.0, 1.0], np.float32)
    features = np.zeros((3, 3, 4, 4), np.float32)
    features[:, 0] = 1.0                          # ordinary surroundings
    features[0, :, 1, 1] = [0.1, 0.0, 1.0]         # the concept in image 0's cell (1, 1)
    features[1, :, 2, 2] = [0.5, 0.0, 1.0]         # a weaker form of it in image 1's cell (2, 2)
    collected = OffRegion(pd.DataFrame({"image_index": [0, 1, 2]}), np.zeros((3, 8, 8)), np.zeros((3, 8, 8), bool))
    collected.top[0, 2:4, 2:4] = True              # predictions 0 and 1 looked at the concept ...
    collected.top[1, 4:6, 4:6] = True
    collected.top[2, 0:2, 0:2] = True              # ... prediction 2 at plain surroundings
    descriptors = np.array([[0.1, 0, 1.0], [0.5, 0, 1.0], [1.0, 0, 0.05]], np.float32)
    concept = concept_detector(features, collected, np.array([0, 0, 1]), 0, descriptors)
    seen = [np.dot(v, concept.centroid) / np.linalg.norm(v) for v in ([0.1, 0, 1.0], [0.5, 0, 1.0])]
    assert concept.threshold == pytest.approx(np.percentile(seen, 25), abs=1e-6)  # the members' lower quartile
    cells = concept_cells(features, concept, grow=0)
    assert cells[0 if seen[0] > seen[1] else 1].sum() == 1 and cells.sum() == 1  # the clearer one only
    grown = concept_cells(features, Concept(0, concept.centroid, min(seen) - 1e-4), grow=1)
    assert cells_fired(grown[0]) == 9 and cells_fired(grown[1]) == 9 and not grown[2].any()  # 3 x 3 around each
    assert not concept_cells(features, Concept(0, centroid, 1.1)).any()


def cells_fired(grid: np.ndarray) -> int:
    return int(np.asarray(grid).sum())


def test_peak_crops_centre_on_the_off_region_peak_and_stay_inside_the_image():
    images = np.zeros((1, 32, 32, 3), np.float32)
    images[0, 20, 10] = 1.0
    off = np.zeros((2, 32, 32), np.float32)
    off[0, 20, 10] = 1.0
    off[1, 0, 31] = 1.0
    crops = peak_crops(images, off, np.array([0, 0]), size=8)
    assert crops.shape == (2, 8, 8, 3) and crops[0, 4, 4].sum() == 3.0 and crops[1].sum() == 0


def test_swap_regions_moves_the_artefact_between_images_and_keeps_the_lesion():
    images = torch.stack([torch.full((1, 4, 4), float(v)) for v in range(3)])
    regions = torch.zeros(3, 1, 4, 4)
    regions[0, :, 0, 0] = 1  # image 0's artefact, top-left
    keep = torch.zeros(3, 1, 4, 4)
    keep[:, :, 2:, 2:] = 1
    regions[1, :, 3, 3] = 1  # image 1's artefact lies on what must be kept
    out = swap_regions(images, regions, 1.0, torch.Generator().manual_seed(0), keep=keep)
    changed = out != images
    assert changed[:, :, 2:, 2:].sum() == 0  # the lesion is never touched
    for k in range(3):
        donor_value = out[k][changed[k]]
        assert (donor_value != k).all()  # replaced by another image's pixels
    assert changed[:, :, 0, 0].sum() == 2  # image 0's artefact left it, and went to the image it donates to
    assert torch.equal(swap_regions(images, regions, 0.0, torch.Generator().manual_seed(0)), images)
    assert torch.equal(swap_regions(images[:1], regions[:1], 1.0), images[:1])
    with pytest.raises(ValueError, match="do not match"):
        swap_regions(images, regions[:2], 1.0)


def _tiny_derm(tmp_path, n=40, size=64):
    config = SyntheticConfig(n_images=n, image_size=size, seed=3, split_fractions=(0.5, 0.1, 0.4))
    return load_dataset(generate_synthetic_derm(tmp_path / "derm", config, progress=False))


def test_region_dataset_augments_the_region_with_the_image_and_the_intervention_uses_it(tmp_path):
    data = _tiny_derm(tmp_path)
    ids = list(data.split("train")["image_id"])
    regions = {i: m for i, m in zip(ids, artefact_masks(data.root, ids, ["patch"]))}
    plain = RegionDataset(data, "train", 64, train=False, regions=regions)
    k = next(i for i, image_id in enumerate(ids) if regions[image_id].any())
    assert torch.equal(plain[k]["region"][0] > 0, torch.as_tensor(regions[ids[k]]))
    augmented = RegionDataset(data, "train", 64, train=True, regions={ids[k]: plain[k]["mask"][0].numpy() > 0})
    torch.manual_seed(1)
    item = augmented[k]  # region = the lesion mask: flipped and rotated alike, they stay equal
    assert torch.equal(item["region"], item["mask"])
    batch = RegionIntervention(1.0, seed=0)([plain[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 64, 64) and "region" in batch


def test_train_with_mask_region_fix_trains_and_fingerprints_its_regions(tmp_path):
    data = _tiny_derm(tmp_path, size=32)
    ids = list(data.split("train")["image_id"])
    regions = {i: m for i, m in zip(ids, artefact_masks(data.root, ids, ["patch"]))}
    config = TrainConfig(epochs=1, lr=1e-3, seed=0, max_batches_per_epoch=2, monitor="val_auroc")
    fix = MaskFix("region", 1.0, regions=regions, region_name="patch maps")
    trained = train_with_mask(data, tmp_path / "region.pt", fix, config=config, batch_size=8,
                              classifier=NewClassifier(image_size=32))
    assert trained.meta["fix"]["method"] == "region" and trained.meta["fix"]["regions"] == "patch maps"
    assert trained.meta["metrics"]["images_swapped"] > 0
    other = {i: np.zeros_like(m) for i, m in regions.items()}
    assert MaskFix("region", 1.0, regions=other).record(None)["regions_sha256"] != fix.record(None)["regions_sha256"]
    assert "regions_sha256" not in MaskFix("background", 0.5).record(None)  # 07's checkpoints keep their fingerprint
    with pytest.raises(ValueError, match="regions"):
        MaskFix("region", 0.5)
    with pytest.raises(ValueError, match="probability"):
        MaskFix("region", 2.0, regions=regions)


def _fake_results(data, classifier, looked_at_patch: bool) -> tuple[Results, np.ndarray]:
    """Grad-CAM-like results for the test split: each map peaks on the image's patch when it has one (and
    ``looked_at_patch``), else in the top-left corner; masks are the true lesions."""
    test = split_tensors(data, "test", classifier.meta)
    ids = list(test["image_id"])
    size = classifier.meta["image_size"]
    patch = artefact_masks(data.root, ids, ["patch"])
    maps = np.zeros((len(ids), size, size), np.float32)
    for k in range(len(ids)):
        if looked_at_patch and patch[k].any():
            maps[k][patch[k]] = 1.0
        else:
            maps[k, :12, :12] = 1.0
        maps[k] += 0.01
    table = pd.DataFrame({"image_id": ids, "image_index": np.arange(len(ids)), "class": "melanoma",
                          "confidence": np.linspace(0.5, 1.0, len(ids)), "c_IoU": np.linspace(0, 0.2, len(ids)),
                          "correct": True})
    return Results(table, maps, maps.copy()), test["mask"][:, 0].numpy() > 0.5


def _untrained(data, size):
    model = build_classifier("resnet18", num_classes=data.info.num_classes, in_channels=data.info.channels)
    meta = {"image_size": size, "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "task": data.info.task, "class_names": data.info.class_names, "thresholds": None}
    return TrainedModel(model.eval(), meta, pd.DataFrame())


def test_reveal_study_names_the_clusters_with_the_artefact_maps_of_synthetic_data(tmp_path):
    torch.manual_seed(0)
    data = _tiny_derm(tmp_path)
    classifier = _untrained(data, 64)
    results, masks = _fake_results(data, classifier, looked_at_patch=True)
    study = reveal_study(results, data, classifier, masks, options=RevealOptions(share=1.0, max_clusters=4))
    assert len(study.rows) == len(results) and {"what cluster", "where cluster", "shortcut_driven", "on patch"} <= set(study.rows)
    assert study.tolerance_px == 64 / 2 / 4  # a quarter of the last block's cell: 2 x 2 cells at 64 px
    assert study.patch_touching["purity"] <= 1.0
    assert study.clusters["size"].sum() == len(results) and "on vignette" in study.clusters
    on_patch = study.rows["on patch"].to_numpy()
    assert on_patch.any() and not on_patch.all()
    # even an untrained network's features tell a blue patch from skin a little: the best patch cluster holds more
    # of the predictions that looked at the patch than the collected predictions do
    assert study.patch["purity"] > on_patch.mean() + 0.1 and study.patch["recall"] >= 0.5
    assert study.flags is None and 0 <= study.concept.cluster < study.what.k


def test_reveal_study_runs_on_a_real_layout_with_image_level_flags_only(tmp_path):
    from test_real_converters import ISIC_FLAGS, make_isic_trap

    from segx_helpers.data.converters import convert_isic2018_trap

    make_isic_trap(tmp_path / "raw", "official", n=48, size=32)
    convert_isic2018_trap(tmp_path / "raw", tmp_path / "isic", verbose=False)
    data = load_dataset(tmp_path / "isic")
    classifier = _untrained(data, 32)
    results, masks = _fake_results(data, classifier, looked_at_patch=False)
    study = reveal_study(results, data, classifier, masks, options=RevealOptions(share=1.0, max_clusters=4))
    assert study.patch is None and "shortcut_driven" not in study.rows
    assert list(study.flags["artefact"]) == ISIC_FLAGS
    flagged = study.flags.dropna(subset=["AUROC"])
    assert set(flagged["artefact"]) == {"ruler", "ink", "dark_corner"}  # the fixture's flags that vary
    assert ((flagged["AUROC"] >= 0.5) & (flagged["random AUROC"] >= 0.5)).all()


def test_notebook_07s_fixes_stand_beside_without_its_baseline(tmp_path):
    from segx_helpers.studies.reveal import with_notebook_07
    from segx_helpers.workflows.settings import TutorialPaths

    paths = TutorialPaths.at(tmp_path)
    here = pd.DataFrame({"model": ["baseline", "revised"], "metric": "accuracy", "value": [0.5, 0.7]})
    assert with_notebook_07(here, paths, "synthetic-derm", "fix_comparison.csv").equals(here)  # 07 has not run
    paths.outputs("synthetic-derm").mkdir(parents=True)
    pd.DataFrame({"model": ["baseline", "RRR", "background"], "metric": "accuracy", "value": [0.5, 0.3, 0.7],
                  "ci_low": 0.0, "ci_high": 1.0}).to_csv(paths.outputs("synthetic-derm") / "fix_comparison.csv", index=False)
    both = with_notebook_07(here, paths, "synthetic-derm", "fix_comparison.csv")
    assert both["model"].tolist() == ["baseline", "revised", "07: RRR", "07: background"]
    assert list(both.columns) == ["model", "metric", "value"] and both["value"].tolist() == [0.5, 0.7, 0.3, 0.7]
