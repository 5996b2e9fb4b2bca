"""explain(): every method on small models, targets, engines agreeing, model state restored, the registry."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models as tv_models

from segx_helpers.explain.api import RunOptions, explain
from segx_helpers.explain.cams import CAM_CLASSES, CamOptions
from segx_helpers.explain.gradient_shap import GradientShapOptions
from segx_helpers.explain.registry import ExplanationMethod, method_names, register_method, unregister_method
from segx_helpers.explain.targets import TargetChoice, predicted_targets
from segx_helpers.models.networks import build_classifier
from segx_helpers.scores.analysis import analyse


class TinyNet(nn.Module):
    """A small CNN with in-place ReLUs (the kind of model that trips explainers)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet(), torch.randn(5, 3, 32, 32)


@pytest.mark.parametrize("method", list(CAM_CLASSES))
def test_every_cam_method_gives_maps_at_input_resolution(tiny, method):
    model, x = tiny
    result = explain(model, x, targets=[0, 1, 2, 0, 1], method=method, run=RunOptions(progress=False))
    assert result.maps.shape == (5, 32, 32) and result.maps.dtype == np.float32
    assert np.isfinite(result.maps).all() and result.maps.min() >= 0 and result.maps.max() <= 1 + 1e-6
    assert result.class_index.tolist() == [0, 1, 2, 0, 1]


def test_fast_gradcam_matches_pytorch_grad_cam_for_several_classes_per_image():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 4).eval()
    x = torch.randn(6, 3, 64, 64)
    targets = [[0], [1, 3], [], [0, 1, 2, 3], [2], [3, 0]]
    fast = explain(model, x, targets, "gradcam", run=RunOptions(engine="fast", batch_size=4, progress=False))
    library = explain(model, x, targets, "gradcam", run=RunOptions(engine="library", batch_size=4, progress=False))
    assert fast.image_index.tolist() == library.image_index.tolist() == [0, 1, 1, 3, 3, 3, 3, 4, 5, 5]
    assert fast.class_index.tolist() == library.class_index.tolist() == [0, 1, 3, 0, 1, 2, 3, 2, 3, 0]
    assert np.abs(fast.maps - library.maps).max() <= 1e-5


def test_default_targets_follow_the_prediction(tiny):
    model, x = tiny
    with torch.no_grad():
        probs = model(x).softmax(1).numpy()
    result = explain(model, x, method="gradcam", run=RunOptions(progress=False))
    assert result.class_index.tolist() == probs.argmax(1).tolist()
    assert np.allclose(result.confidence, probs.max(1), atol=1e-6)
    multilabel = predicted_targets(np.array([[0.9, 0.2, 0.6], [0.1, 0.1, 0.1]]), "multilabel", [0.5, 0.5, 0.7])
    assert multilabel == [[0], []]


