"""Training loop, checkpoints (round trip, refusal to overwrite, corrupt files), resume and determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segx_helpers.data import load_dataset
from segx_helpers.data.torch_dataset import Normalization, SegXDataset
from segx_helpers.models.networks import build_classifier
from segx_helpers.models.checkpoints import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from segx_helpers.models.training import (
    CheckpointPlan,
    DiceBCELoss,
    TrainConfig,
    balanced_class_weights,
    classification_loss,
    fit,
    make_loader,
)
from segx_helpers.workflows.training_recipes import ClassifierSpec, SegmenterSpec, train_classifier, train_segmenter

META = {"kind": "classifier", "arch": "resnet18", "class_names": ["a", "b", "c"], "in_channels": 3}


def _loss_on(model, loader, loss_fn):
    model.eval()
    with torch.no_grad():
        return float(np.mean([loss_fn(model(b["image"]), b["target"]).item() for b in loader]))


def test_fit_lowers_the_loss_and_keeps_best_weights(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    train = SegXDataset(data, "train", 32)
    loader = make_loader(train, 8, shuffle=True)
    torch.manual_seed(0)
    model = build_classifier("resnet18", 3)
    loss_fn = classification_loss("multiclass")
    before = _loss_on(model, make_loader(train, 8, shuffle=False), loss_fn)
    # float32 (amp=False): the loop is under test, not the CPU's bfloat16 path, which on this noise fixture
    # recovers from its first steps more slowly and would make the outcome depend on the processor
    history = fit(model, loss_fn, loader, lambda m: {"val_score": -_loss_on(m, make_loader(train, 8, False), loss_fn)},
                  TrainConfig(epochs=4, lr=3e-3, patience=10, amp=False))
    after = _loss_on(model, make_loader(train, 8, shuffle=False), loss_fn)
    assert after < 0.7 * before
    assert len(history.records) == 4
    assert -after == pytest.approx(history.best_value, rel=1e-4)
    assert not model.training


def test_early_stopping_stops(make_tiny_dataset):
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    loader = make_loader(SegXDataset(data, "train", 32), 8, shuffle=True)
    values = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    history = fit(build_classifier("resnet18", 3), classification_loss("multiclass"), loader,
                  lambda m: {"val_score": next(values)}, TrainConfig(epochs=6, patience=1))
    assert len(history.records) == 2 and history.best_epoch == 0


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = build_classifier("resnet18", 3).eval()
    path = save_checkpoint(tmp_path / "c.pt", model, META)
    loaded, meta = load_checkpoint(path, expected_kind="classifier")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta == META


def test_save_refuses_to_overwrite(tmp_path):
    model = build_classifier("resnet18", 3)
    path = save_checkpoint(tmp_path / "c.pt", model, META)
    stamp = path.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_checkpoint(path, build_classifier("resnet18", 3), META)
    assert path.read_bytes() == stamp
    save_checkpoint(path, model, {**META, "note": 1}, overwrite=True)
    assert read_checkpoint(path)["meta"]["note"] == 1


def test_corrupt_and_foreign_checkpoints_fail_clearly(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", build_classifier("resnet18", 3), META)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is corrupt"):
        load_checkpoint(truncated)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a segx-checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a 'segmenter'"):
        load_checkpoint(path, expected_kind="segmenter")
    other = save_checkpoint(tmp_path / "other.pt", build_classifier("resnet18", 5), META)
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "segx-checkpoint-v1", "payload": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="corrupt or not a segx_helpers checkpoint"):
        read_checkpoint(tmp_path / "evil.pt")


def test_train_classifier_writes_checkpoint_resumes_and_is_deterministic(make_tiny_dataset, tmp_path):
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    config = TrainConfig(epochs=2, lr=1e-3, monitor="val_auroc")
    first = train_classifier(data, tmp_path / "a.pt", ClassifierSpec(image_size=32), config=config)
    second = train_classifier(data, tmp_path / "b.pt", ClassifierSpec(image_size=32), config=config)
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    meta = read_checkpoint(tmp_path / "a.pt")["meta"]
    assert meta["class_names"] == ["a", "b", "c"] and meta["image_size"] == 32 and len(meta["history"]) == 2
    with pytest.raises(FileExistsError):
        from segx_helpers.models.training import fit as _fit
        _fit(build_classifier("resnet18", 3), classification_loss("multiclass"), [], lambda m: {}, config,
             CheckpointPlan(path=tmp_path / "a.pt"))
    reloaded = train_classifier(data, tmp_path / "a.pt", ClassifierSpec(image_size=32), config=config)
    assert reloaded.meta["history"] == meta["history"]
    assert not (tmp_path / "a.pt.last.pt").exists()  # the resume state goes once training finished
    longer = TrainConfig(epochs=3, lr=1e-3, monitor="val_auroc")
    from segx_helpers.workflows.training_recipes import _datasets
    train_set, val_set = _datasets(data, 32, Normalization())
    fit(
        build_classifier("resnet18", 3),
        classification_loss("multiclass"),
        make_loader(train_set, 32, True),
        lambda m: {"val_auroc": 0.5},
        config,
        checkpoint=CheckpointPlan(path=tmp_path / "c.pt"),
    )
    history = fit(
        build_classifier("resnet18", 3),
        classification_loss("multiclass"),
        make_loader(train_set, 32, True),
        lambda m: {"val_auroc": 0.5},
        longer,
        checkpoint=CheckpointPlan(path=tmp_path / "c.pt", resume=True),
    )
    assert [r["epoch"] for r in history.records] == [1, 2, 3]


def test_train_segmenter_stores_threshold(make_tiny_dataset, tmp_path):
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    train_segmenter(
        data,
        tmp_path / "s.pt",
        SegmenterSpec(image_size=32, decoder_channels=(16, 8, 8, 8, 8)),
        config=TrainConfig(epochs=1, monitor="val_dice"),
    )
    meta = read_checkpoint(tmp_path / "s.pt")["meta"]
    assert 0.1 <= meta["threshold"] <= 0.9 and meta["kind"] == "segmenter"
    loaded, _ = load_checkpoint(tmp_path / "s.pt")
    assert loaded(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_dice_bce_loss_is_small_for_perfect_logits():
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    perfect = (masks * 2 - 1) * 20
    assert DiceBCELoss()(perfect, masks).item() < 1e-3
    assert DiceBCELoss()(-perfect, masks).item() > 1.5


def test_balanced_class_weights():
    assert balanced_class_weights(np.array([0, 0, 0, 1]), "multiclass").tolist() == pytest.approx([4 / 6, 2.0])
    assert balanced_class_weights(np.array([[1, 0], [0, 0], [0, 1], [0, 1]]), "multilabel").tolist() == [3.0, 1.0]


def _offline(monkeypatch):
    """No network: every socket connection fails as it does on a machine without internet."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_pretrained_weights_fail_clearly_offline_and_if_online_falls_back(make_tiny_dataset, tmp_path, monkeypatch):
    """Offline, ImageNet weights are an explicit error; "if-online" trains from random weights and records
    "random" as what initialised the model (not the request)."""
    from segx_helpers.models.networks import WeightsUnavailableError

    _offline(monkeypatch)
    with pytest.raises(WeightsUnavailableError, match="offline"):
        build_classifier("resnet18", 3, weights="imagenet")
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    trained = train_classifier(data, tmp_path / "c.pt", ClassifierSpec(image_size=32, weights="if-online"),
                               config=TrainConfig(epochs=1, monitor="val_auroc"))
    assert trained.meta["init"] == "random" and trained.meta["fingerprint"]["init"] == "random"
    assert trained.meta["pretrained"] is False


