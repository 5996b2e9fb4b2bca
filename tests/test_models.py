"""Model factories and CAM target-layer lookup."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segx_helpers.models.networks import (CpuTraining, build_classifier, build_segmenter, cpu_supports_bf16, find_target_layer,
                                 prepare_for_cpu_training, previous_block)
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