def test_gradient_shap_engines_are_exact_on_a_linear_model():
    """For a linear model with one background image, expected gradients are exactly (x - b) * w."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    x, background = torch.randn(3, 3, 8, 8), torch.randn(1, 3, 8, 8)
    weight = model[1].weight.detach().reshape(2, 3, 8, 8)
    expected = ((x - background) * weight[1]).abs().mean(1).numpy()
    for engine in ("fast", "library"):
        result = explain(model, x, targets=1, method="gradient_shap",
                         options=GradientShapOptions(background, nsamples=4),
                         run=RunOptions(engine=engine, progress=False))
        assert np.allclose(result.maps, expected, atol=1e-5), engine


def test_gradient_shap_on_torchvision_resnet_with_inplace_relus():
    torch.manual_seed(0)
    model = tv_models.resnet18(weights=None, num_classes=3)
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    x, background = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 32, 32)
    options = GradientShapOptions(background, nsamples=32)
    fast = explain(model, x, targets=[0, 2], method="gradient_shap", options=options, run=RunOptions(progress=False))
    library = explain(model, x, targets=[0, 2], method="gradient_shap", options=options,
                      run=RunOptions(engine="library", progress=False))
    assert fast.maps.shape == library.maps.shape == (2, 32, 32)
    for a, b in zip(fast.maps, library.maps):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5


def test_gradient_shap_needs_a_background(tiny):
    model, x = tiny
    with pytest.raises(TypeError, match="options=GradientShapOptions.*background"):
        explain(model, x, method="gradient_shap", run=RunOptions(progress=False))
    with pytest.raises(ValueError, match="background images"):
        GradientShapOptions(None)
    with pytest.raises(ValueError, match="nsamples"):
        GradientShapOptions(torch.zeros(1, 3, 32, 32), nsamples=0)
    with pytest.raises(ValueError, match=r"background \(1, 3, 8, 8\) must have the images' shape"):
        explain(model, x, method="gradient_shap", options=GradientShapOptions(torch.zeros(1, 3, 8, 8)),
                run=RunOptions(progress=False))
    with pytest.raises(TypeError, match=r"options for gradcam must be CamOptions\(...\), got GradientShapOptions"):
        explain(model, x, method="gradcam", options=GradientShapOptions(torch.zeros(1, 3, 32, 32)),
                run=RunOptions(progress=False))


def test_densenet_gradcam_works():
    torch.manual_seed(0)
    model = build_classifier("densenet121", 2)
    result = explain(model, torch.randn(2, 3, 64, 64), [0, 1], "gradcam", run=RunOptions(progress=False))
    assert result.maps.shape == (2, 64, 64) and result.maps.max() > 0


def test_model_state_is_restored(tiny):
    model, x = tiny
    model.train()
    model.head[2].weight.requires_grad_(False)
    explain(model, x, method="gradcam", run=RunOptions(progress=False))
    assert model.training
    assert not model.head[2].weight.requires_grad and model.features[0].weight.requires_grad


def test_bad_inputs_are_refused(tiny):
    model, x = tiny
    with pytest.raises(ValueError, match="shape \\(N, C, H, W\\)"):
        explain(model, x[0], run=RunOptions(progress=False))
    with pytest.raises(ValueError, match="out of range"):
        explain(model, x, targets=7, run=RunOptions(progress=False))
    with pytest.raises(ValueError, match="one entry per image"):
        explain(model, x, targets=[0, 1], run=RunOptions(progress=False))
    with pytest.raises(ValueError, match="Unknown method"):
        explain(model, x, method="lime", run=RunOptions(progress=False))
    with pytest.raises(ValueError, match="target_layers"):
        explain(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)), x, run=RunOptions(progress=False))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        explain(model, bad, run=RunOptions(progress=False))


# ------------------------------------------------------------------------------ reference behaviour as switches

@pytest.mark.parametrize("engine", ["fast", "library"])
def test_output_switch_explains_probabilities_for_both_methods_and_engines(engine):
    """output="probability"/"sigmoid" (the reference explains sigmoid probabilities) differs from the logit,
    and both engines agree on it."""
    torch.manual_seed(0)
    model = build_classifier("resnet18", num_classes=3).eval()
    x = torch.randn(3, 3, 64, 64)
    background = torch.randn(4, 3, 64, 64)
    for method, options in (("gradcam", None), ("gradient_shap", GradientShapOptions(background, nsamples=8))):
        logit = explain(model, x, [0, 1, 2], method, options=options, run=RunOptions(engine=engine, progress=False)).maps
        prob = explain(model, x, [0, 1, 2], method, options=options, explained=TargetChoice(output="probability"),
                       run=RunOptions(engine=engine, progress=False)).maps
        sig = explain(model, x, [0, 1, 2], method, options=options, explained=TargetChoice(output="sigmoid"),
                      run=RunOptions(engine=engine, progress=False)).maps
        assert not np.allclose(logit, prob, atol=1e-3) and not np.allclose(prob, sig, atol=1e-3), method
        if method == "gradient_shap":
            # not a constant factor apart: the probability's gradient is rescaled differently per sample
            ratio = prob[logit > 1e-6] / logit[logit > 1e-6]
            assert ratio.std() > 0.05 * ratio.mean()
    fast = explain(model, x, [0, 1, 2], "gradcam", explained=TargetChoice(output="sigmoid"),
                   run=RunOptions(engine="fast", progress=False)).maps
    library = explain(model, x, [0, 1, 2], "gradcam", explained=TargetChoice(output="sigmoid"),
                      run=RunOptions(engine="library", progress=False)).maps
    assert np.abs(fast - library).max() < 1e-4
    with pytest.raises(ValueError, match="output"):
        explain(model, x, [0, 1, 2], "gradcam", explained=TargetChoice(output="softmax"),
                run=RunOptions(progress=False))


def test_reference_selection_explains_every_class_above_its_threshold():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    cut = [0.5, 0.25, 0.3]
    assert predicted_targets(probs, "multiclass") == [[0], [1], [2]]
    assert predicted_targets(probs, "multiclass", cut, selection="above-threshold") == [[0, 1], [1, 2], [2]]
    with pytest.raises(ValueError, match="thresholds"):
        predicted_targets(probs, "multiclass", selection="above-threshold")


def test_reference_target_layer_is_the_last_convolution():
    from segx_helpers.models.networks import find_target_layer

    resnet = build_classifier("resnet18", num_classes=2)
    assert find_target_layer(resnet) is resnet.layer4[-1]
    assert find_target_layer(resnet, rule="last-conv") is resnet.layer4[-1].conv2
    densenet = tv_models.densenet121(weights=None)
    last_conv = [m for m in densenet.modules() if isinstance(m, nn.Conv2d)][-1]
    assert find_target_layer(densenet, rule="last-conv") is last_conv


def test_engine_auto_is_silent_and_fast_says_when_it_falls_back(tiny):
    import warnings as _warnings

    model, x = tiny
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        explain(model, x, 0, "gradcam++", run=RunOptions(progress=False))
    with pytest.warns(UserWarning, match="no fast engine"):
        explain(model, x, 0, "gradcam++", run=RunOptions(engine="fast", progress=False))


# ------------------------------------------------------------------------------ reliability (issue 13)

ENGINES = [("gradcam", "fast"), ("gradcam", "library"), ("gradcam++", "library"), ("gradient_shap", "fast"),
           ("gradient_shap", "library")]


@pytest.mark.parametrize("method, engine", ENGINES)
def test_model_state_is_restored_exactly(tiny, method, engine):
    """Every module's training flag, every parameter's grad (same tensor, same values) and requires_grad."""
    model, x = tiny
    model.train()
    model.features[3].eval()
    model.head[2].bias.requires_grad_(False)
    model(x).sum().backward()
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    grads = {name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()}
    assert grads["features.0.weight"][0] is not None and grads["head.2.bias"][0] is None
    options = GradientShapOptions(torch.randn(4, 3, 32, 32), nsamples=4) if method == "gradient_shap" else None
    explain(model, x, [0, 1, 2, 0, 1], method, options=options, run=RunOptions(engine=engine, progress=False))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    for name, p in model.named_parameters():
        original, values = grads[name]
        assert p.grad is original, name
        assert values is None or torch.equal(p.grad, values), name


class ConvInplace(nn.Module):
    """Conv -> ReLU(inplace=True) right after the CAM target layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.relu2(self.conv2(self.relu1(self.conv1(x)))))


