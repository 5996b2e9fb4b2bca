"""End-to-end pieces on a tiny synthetic dataset: mask sources, evaluation, results on disk, offline."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from segx_helpers.models.checkpoints import load_trained, split_tensors
from segx_helpers.data import SyntheticConfig, generate_synthetic_derm, load_dataset
from segx_helpers.data.synthetic import load_artefacts
from segx_helpers.explain.api import RunOptions, explain
from segx_helpers.explain.cams import CamOptions
from segx_helpers.workflows.explanation_recipes import explain_predictions, segx_results
from segx_helpers.models.masks import mask_probabilities
from segx_helpers.workflows.settings import MissingArtifactError, TutorialPaths, run_settings
from segx_helpers.workflows.results import SplitLabels, load_results, load_split_arrays, prediction_table, save_results
from segx_helpers.scores.segu import segu_scores
from segx_helpers.studies.artefacts import shortcut_breakdown
from segx_helpers.scores.segx import segx
from segx_helpers.models.training import TrainConfig
from segx_helpers.workflows.training_recipes import (ClassifierSpec, SegmenterSpec, evaluate_classifier,
                                                    evaluate_segmenter, prepare_dataset, prepare_models,
                                                    train_classifier, train_segmenter)


NETWORK_ATTEMPTS: list = []
"""Addresses outside this machine that building the ``trained`` fixture tried to reach (refused)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny derm dataset and briefly trained models, built with every socket to the outside blocked."""
    root = tmp_path_factory.mktemp("recipes")
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            NETWORK_ATTEMPTS.append(address)  # recorded too: code that catches the error must not hide it
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    socket.socket.connect = guarded
    try:
        data_root = generate_synthetic_derm(root / "data" / "synthetic-derm",
                                            SyntheticConfig(n_images=60, image_size=64, seed=3), progress=False)
        data = load_dataset(data_root)
        seg = train_segmenter(
            data,
            root / "artifacts" / "synthetic-derm" / "segmenter.pt",
            SegmenterSpec(image_size=64, decoder_channels=(16, 8, 8, 8, 8)),
            config=TrainConfig(epochs=1, monitor="val_dice"),
        )
        cls = train_classifier(
            data,
            root / "artifacts" / "synthetic-derm" / "classifier.pt",
            ClassifierSpec(image_size=64),
            config=TrainConfig(epochs=1, monitor="val_auroc"),
        )
    finally:
        socket.socket.connect = real_connect
    return root, data, seg, cls


def test_the_default_path_never_touches_the_network(trained):
    root, data, seg, cls = trained
    assert NETWORK_ATTEMPTS == []
    for kind, trained_model in (("segmenter", seg), ("classifier", cls)):  # trained offline, saved, loads as trained
        loaded = load_trained(root / "artifacts" / "synthetic-derm" / f"{kind}.pt", kind).model.state_dict()
        assert all(torch.equal(loaded[name], value) for name, value in trained_model.model.state_dict().items())


def test_mask_sources_agree_in_shape(trained):
    root, data, seg, cls = trained
    tensors = split_tensors(data, "test", cls.meta)
    from_model = mask_probabilities(seg, data, "test", 64)
    from_path = mask_probabilities(root / "artifacts" / "synthetic-derm" / "segmenter.pt", data, "test", 64)
    from_disk = mask_probabilities(data.root / "masks", data, "test", 64)
    from_callable = mask_probabilities(lambda x: np.ones((len(x), 64, 64)), data, "test", 64, images=tensors["image"])
    assert from_model.shape == from_path.shape == from_disk.shape == from_callable.shape == (len(tensors["image"]), 64, 64)
    assert np.allclose(from_model, from_path)
    assert set(np.unique(from_disk)) <= {0.0, 1.0}
    assert (from_disk > 0.5).mean() == pytest.approx((tensors["mask"].numpy() > 0.5).mean(), abs=0.01)
    with pytest.raises(ValueError, match="needs the images"):
        mask_probabilities(lambda x: x, data, "test", 64)
    with pytest.raises(ValueError, match="returned shape"):
        mask_probabilities(lambda x: np.ones((1, 2, 2)), data, "test", 64, images=tensors["image"])


def test_evaluations_return_documented_keys(trained):
    root, data, seg, cls = trained
    seg_eval = evaluate_segmenter(seg, data, "test", image_size=64)
    assert seg_eval["dice"].shape == (len(seg_eval["image_id"]),) and seg_eval["pred"].dtype == bool
    cls_eval = evaluate_classifier(cls, data, "test", n_resamples=20)
    assert cls_eval["probs"].shape == (len(cls_eval["image_id"]), 3)
    assert np.allclose(cls_eval["probs"].sum(1), 1, atol=1e-5)
    breakdown = shortcut_breakdown(cls_eval, load_artefacts(data.root), {"melanoma": "patch"}, data.info.class_names)
    assert breakdown["artefact vs label"].tolist() == ["agrees", "disagrees"]
    assert breakdown["images"].sum() == len(cls_eval["image_id"])


def test_results_round_trip_and_segu(trained, tmp_path):
    root, data, seg, cls = trained
    tensors = split_tensors(data, "test", cls.meta)
    e = explain_predictions(cls, tensors["image"], "gradcam", run=RunOptions(progress=False))
    masks = mask_probabilities(seg, data, "test", 64)
    aligned = segx(e.maps, masks[e.image_index])
    table = prediction_table(e, SplitLabels.of(tensors, data.info))
    assert (table["correct"] == (tensors["target"].numpy()[e.image_index] == e.class_index)).all()
    images = np.random.default_rng(0).random((len(tensors["image"]), 64, 64, 3))
    folder = save_results(tmp_path / "gradcam", table, e.maps, aligned, images, masks)
    loaded = load_results(folder)
    manifest, maps = loaded.table, loaded.maps
    assert len(manifest) == len(e) and np.allclose(maps, e.maps) and np.allclose(loaded.segx_maps, aligned)
    assert all((folder / p).is_file() for p in manifest["overlay"])
    scores = segu_scores(maps, masks[manifest["image_index"]] >= 0.5)
    assert scores.shape == (len(e), 5) and scores.notna().all().all()
    least = loaded.sort("confidence").head(3)          # maps travel with their rows
    assert np.allclose(least.maps, e.maps[np.argsort(e.confidence, kind="stable")[:3]])
    save_results(folder, table, e.maps, aligned, images, masks)
    (tmp_path / "foreign").mkdir()
    with pytest.raises(FileExistsError, match="not written here"):
        save_results(tmp_path / "foreign", table, e.maps, aligned, images, masks)


def test_prepare_helpers_say_which_notebook_to_run(trained, tmp_path):
    root, data, seg, cls = trained
    settings = run_settings(quick=True)
    with pytest.raises(MissingArtifactError, match="01_dataset_prep"):
        prepare_dataset("synthetic-derm", TutorialPaths.at(tmp_path), settings)
    with pytest.raises(MissingArtifactError, match="02_train_segmenter"):
        prepare_models("synthetic-derm", TutorialPaths.at(tmp_path), data, settings)
    paths = TutorialPaths.at(root)
    import dataclasses  # the settings the fixture trained with (prepare_models checks them)
    trained_with = dataclasses.replace(settings, image_size=64, seg_image_size=64, seg_epochs=1, cls_epochs=1,
                                       max_batches_per_epoch=None)
    loaded_seg, loaded_cls = prepare_models("synthetic-derm", paths, data, trained_with)
    assert loaded_cls.meta["class_names"] == data.info.class_names


def test_prepare_dataset_checks_every_file_before_any_training(make_tiny_dataset, tmp_path):
    """Issue 35 (the smaller item): notebooks 02 to 05 load their dataset checking every image and mask, so a
    corrupt test image is refused when the notebook starts, naming the file (before: only at evaluation, after the
    training)."""
    import shutil

    from segx_helpers.data.format import DatasetFormatError

    root = tmp_path / "project"
    shutil.copytree(make_tiny_dataset("mine"), root / "data" / "mine")
    data = prepare_dataset("mine", TutorialPaths.at(root), run_settings(quick=True))
    image = Path(data.split("test")["image_path"].iloc[0])
    image.write_bytes(image.read_bytes()[:60])  # truncated, as by a partial copy
    with pytest.raises(DatasetFormatError, match=rf"Unreadable or truncated image file: .*{image.name}"):
        prepare_dataset("mine", TutorialPaths.at(root), run_settings(quick=True))


def test_preparing_a_missing_dataset_says_what_it_generates_and_reuses_notebook_01s(tmp_path, capsys):
    import dataclasses

    from segx_helpers.data.synthetic import ensure_synthetic

    settings = dataclasses.replace(run_settings(quick=True), n_images=60, image_size=64)
    paths = TutorialPaths.at(tmp_path)
    prepare_dataset("synthetic-derm", paths, settings, prepare_missing=True, seed=1)
    out = capsys.readouterr().out
    assert "preparing the dataset (notebook 01's step)" in out and "notebook 01's default parameters" in out
    assert ("dataset: synthetic-derm as generated under ROOT (60 images at 64 px, seed 1, shortcut correlation 0.85 in "
            "train/val and -0.4 in test, artefact 'patch')") in out
    # a dataset notebook 01 made with its own parameters is used as it is, and its parameters are said
    ensure_synthetic("synthetic-derm", paths.dataset("synthetic-derm"),
                     SyntheticConfig(n_images=60, image_size=64, seed=1, shortcut_correlation=0.5), progress=False)
    data = prepare_dataset("synthetic-derm", paths, dataclasses.replace(settings, image_size=128), prepare_missing=True)
    out = capsys.readouterr().out
    assert "preparing" not in out and data.info.generator["shortcut_correlation"] == 0.5
    assert "shortcut correlation 0.5 in train/val" in out and "its images are 64 px and this run mode uses 128 px" in out


def test_models_of_a_dataset_generated_with_other_parameters_are_not_reused(trained, tmp_path):
    """Notebook 01 run again with another shortcut strength: the same image ids, other images. The checkpoints
    trained before must be refused (they carry the generator's parameters), not silently reused."""
    import dataclasses
    import shutil

    from segx_helpers.models.checkpoints import CheckpointError

    root, data, seg, cls = trained
    shutil.copytree(root / "artifacts", tmp_path / "artifacts")
    changed = load_dataset(generate_synthetic_derm(
        tmp_path / "data" / "synthetic-derm",
        SyntheticConfig(n_images=60, image_size=64, seed=3, shortcut_correlation=0.5), progress=False))
    assert sorted(changed.split("train")["image_id"]) == sorted(data.split("train")["image_id"])
    trained_with = dataclasses.replace(run_settings(quick=True), image_size=64, seg_image_size=64, seg_epochs=1,
                                       cls_epochs=1, max_batches_per_epoch=None)
    with pytest.raises(CheckpointError, match="dataset_generator") as refused:
        prepare_models("synthetic-derm", TutorialPaths.at(tmp_path), changed, trained_with)
    assert "train_ids_sha256" not in str(refused.value)


def test_segx_results_writes_what_notebook_05_reads(trained):
    root, data, seg, cls = trained
    paths = TutorialPaths.at(root)
    settings = run_settings(quick=True)
    made = segx_results(paths.maps("synthetic-derm"), data, seg, cls, settings, methods=("gradcam",))
    arrays = load_split_arrays(paths.maps("synthetic-derm") / "test_masks.npz")
    loaded = load_results(paths.maps("synthetic-derm") / "gradcam")
    assert arrays["mask_prob"].shape[0] == len(arrays["image_id"]) and len(loaded.table) == len(loaded.maps)
    assert arrays["predicted_masks"].dtype == bool
    assert np.allclose(loaded.table["c_IoU"], made["gradcam"].table["c_IoU"])


def test_notebook_path_and_benchmark_path_give_identical_tables(trained):
    """Notebook 04 scores with explanation_results; the benchmark calls analyse on the same maps: one path."""
    from segx_helpers.scores.analysis import analyse, binarise_masks
    from segx_helpers.workflows.results import explanation_results

    root, data, seg, cls = trained
    tensors = split_tensors(data, "test", cls.meta)
    e = explain_predictions(cls, tensors["image"], "gradcam", run=RunOptions(progress=False))
    predicted = binarise_masks(mask_probabilities(seg, data, "test", 64), seg.meta["threshold"])
    truth = tensors["mask"][:, 0].numpy() > 0.5
    notebook = explanation_results(e, SplitLabels.of(tensors, data.info), predicted, truth, tensors["has_mask"]).table
    benchmark = analyse(e.maps, predicted[e.image_index], truth[e.image_index])
    pd.testing.assert_frame_equal(notebook[benchmark.columns], benchmark)


def test_explained_subset_is_stratified_seeded_and_covers_every_class():
    from segx_helpers.workflows.explanation_recipes import explained_subset

    targets = np.repeat([0, 1, 2], [60, 30, 10])        # sorted by class, as many user folders are
    rows = explained_subset(targets, 20, seed=0)
    assert len(rows) == 20 and len(set(rows)) == 20 and (np.diff(rows) > 0).all()
    assert np.bincount(targets[rows]).tolist() == [12, 6, 2]
    assert (explained_subset(targets, 20, seed=0) == rows).all() and not (explained_subset(targets, 20, seed=1) == rows).all()


def test_foreign_classifier_and_callable_mask_source(trained):
    """The recipes work with a model and a mask source the package did not create."""
    root, data, seg, cls = trained
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    tensors = split_tensors(data, "test", cls.meta)
    e = explain(model, tensors["image"], None, "gradcam", options=CamOptions(target_layers=[model[2]]),
                run=RunOptions(progress=False))
    centre = np.zeros((len(tensors["image"]), 64, 64))
    centre[:, 16:48, 16:48] = 1
    masks = mask_probabilities(lambda x: centre, data, "test", 64, images=tensors["image"])
    aligned = segx(e.maps, masks[e.image_index])
    assert (aligned[:, :16] == 0).all() and aligned.shape == e.maps.shape
    scores = segu_scores(e.maps, masks[e.image_index] >= 0.5)
    assert ((scores >= 0) & (scores <= 1)).all().all()


def test_background_images_reference_takes_the_first_validation_images(trained):
    from segx_helpers.workflows.explanation_recipes import background_images

    root, data, seg, cls = trained
    reference = background_images(data, cls.meta, 3, as_reference_code=True)
    val = split_tensors(data, "val", cls.meta)["image"][:3]
    assert torch.allclose(reference, val)
    ours = background_images(data, cls.meta, 3, seed=0)
    assert ours.shape == reference.shape and torch.equal(ours, background_images(data, cls.meta, 3, seed=0))


def test_error_taxonomy_on_the_synthetic_set_and_other_datasets(trained):
    from segx_helpers.studies.shortcut import error_taxonomy

    root, data, seg, cls = trained
    tensors = split_tensors(data, "test", cls.meta)
    e = explain_predictions(cls, tensors["image"], "gradcam", run=RunOptions(progress=False))
    targets = tensors["target"].numpy()
    table = prediction_table(e, SplitLabels(tensors["image_id"], targets, "multiclass", data.info.class_names))
    kinds = error_taxonomy(data, table, targets)
    ink = load_artefacts(data.root).set_index("image_id").loc[table["image_id"], "patch"].to_numpy(bool)
    wrong = ~table["correct"].to_numpy()
    assert set(kinds[~wrong]) == {"correct"}
    present = kinds == "artefact present"
    assert (ink[present] & (table["class"].to_numpy()[present] == "melanoma")).all()
    absent = kinds == "artefact absent"
    assert (~ink[absent] & (np.asarray(data.info.class_names)[targets[table["image_index"]]][absent] == "melanoma")).all()
    import dataclasses

    plain = dataclasses.replace(data, info=dataclasses.replace(data.info, generator={}))
    assert set(error_taxonomy(plain, table, targets)[wrong]) <= {"other error"}