def test_a_checkpoint_from_one_initialisation_is_never_reused_for_another(make_tiny_dataset, tmp_path, monkeypatch):
    """Issue 35 items 1-2: the fingerprint holds what initialised the model, not the request. A model trained
    from random weights because "if-online" was offline is not reused once ImageNet weights can be had, nor for a
    weights file; asking for a file twice reuses the model, another file does not."""
    import segx_helpers.models.networks as networks
    from segx_helpers.models.checkpoints import CheckpointError
    from segx_helpers.models.networks import RANDOM, Initialisation

    data = load_dataset(make_tiny_dataset(n=30, size=32))
    config = TrainConfig(epochs=1, monitor="val_auroc")
    path = tmp_path / "c.pt"
    _offline(monkeypatch)
    train_classifier(data, path, ClassifierSpec(image_size=32, weights="if-online"), config=config)
    monkeypatch.undo()
    imagenet = Initialisation("imagenet", "ImageNet (stand-in)", build_classifier("resnet18", 3).state_dict())
    monkeypatch.setattr(networks, "_imagenet", lambda arch, kind: imagenet)
    with pytest.raises(CheckpointError, match="init: checkpoint 'random', now 'imagenet'"):
        train_classifier(data, path, ClassifierSpec(image_size=32, weights="if-online"), config=config)
    weights = tmp_path / "weights.pt"
    torch.save(build_classifier("resnet18", 3).state_dict(), weights)
    with pytest.raises(CheckpointError, match="init: checkpoint 'random', now 'file:"):
        train_classifier(data, path, ClassifierSpec(image_size=32, weights=str(weights)), config=config)
    from_file = train_classifier(data, tmp_path / "f.pt", ClassifierSpec(image_size=32, weights=str(weights)),
                                 config=config)
    assert from_file.meta["init"].startswith("file:") and from_file.meta["init_source"] == str(weights)
    assert train_classifier(data, tmp_path / "f.pt", ClassifierSpec(image_size=32, weights=str(weights)),
                            config=config).meta["init"] == from_file.meta["init"]
    torch.save(build_classifier("resnet18", 3).state_dict(), weights)  # other values, same file name
    with pytest.raises(CheckpointError, match="init"):
        train_classifier(data, tmp_path / "f.pt", ClassifierSpec(image_size=32, weights=str(weights)), config=config)
    assert RANDOM.name == "random"