def _out_of_place_copy(model):
    import copy

    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return reference


@pytest.mark.parametrize("engine", ["fast", "library"])
def test_inplace_op_after_the_target_layer_does_not_change_cams(engine):
    torch.manual_seed(0)
    model = ConvInplace()
    reference = _out_of_place_copy(model)
    x, targets = torch.randn(4, 3, 16, 16), [0, 1, 2, 1]
    got = explain(model, x, targets, "gradcam", options=CamOptions([model.conv2]),
                  run=RunOptions(engine=engine, progress=False)).maps
    want = explain(reference, x, targets, "gradcam", options=CamOptions([reference.conv2]),
                   run=RunOptions(engine=engine, progress=False)).maps
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(want).max() > 0.5


def test_raw_torchvision_densenet_gives_the_same_cams_as_the_out_of_place_one():
    """torchvision's DenseNet.forward applies F.relu(features, inplace=True) right after the target layer."""
    from segx_helpers.models.networks import DenseNetClassifier

    torch.manual_seed(0)
    raw = tv_models.densenet121(weights=None, num_classes=3).eval()
    reference = DenseNetClassifier(raw)
    x = torch.randn(2, 3, 64, 64)
    want = explain(reference, x, [0, 2], "gradcam", run=RunOptions(engine="fast", progress=False)).maps
    for engine in ("fast", "library"):
        got = explain(raw, x, [0, 2], "gradcam", run=RunOptions(engine=engine, progress=False)).maps
        assert np.abs(got - want).max() <= 1e-4, engine


