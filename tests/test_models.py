"""Model factories and CAM target-layer lookup."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from segx_helpers.models import build_classifier, build_segmenter, find_target_layer, previous_block


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