def test_a_segmenter_records_what_initialised_its_encoder(make_tiny_dataset, tmp_path, monkeypatch):
    """Issue 35 item 2: ``encoder_weights="if-online"`` offline trains from random weights and records "random".
    Offline, the Hugging Face Hub is put in its offline mode for the download (no series of retries)."""
    from huggingface_hub import constants

    from segx_helpers.models.networks import hub_offline_when_unreachable

    _offline(monkeypatch)
    with hub_offline_when_unreachable():
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    trained = train_segmenter(data, tmp_path / "s.pt", SegmenterSpec(image_size=32, decoder_channels=(16, 8, 8, 8, 8),
                                                                     encoder_weights="if-online"),
                              config=TrainConfig(epochs=1, monitor="val_dice"))
    assert trained.meta["init"] == "random" and trained.meta["fingerprint"]["init"] == "random"


# ------------------------------------------------------------------------------ reliability (issue 13)

def _nan_fit(tmp_path=None, scores=None):
    import math
    import warnings

    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{"image": torch.randn(4, 2), "target": torch.tensor([0, 1, 0, 1])}]
    values = iter(scores or [math.nan] * 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(
            model,
            nn.CrossEntropyLoss(),
            batches,
            lambda m: {"val_score": next(values)},
            TrainConfig(epochs=3, amp=False),
            checkpoint=CheckpointPlan(path=None if tmp_path is None else tmp_path / "c.pt"),
        )
    return model, initial, history, [str(w.message) for w in caught]


def test_nan_validation_score_keeps_the_last_epoch_with_a_warning_not_the_initial_weights(tmp_path):
    """All-NaN validation: the documented fallback is the last epoch's weights, with a warning, never the
    untrained model; the checkpoint holds those trained weights."""
    model, initial, history, messages = _nan_fit(tmp_path)
    assert history.best_epoch == 2
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert any("no epoch had a finite" in m and "last epoch" in m for m in messages), messages
    saved = read_checkpoint(tmp_path / "c.pt")["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(saved[k], v), k


def test_nan_epochs_never_become_the_best_epoch():
    import math

    _, _, history, messages = _nan_fit(scores=[0.4, math.nan, math.nan])
    assert history.best_epoch == 0 and history.best_value == 0.4
    assert any("epoch 2" in m and "not finite" in m for m in messages), messages


def _reorder_classes(root, order):
    import json

    info = json.loads((root / "dataset.json").read_text())
    info["class_names"] = order
    (root / "dataset.json").write_text(json.dumps(info))
    return load_dataset(root)


def test_checkpoint_of_another_dataset_or_mode_is_refused(make_tiny_dataset, tmp_path):
    """A checkpoint is reused only when its fingerprint matches; the error names the field and how to retrain."""
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    quick = TrainConfig(epochs=1, lr=1e-3, monitor="val_auroc", max_batches_per_epoch=1)
    path = tmp_path / "c.pt"
    first = train_classifier(data, path, ClassifierSpec(image_size=32), config=quick)
    fingerprint = read_checkpoint(path)["meta"]["fingerprint"]
    assert fingerprint["class_names"] == ["a", "b", "c"] and fingerprint["epochs"] == 1
    assert len(fingerprint["train_ids_sha256"]) == 64 and fingerprint["max_batches_per_epoch"] == 1
    assert train_classifier(data, path, ClassifierSpec(image_size=32), config=quick).meta["fingerprint"] == fingerprint

    full = TrainConfig(epochs=2, lr=1e-3, monitor="val_auroc", max_batches_per_epoch=None)
    with pytest.raises(CheckpointError, match=r"epochs: checkpoint 1, now 2; max_batches_per_epoch: checkpoint 1, now None"
                                              r".*retrain=True.*delete or rename"):
        train_classifier(data, path, ClassifierSpec(image_size=32), config=full)
    with pytest.raises(CheckpointError, match="image_size: checkpoint 32, now 64"):
        train_classifier(data, path, ClassifierSpec(image_size=64), config=quick)
    reordered = _reorder_classes(make_tiny_dataset(name="reordered", n=30, size=32), ["b", "a", "c"])
    with pytest.raises(CheckpointError, match=r"class_names: checkpoint \['a', 'b', 'c'\], now \['b', 'a', 'c'\]"):
        train_classifier(reordered, path, ClassifierSpec(image_size=32), config=quick)
    other = load_dataset(make_tiny_dataset(name="other", n=36, size=32))
    with pytest.raises(CheckpointError, match="dataset: checkpoint 'tiny', now 'other'.*train_ids_sha256"):
        train_classifier(other, path, ClassifierSpec(image_size=32), config=quick)

    retrained = train_classifier(data, path, ClassifierSpec(image_size=32), config=full, retrain=True)
    assert retrained.meta["fingerprint"]["epochs"] == 2 and len(retrained.meta["history"]) == 2
    assert first.meta["fingerprint"] != retrained.meta["fingerprint"]


def test_checkpoint_without_fingerprint_or_unfinished_is_not_reused(make_tiny_dataset, tmp_path):
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    config = TrainConfig(epochs=1, monitor="val_auroc")
    save_checkpoint(tmp_path / "old.pt", build_classifier("resnet18", 3), {**META, "image_size": 32})
    with pytest.raises(CheckpointError, match="no training fingerprint.*retrain=True"):
        train_classifier(data, tmp_path / "old.pt", ClassifierSpec(image_size=32), config=config)
    trained = train_classifier(data, tmp_path / "c.pt", ClassifierSpec(image_size=32), config=config)
    save_checkpoint(tmp_path / "c.pt", trained.model, {**trained.meta, "finished": False}, overwrite=True)
    with pytest.raises(CheckpointError, match="unfinished"):
        train_classifier(data, tmp_path / "c.pt", ClassifierSpec(image_size=32), config=config)


def test_prepare_models_refuses_models_of_another_mode(make_tiny_dataset, tmp_path):
    import dataclasses

    from segx_helpers.workflows.settings import QUICK_MODE, TutorialPaths
    from segx_helpers.workflows.training_recipes import classifier_config, prepare_models, segmenter_config

    data = load_dataset(make_tiny_dataset(n=30, size=32))
    paths = TutorialPaths.at(tmp_path)
    quick = dataclasses.replace(QUICK_MODE, image_size=32, seg_image_size=32, seg_epochs=1, cls_epochs=1,
                                max_batches_per_epoch=1)
    train_segmenter(
        data,
        paths.segmenter("tiny"),
        SegmenterSpec(image_size=32, decoder_channels=(16, 8, 8, 8, 8)),
        config=segmenter_config(quick),
    )
    train_classifier(data, paths.classifier("tiny"), ClassifierSpec(image_size=32), config=classifier_config(quick))
    segmenter, classifier = prepare_models("tiny", paths, data, quick)
    assert classifier.meta["class_names"] == ["a", "b", "c"]
    full = dataclasses.replace(quick, seg_epochs=2, cls_epochs=2, max_batches_per_epoch=None)
    with pytest.raises(CheckpointError, match="segmenter.pt was trained on something else.*epochs: checkpoint 1, now 2"
                                              ".*notebook 02_train_segmenter again with RETRAIN = True"):
        prepare_models("tiny", paths, data, full, prepare_missing=True)


def test_wrong_monitor_is_refused_before_any_training(make_tiny_dataset, tmp_path, monkeypatch):
    import segx_helpers.workflows.training_recipes as training_recipes

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training_recipes, "fit", no_training)
    data = load_dataset(make_tiny_dataset(n=30, size=32))
    with pytest.raises(ValueError, match="monitor is 'val_score'.*TrainConfig\\(monitor='val_auroc'"):
        train_classifier(data, tmp_path / "c.pt", ClassifierSpec(image_size=32), config=TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="monitor='val_dice'"):
        train_segmenter(data, tmp_path / "s.pt", SegmenterSpec(image_size=32), config=TrainConfig(epochs=1))
    assert not list(tmp_path.glob("*.pt*"))


@pytest.mark.parametrize("bad, message", [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"patience": -1}, "patience"),
                                          ({"max_batches_per_epoch": 0}, "max_batches_per_epoch"),
                                          ({"min_epochs": -1}, "min_epochs"),
                                          ({"monitor": ""}, "monitor")])