def test_bad_targets_and_target_layers_fail_clearly(tiny):
    model, x = tiny
    one = explain(model, x, torch.tensor(1), run=RunOptions(progress=False))
    per_image = explain(model, x, torch.tensor([0, 1, 2, 0, 1]), run=RunOptions(progress=False))
    array = explain(model, x, np.array([0, 1, 2, 0, 1]), run=RunOptions(progress=False))
    assert one.class_index.tolist() == [1] * 5
    assert per_image.class_index.tolist() == array.class_index.tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(TypeError, match="integer class indices.*1.5"):
        explain(model, x, 1.5, run=RunOptions(progress=False))
    with pytest.raises(TypeError, match="integer class indices"):
        explain(model, x, torch.tensor([0.2, 0.8, 0.1, 0.0, 0.4]), run=RunOptions(progress=False))
    with pytest.raises(TypeError, match="integer class indices"):
        explain(model, x, [[0.5], [1], [2], [0], [1]], run=RunOptions(progress=False))
    for engine in ("fast", "library"):
        with pytest.raises(ValueError, match=r"target layer Linear.*\(N, C, H, W\)"):
            explain(model, x, 0, "gradcam", options=CamOptions([model.head[2]]),
                    run=RunOptions(engine=engine, progress=False))


def test_one_output_model_is_refused_for_multiclass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    x = torch.randn(2, 3, 16, 16)
    for method in ("gradcam", "gradcam++"):
        with pytest.raises(ValueError, match="one output.*multilabel"):
            explain(model, x, None, method, run=RunOptions(progress=False))
    result = explain(model, x, None, "gradcam", explained=TargetChoice(task="multilabel", thresholds=[1e-3]),
                     run=RunOptions(progress=False))
    assert len(result) == 2 and (result.confidence < 1).all()


# ------------------------------------------------------------------------------ classifiers the package did not build (issue 18)

def _tiny_vit(classes: int = 3):
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=classes)


def _random_head(model):
    """torchvision zero-initialises a ViT's head (every logit 0, every gradient 0): give it random weights."""
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


TORCHVISION_MODELS = {
    "vit_b_16": lambda: _random_head(tv_models.vit_b_16(weights=None, image_size=64, num_classes=3)),
    "efficientnet_b0": lambda: tv_models.efficientnet_b0(weights=None, num_classes=3),
    "mobilenet_v3_small": lambda: tv_models.mobilenet_v3_small(weights=None, num_classes=3),
    "convnext_tiny": lambda: tv_models.convnext_tiny(weights=None, num_classes=3),
    "densenet121": lambda: tv_models.densenet121(weights=None, num_classes=3),
}


