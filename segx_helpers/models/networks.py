"""Model factories (torchvision classifiers, smp segmenters) and CAM target-layer lookup.

Nothing downloads by default: classifiers start from random weights (``pretrained=False``) and
segmenters from ``encoder_weights=None``. ImageNet weights are an explicit opt-in that fails with
a clear message when offline.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models as tv_models

CLASSIFIER_ARCHS = ("resnet18", "resnet50", "densenet121")
# U-Net decoder widths (smp's decoder_channels): the paper-size decoder is smp's default; the tutorial trains the
# narrower one, about twice as fast on a CPU for the same Dice on the synthetic set.
PAPER_DECODER_CHANNELS = (256, 128, 64, 32, 16)
CPU_DECODER_CHANNELS = (128, 64, 32, 16, 8)
_TV_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights", "densenet121": "DenseNet121_Weights"}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but could not be obtained (usually: no internet)."""


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` if given, else CUDA, then Apple MPS, then CPU. A device torch does not know, or a
    CUDA / MPS device this machine does not have, is a ``ValueError`` saying so."""
    if preferred:
        try:
            device = torch.device(preferred)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown device {preferred!r}: use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not (torch.cuda.is_available()
                                          and (device.index or 0) < torch.cuda.device_count()):
            raise ValueError(f"device {preferred!r} was asked for, but this machine has "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA GPU(s) "
                             "usable by torch: use cpu (or leave the device out to pick one)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                         and torch.backends.mps.is_available()):
            raise ValueError(f"device {preferred!r} was asked for, but Apple MPS is not available here: use cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_classifier(arch: str = "resnet18", num_classes: int = 2, in_channels: int = 3,
                     pretrained: bool = False) -> nn.Module:
    """A torchvision ResNet / DenseNet with a fresh ``num_classes`` head; outputs logits ``(N, num_classes)``.

    ``in_channels=1`` swaps the stem for single-channel images (with pretrained weights the RGB
    filters are summed, the usual adaptation). ReLUs are made non-in-place so hooks and
    explainers see unmodified activations.
    """
    if arch not in CLASSIFIER_ARCHS:
        raise ValueError(f"Unknown classifier arch {arch!r}; choose one of {CLASSIFIER_ARCHS}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    weights = None
    if pretrained:
        weights = getattr(tv_models, _TV_WEIGHTS[arch]).IMAGENET1K_V1
    try:
        model = getattr(tv_models, arch)(weights=weights)
    except (OSError, RuntimeError) as err:
        raise WeightsUnavailableError(
            f"Could not obtain ImageNet weights for {arch} ({err}). You seem to be offline: use pretrained=False "
            "(the default) or place the weights in the torch hub cache first."
        ) from err
    if arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        if in_channels != 3:
            model.conv1 = _adapt_stem(model.conv1, in_channels)
    else:
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
        if in_channels != 3:
            model.features.conv0 = _adapt_stem(model.features.conv0, in_channels)
        model = DenseNetClassifier(model)
    disable_inplace_relu(model)
    return model


class DenseNetClassifier(nn.Module):
    """torchvision DenseNet with its functional in-place ReLU replaced by a module.

    torchvision's ``DenseNet.forward`` applies ``F.relu(features, inplace=True)``, which rewrites the
    activations that Grad-CAM hooks on ``features`` and trips explainers; here the same computation
    runs with an out-of-place ``nn.ReLU``. The state dict keys stay torchvision's.
    """

    def __init__(self, densenet: nn.Module) -> None:
        super().__init__()
        self.features = densenet.features
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = densenet.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.relu(self.features(x))), 1))


def _adapt_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
    return new


def disable_inplace_relu(model: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every ``nn.ReLU`` (in-place ReLUs corrupt hooked activations)."""
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def build_segmenter(encoder: str = "resnet18", encoder_weights: str | None = None, in_channels: int = 3,
                    arch: str = "Unet", decoder_channels: tuple[int, ...] = PAPER_DECODER_CHANNELS) -> nn.Module:
    """A segmentation-models-pytorch model with one output channel (logits ``(N, 1, H, W)``).

    ``encoder_weights=None`` (default) downloads nothing; ``"imagenet"`` downloads the encoder
    weights and raises :class:`WeightsUnavailableError` when that fails. Inputs must have height
    and width divisible by 32. Narrower ``decoder_channels`` (:data:`CPU_DECODER_CHANNELS`, what the
    tutorial trains) train about twice as fast on a CPU.
    """
    import segmentation_models_pytorch as smp  # lazy: slow to import, and only segmenters need it

    try:
        extra = {"decoder_channels": tuple(decoder_channels)} if arch in ("Unet", "UnetPlusPlus") else {}
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=encoder_weights, in_channels=in_channels,
                                classes=1, **extra)
    except (OSError, RuntimeError, ConnectionError) as err:
        if encoder_weights is None:
            raise
        raise WeightsUnavailableError(
            f"Could not download {encoder_weights!r} weights for the {encoder} encoder ({err}). You seem to be offline: "
            "use encoder_weights=None (the default)."
        ) from err


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bfloat16 matrix products natively (AVX-512 BF16 or AMX, via oneDNN),
    the only CPUs where bfloat16 autocast is faster than float32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


@dataclass(frozen=True)
class CpuTraining:
    """How a model trains on the CPU (a GPU run ignores this): weights and activations in ``channels_last``
    memory format (oneDNN's native layout for convolutions), and ``bf16``: the forward pass under bfloat16
    autocast (weights and optimiser state stay float32), worth it only where :func:`cpu_supports_bf16`.

    ``fast_kernels`` (with ``channels_last``): two kernel choices that change results only by rounding. Batch
    norms whose channel count is not a multiple of 16 get contiguous (NCHW) inputs
    (:func:`contiguous_narrow_norms`): PyTorch's channels_last backward for them is several times slower
    (docs/NOTES.md, "Faster feedback"), and the tutorial's narrow decoder ends in 8 channels.
    And AdamW takes its fused CPU step (:func:`segx_helpers.models.training.make_optimizer`).

    ``CpuTraining.for_this_cpu()`` is the setting the notebooks train with here; ``CpuTraining()`` is plain float32.
    """

    channels_last: bool = False
    bf16: bool = False
    fast_kernels: bool = False

    @classmethod
    def for_this_cpu(cls) -> "CpuTraining":
        return cls(channels_last=True, bf16=cpu_supports_bf16())

    @property
    def name(self) -> str:
        parts = ((["channels_last"] if self.channels_last else []) + (["bf16 autocast"] if self.bf16 else [])
                 + (["fast kernels"] if self.fast_kernels else []))
        return " + ".join(parts) or "float32"

    def autocast(self):
        """The context the forward pass and loss run in: bfloat16 autocast when ``bf16``, else nothing."""
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


def prepare_for_cpu_training(model: nn.Module, setting: CpuTraining) -> nn.Module:
    """``model`` converted in place to ``setting``'s memory format (inputs may stay contiguous: oneDNN
    follows the weights). Returns the model."""
    if setting.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def contiguous_narrow_norms(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward pre-hooks handing each ``BatchNorm2d`` of ``model`` whose channel count is not a multiple of 16
    a contiguous (NCHW) input, so that its forward and backward avoid PyTorch's slow channels_last kernels for
    such widths (the convolution after it follows its own weights' layout). Values change only by
    rounding. Returns the hooks' handles: call ``.remove()`` on each to undo (``fit`` does at its end)."""
    return [module.register_forward_pre_hook(_contiguous_input) for module in model.modules()
            if isinstance(module, nn.BatchNorm2d) and module.num_features % 16]


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def find_target_layer(model: nn.Module, rule: str = "last-block") -> nn.Module:
    """The layer Grad-CAM should hook.

    ``rule="last-block"`` (default): the last block of a ResNet, the last encoder block's first norm of
    a vision transformer (whose tokens CAMs read through :func:`cam_reshape_transform`), the feature
    stack of a DenseNet / EfficientNet / MobileNet / ConvNeXt (any ``features`` with convolutions),
    otherwise the last ``nn.Conv2d`` (with a warning when that one sits at the input). ``rule="last-conv"``: the last ``nn.Conv2d`` of any model, what
    the reference code gets from torchcam (for a ResNet the block's last convolution, before its batch
    norm, residual sum and ReLU; for a DenseNet the last dense layer's convolution).
    Raises ``ValueError`` (asking for ``target_layers``) if no convolution exists.
    """
    if rule not in ("last-block", "last-conv"):
        raise ValueError(f"rule must be 'last-block' or 'last-conv', got {rule!r}")
    if rule == "last-block" and hasattr(model, "layer4") and isinstance(model.layer4, nn.Sequential):
        return model.layer4[-1]
    vit = _vision_transformer(model) if rule == "last-block" else None
    if vit is not None:
        return vit[0]
    features = getattr(model, "features", None)
    if rule == "last-block" and isinstance(features, nn.Sequential) and any(isinstance(m, nn.Conv2d) for m in features.modules()):
        return features
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            f"Could not find a convolutional layer in {type(model).__name__} for CAM methods; "
            "pass target_layers=[<the layer to explain>] explicitly."
        )
    _warn_if_near_input(model, convs[-1])
    return convs[-1]


class TokensToGrid:
    """A CAM ``reshape_transform`` for vision transformers, as in pytorch-grad-cam's ViT tutorial: tokens
    ``(B, prefix + h * w, C)`` -> feature map ``(B, C, h, w)``, dropping the ``prefix_tokens`` leading
    tokens (the class token). The grid is square unless ``grid=(h, w)`` is given. A tensor that already
    is a feature map ``(B, C, H, W)`` passes unchanged (e.g. a transformer's patch-embedding output).
    """

    def __init__(self, prefix_tokens: int = 1, grid: tuple[int, int] | None = None) -> None:
        self.prefix_tokens, self.grid = int(prefix_tokens), grid

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim == 4:
            return tokens
        if tokens.ndim != 3:
            raise ValueError(f"expected transformer tokens (B, tokens, C), got {tuple(tokens.shape)}")
        patches = tokens[:, self.prefix_tokens:, :]
        n = patches.shape[1]
        h, w = self.grid if self.grid is not None else (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise ValueError(f"{n} patch tokens (after {self.prefix_tokens} prefix tokens) do not form a "
                             f"{h}x{w} grid; pass reshape_transform=TokensToGrid(prefix_tokens, grid=(h, w))")
        return patches.reshape(patches.shape[0], h, w, patches.shape[2]).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"TokensToGrid(prefix_tokens={self.prefix_tokens}, grid={self.grid})"


def _vision_transformer(model: nn.Module) -> tuple[nn.Module, TokensToGrid] | None:
    """``(target layer, reshape_transform)`` for the first vision transformer in ``model``, else None:
    the last encoder block's first norm (torchvision ``encoder.layers[-1].ln_1``, timm ``blocks[-1].norm1``),
    the layer pytorch-grad-cam's tutorial hooks. (The final norm would not do for a class-token model:
    only the class token reaches the head, so the patch tokens there get no gradient.)"""
    for module in model.modules():
        layers = getattr(getattr(module, "encoder", None), "layers", None)
        if hasattr(module, "class_token") and isinstance(layers, nn.Sequential) and hasattr(layers[-1], "ln_1"):
            grid = getattr(module, "image_size", 0) // max(getattr(module, "patch_size", 1), 1)
            return layers[-1].ln_1, TokensToGrid(1, (grid, grid) if grid else None)
        blocks = getattr(module, "blocks", None)
        if hasattr(module, "patch_embed") and isinstance(blocks, nn.Sequential) and hasattr(blocks[-1], "norm1"):
            return blocks[-1].norm1, TokensToGrid(int(getattr(module, "num_prefix_tokens", 1)))
    return None


def cam_reshape_transform(model: nn.Module):
    """The ``reshape_transform`` CAM methods need for ``model``: :class:`TokensToGrid` for a vision
    transformer (torchvision or timm), ``None`` for a CNN (its layers output feature maps already)."""
    vit = _vision_transformer(model)
    return None if vit is None else vit[1]


def _warn_if_near_input(model: nn.Module, layer: nn.Module) -> None:
    """Warn when ``layer`` is produced by the first 10 % of the model's parametrised layers (e.g. the
    patch embedding of a transformer, the only convolution there): its Grad-CAM shows edges, or nothing."""
    leaves = [m for m in model.modules() if not any(True for _ in m.children())
              and any(True for _ in m.parameters(recurse=False))]
    inside = {id(m) for m in layer.modules()}
    positions = [k for k, m in enumerate(leaves) if id(m) in inside]
    if positions and max(positions) + 1 <= 0.1 * len(leaves):
        warnings.warn(f"The automatic CAM target layer of {type(model).__name__} ({type(layer).__name__}) comes after "
                      f"only {max(positions) + 1} of its {len(leaves)} parametrised layers, right at the input: its maps "
                      "will show little (or be all zero). Pass target_layers=[<a late layer>] (and reshape_transform= "
                      "if it outputs tokens).", UserWarning, stacklevel=3)


def previous_block(model: nn.Module) -> nn.Module:
    """The block before the default target layer (ResNet ``layer3``, DenseNet ``denseblock3``):
    twice the spatial resolution, for comparing explanation resolution."""
    if hasattr(model, "layer3"):
        return model.layer3[-1]
    features = getattr(model, "features", None)
    if features is not None and hasattr(features, "denseblock3"):
        return features.denseblock3
    raise ValueError(f"No known earlier block for {type(model).__name__}; pass target_layers explicitly.")


def feature_grid(model: nn.Module, layer: nn.Module, image_size: int, in_channels: int = 3) -> tuple[int, int]:
    """The spatial size ``(h, w)`` of ``layer``'s output for a ``(1, in_channels, image_size, image_size)`` input:
    the grid a CAM on that layer works at (a ResNet's last block at 128 px: ``(4, 4)``). One forward pass of
    zeros without gradients; the model's training mode is restored."""
    shapes = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: shapes.append(tuple(output.shape)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    finally:
        handle.remove()
        model.train(was_training)
    if not shapes or len(shapes[0]) != 4:
        raise ValueError(f"{type(layer).__name__} does not output a (B, C, H, W) feature map: no grid to report")
    return shapes[0][2], shapes[0][3]