def test_train_config_is_checked_when_made(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_predict_classifier_refuses_a_one_output_multiclass_model():
    from torch import nn

    from segx_helpers.models.training import predict_classifier

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    batches = [{"image": torch.randn(3, 3, 2, 2), "target": torch.tensor([0, 1, 0]), "image_id": ["a", "b", "c"]}]
    with pytest.raises(ValueError, match="one output.*multilabel"):
        predict_classifier(model, batches, "multiclass", device="cpu")
    assert predict_classifier(model, batches, "multilabel", device="cpu")["probs"].shape == (3, 1)


@pytest.mark.parametrize("payload, message", [
    ({"meta_json": "{}"}, "state_dict"),
    ({"state_dict": {"w": torch.zeros(1)}}, "meta_json"),
    ({"state_dict": {"w": torch.zeros(1)}, "meta_json": "{not json"}, "meta_json"),
    ({"state_dict": {"w": torch.zeros(1)}, "meta_json": "[1, 2]"}, "meta_json"),
    ({"state_dict": [1, 2], "meta_json": "{}"}, "state_dict"),
    ({"state_dict": {"w": torch.zeros(1)}, "meta_json": '{"kind": "classifier"}'}, "lacks .*arch"),
    ({"state_dict": {"w": torch.zeros(1)}, "meta_json": '{"kind": "segmenter", "encoder": "resnet18"}'}, "lacks"),
])
def test_checkpoint_with_our_tag_but_bad_contents_is_a_checkpoint_error(tmp_path, payload, message):
    path = tmp_path / "bad.pt"
    torch.save({"format": "segx-checkpoint-v1", **payload}, path)
    with pytest.raises(CheckpointError, match=f"bad.pt.*{message}"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ model selection, small validation

# What a 20-image validation split with one melanoma does to the macro AUROC: it jumps to its best at
# epoch 2, by chance, and never reaches it again, while the validation loss keeps falling until epoch 12.
NOISY_AUROC = [0.62, 0.91, 0.55, 0.70, 0.64, 0.82, 0.58, 0.75, 0.66, 0.80, 0.71, 0.77, 0.69, 0.74, 0.72]
FALLING_LOSS = [1.10, 1.02, 0.97, 0.92, 0.88, 0.83, 0.80, 0.78, 0.76, 0.74, 0.73, 0.71, 0.72, 0.74, 0.75]


def _scripted_fit(config, capsys=None):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    batches = [{"image": torch.randn(4, 2), "target": torch.tensor([0, 1, 0, 1])}]
    epochs = iter(range(len(NOISY_AUROC)))

    def validate(_model):
        i = next(epochs)
        return {"val_auroc": NOISY_AUROC[i], "val_loss": FALLING_LOSS[i]}

    return fit(model, nn.CrossEntropyLoss(), batches, validate, config)


def test_best_auroc_on_a_noisy_validation_split_keeps_the_noise_epoch_but_the_new_rule_does_not(capsys):
    """The old rule (best validation AUROC from epoch 1, patience 5) stops after 7 of 15 epochs and keeps
    epoch 2, as on the 200-image folder of issue 24; the run modes' rule on a small validation split
    (validation loss, no epoch before the fifth) trains all 15 and keeps the lowest-loss epoch, 12."""
    old = _scripted_fit(TrainConfig(epochs=15, monitor="val_auroc", patience=5, amp=False))
    assert len(old.records) == 7 and old.best_epoch + 1 == 2

    new = _scripted_fit(TrainConfig(epochs=15, monitor="val_loss", min_epochs=5, patience=5, amp=False))
    assert len(new.records) == 15 and new.best_epoch + 1 == 12 and new.best_value == pytest.approx(0.71)
    assert "keeps the epoch with the lowest val_loss from epoch 5 on (of 15)" in capsys.readouterr().out

    # min_epochs alone already skips the early spike: the best AUROC from epoch 5 on is epoch 6's
    later = _scripted_fit(TrainConfig(epochs=15, monitor="val_auroc", min_epochs=5, patience=5, amp=False))
    assert later.best_epoch + 1 == 6 and len(later.records) == 11


def test_min_epochs_longer_than_the_run_keeps_the_best_of_the_last_epoch():
    history = _scripted_fit(TrainConfig(epochs=3, monitor="val_loss", min_epochs=10, amp=False))
    assert len(history.records) == 3 and history.best_epoch == 2


def test_small_validation_class_is_named_and_auto_selects_on_the_validation_loss(make_tiny_dataset, tmp_path, capsys):
    """30 images: the validation split holds one image per class, so "auto" monitors the validation loss,
    warns naming each class, and keeps the epoch of the lowest validation loss; the kept weights have it."""
    from segx_helpers.workflows.training_recipes import SmallValidationWarning

    data = load_dataset(make_tiny_dataset(n=30, size=32))
    config = TrainConfig(epochs=4, lr=3e-3, monitor="auto", min_epochs=2, max_batches_per_epoch=2)
    with pytest.warns(SmallValidationWarning, match=r"fewer than 10 images of class 'a': 1, 'b': 1, 'c': 1"):
        trained = train_classifier(data, tmp_path / "c.pt", ClassifierSpec(image_size=32), config=config)
    out = capsys.readouterr().out
    assert "monitor='auto' -> 'val_loss'" in out and "lowest val_loss from epoch 2 on" in out
    assert trained.meta["train_config"]["monitor"] == "val_loss"
    losses = trained.history["val_loss"].to_numpy()
    assert trained.history["epoch"].tolist() == [1, 2, 3, 4]
    kept = int(np.argmin(losses[1:])) + 1
    val_loader = make_loader(SegXDataset(data, "val", 32), 64, shuffle=False)
    kept_loss = _loss_on(trained.model, val_loader, classification_loss("multiclass"))
    assert kept_loss == pytest.approx(losses[kept], rel=1e-5)


def test_auto_monitors_the_auroc_when_every_validation_class_is_large_enough(make_tiny_dataset, recwarn):
    from segx_helpers.workflows.training_recipes import SmallValidationWarning, classifier_selection, validation_class_counts

    data = load_dataset(make_tiny_dataset(n=330, size=32))
    assert validation_class_counts(data) == {"a": 11, "b": 11, "c": 11}
    assert classifier_selection(TrainConfig(monitor="auto"), data).monitor == "val_auroc"
    assert classifier_selection(TrainConfig(monitor="val_loss"), data).monitor == "val_loss"
    assert not [w for w in recwarn if issubclass(w.category, SmallValidationWarning)]


def test_a_notebook_run_interrupted_in_training_continues_when_run_again(make_tiny_dataset, tmp_path, monkeypatch,
                                                                         capsys):
    """Notebook 02 or 03 killed in epoch 2, then run again: the unfinished checkpoint of the same settings is resumed
    from its ``.last.pt`` (before: refused as unfinished until RETRAIN), to the weights of an uninterrupted run; with
    other settings it is still refused."""
    from segx_helpers.models.checkpoints import CheckpointError
    from segx_helpers.workflows import training_recipes

    data = load_dataset(make_tiny_dataset(n=30, size=32))
    config = TrainConfig(epochs=3, lr=1e-3, monitor="val_auroc")
    spec = ClassifierSpec(image_size=32)
    uninterrupted = train_classifier(data, tmp_path / "whole.pt", spec, config=config)

    def dies_in_epoch_2(*args, **kwargs):
        model = build_classifier(*args, **kwargs)
        steps = []

        def hook(module, inputs):
            if module.training:
                steps.append(1)
                if len(steps) == 2:  # one batch per epoch here: the second training step is epoch 2's
                    raise KeyboardInterrupt

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(training_recipes, "build_classifier", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(data, tmp_path / "c.pt", spec, config=config)
    monkeypatch.undo()
    assert (tmp_path / "c.pt.last.pt").exists() and read_checkpoint(tmp_path / "c.pt")["meta"]["finished"] is False
    with pytest.raises(CheckpointError, match="epochs: checkpoint 3, now 4"):
        train_classifier(data, tmp_path / "c.pt", spec, config=TrainConfig(epochs=4, lr=1e-3, monitor="val_auroc"))
    resumed = train_classifier(data, tmp_path / "c.pt", spec, config=config)
    assert "holds an interrupted run of these settings: resuming it" in capsys.readouterr().out
    assert resumed.meta["finished"] is True and not (tmp_path / "c.pt.last.pt").exists()
    assert [r["epoch"] for r in resumed.meta["history"]] == [1, 2, 3]
    for k, v in uninterrupted.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