@pytest.mark.parametrize("name", list(TORCHVISION_MODELS))
def test_torchvision_classifiers_give_non_zero_gradcams_and_both_engines_agree(name):
    import warnings as _warnings

    torch.manual_seed(0)
    model = TORCHVISION_MODELS[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")  # no all-zero or near-input warning for any of them
        fast = explain(model, x, [0, 2], "gradcam", run=RunOptions(engine="fast", progress=False))
        library = explain(model, x, [0, 2], "gradcam", run=RunOptions(engine="library", progress=False))
    assert fast.maps.shape == library.maps.shape == (2, 64, 64)
    assert np.isfinite(fast.maps).all() and np.isfinite(library.maps).all()
    # scaled to [0, 1] before the resize; one map of a random-weight model may be zero (ReLU of a negative sum)
    assert fast.maps.max() > 0.5 and fast.maps.min() >= 0
    assert np.abs(fast.maps - library.maps).max() <= 1e-4


def test_vision_transformer_target_is_the_last_blocks_norm_with_a_token_grid():
    from segx_helpers.models.networks import TokensToGrid, cam_reshape_transform, find_target_layer

    vit = _tiny_vit()
    assert find_target_layer(vit) is vit.encoder.layers[-1].ln_1
    transform = cam_reshape_transform(vit)
    assert isinstance(transform, TokensToGrid) and transform.grid == (4, 4)
    tokens = torch.arange(2 * 17 * 5, dtype=torch.float32).reshape(2, 17, 5)
    grid = transform(tokens)
    assert grid.shape == (2, 5, 4, 4)
    assert torch.equal(grid[1, :, 2, 3], tokens[1, 1 + 2 * 4 + 3])  # class token dropped, row-major patches
    assert cam_reshape_transform(build_classifier("resnet18", 2)) is None


@pytest.mark.parametrize("method", ["gradcam++", "eigencam", "layercam"])
def test_library_cams_read_vision_transformer_tokens(method):
    torch.manual_seed(0)
    model = _random_head(_tiny_vit()).eval()
    result = explain(model, torch.randn(2, 3, 32, 32), [0, 1], method, run=RunOptions(progress=False))
    assert result.maps.shape == (2, 32, 32) and np.isfinite(result.maps).all() and result.maps.max() > 0.5


def test_all_zero_maps_and_a_target_layer_at_the_input_are_warned():
    from segx_helpers.models.networks import find_target_layer

    torch.manual_seed(0)
    vit = _tiny_vit().eval()  # as torchvision builds it: zero head, so no input changes any output
    with pytest.warns(UserWarning, match="All 2 gradcam maps are zero"):
        result = explain(vit, torch.randn(2, 3, 32, 32), [0, 1], run=RunOptions(progress=False))
    assert not result.maps.any()
    with pytest.warns(UserWarning, match="right at the input"):
        assert find_target_layer(vit, rule="last-conv") is vit.conv_proj
    stem_then_mlp = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(),
                                  *[nn.Sequential(nn.LazyLinear(16), nn.ReLU()) for _ in range(10)], nn.LazyLinear(3))
    with pytest.warns(UserWarning, match="right at the input"):
        assert find_target_layer(stem_then_mlp) is stem_then_mlp[0]


# ------------------------------------------------------------------------------ the registry (issue 26)

@dataclass(frozen=True)
class InputOptions:
    """The toy method has no options."""


def _input_maps(model, images, targets, options, settings):
    """The toy method: the mean absolute input over channels, once per (image, class) pair."""
    return np.stack([images[i].abs().mean(0).numpy() for i, row in enumerate(targets) for _ in row])


@pytest.fixture
def input_method():
    method = register_method(ExplanationMethod("mean_abs_input", InputOptions, _input_maps))
    yield method
    unregister_method(method.name)


