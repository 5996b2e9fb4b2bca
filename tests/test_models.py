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


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])
@pytest.mark.parametrize("in_channels", [3, 1])
def test_classifier_outputs_one_logit_per_class(arch, in_channels):
    model = build_classifier(arch, num_classes=4, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 64, 64))
    assert out.shape == (2, 4)
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())


@pytest.mark.parametrize("arch, expected", [("resnet18", "layer4"), ("densenet121", "features")])
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