def test_a_registered_method_runs_through_explain_and_the_analysis(input_method):
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.zeros(3, 3, 16, 16)
    x[0, :, :, :8] = -2.0  # left half
    x[1, :, :8, :] = 1.0   # top half
    x[2] = 0.5             # everywhere
    assert "mean_abs_input" in method_names()
    result = explain(model, x, [[0, 2], 1, []], "mean_abs_input", run=RunOptions(progress=False))
    assert result.method == "mean_abs_input" and result.maps.shape == (3, 16, 16) and result.maps.dtype == np.float32
    assert result.image_index.tolist() == [0, 0, 1] and result.class_index.tolist() == [0, 2, 1]
    assert np.array_equal(result.maps, x.abs().mean(1).numpy()[[0, 0, 1]])
    with torch.no_grad():
        probs = model(x).softmax(1).numpy()
    assert np.allclose(result.confidence, probs[[0, 0, 1], [0, 2, 1]], atol=1e-6)
    left = np.zeros((3, 16, 16), bool)
    left[:, :, :8] = True
    table = analyse(result.maps, left, image_index=result.image_index)
    assert table["SegU mass"].to_numpy() == pytest.approx([1.0, 1.0, 0.5])
    every = explain(model, x, None, "mean_abs_input", run=RunOptions(progress=False))
    assert np.array_equal(every.maps, x.abs().mean(1).numpy())
    with pytest.warns(UserWarning, match="mean_abs_input has no fast engine"):
        explain(model, x, 0, "mean_abs_input", run=RunOptions(engine="fast", progress=False))


def test_the_registry_refuses_unknown_and_duplicate_names_and_wrong_maps(tiny, input_method):
    model, x = tiny
    with pytest.raises(ValueError, match=r"Unknown method 'lime'; choose one of the registered methods \(.*'gradcam'.*"
                                         r"'gradient_shap'.*'mean_abs_input'\)"):
        explain(model, x, method="lime", run=RunOptions(progress=False))
    with pytest.raises(ValueError, match="'mean_abs_input' is already registered"):
        register_method(ExplanationMethod("mean_abs_input", InputOptions, _input_maps))
    with pytest.raises(ValueError, match="'gradcam' is already registered"):
        register_method(ExplanationMethod("gradcam", InputOptions, _input_maps))
    with pytest.raises(TypeError, match=r"options for mean_abs_input must be InputOptions\(...\), got CamOptions"):
        explain(model, x, 0, "mean_abs_input", options=CamOptions(), run=RunOptions(progress=False))
    register_method(ExplanationMethod("one_map", InputOptions, lambda model, images, *rest: images[:1, 0].numpy()))
    try:
        with pytest.raises(ValueError, match="one_map gave maps of shape .* one map per pair"):
            explain(model, x, 0, "one_map", run=RunOptions(progress=False))
    finally:
        unregister_method("one_map")
    assert "one_map" not in method_names()
    with pytest.raises(ValueError, match="Unknown method 'one_map'"):
        unregister_method("one_map")


def _tensor_maps(model, images, targets, options, settings):
    """A method's mistake: the maps as a torch tensor."""
    return torch.stack([images[i].abs().mean(0) for i, row in enumerate(targets) for _ in row])


def _list_maps(model, images, targets, options, settings):
    """A method's mistake: the maps as a list of arrays."""
    return [images[i].abs().mean(0).numpy() for i, row in enumerate(targets) for _ in row]


@pytest.mark.parametrize("maps, kind", [(_tensor_maps, "Tensor"), (_list_maps, "list")])
def test_a_method_returning_another_type_than_an_array_is_named_with_the_expected_type(tiny, maps, kind):
    """Issue 35 item 16: a registered method that returns a torch tensor or a list gets a TypeError naming the
    method, what it returned and what it must return (before: a bare AttributeError about ``astype`` or ``shape``)."""
    model, x = tiny
    register_method(ExplanationMethod("wrong_type", InputOptions, maps))
    try:
        with pytest.raises(TypeError, match=rf"explanation method 'wrong_type' returned a {kind}, not a numpy array "
                                            r"\(M, H, W\)"):
            explain(model, x, 0, "wrong_type", run=RunOptions(progress=False))
    finally:
        unregister_method("wrong_type")
