"""Backbones (`model.backbone`): image classifiers with their classification layer removed.

A name resolves (`resolve_backbone`), in order, to: an entry of `BACKBONES` (the project's short
names, incl. `small_cnn`); `timm:<name>` or `tv:<name>` / `torchvision:<name>` explicitly; else an
unprefixed name torchvision lists as a classification model, then one timm knows. Every build gives
(feature extractor (N, 3, H, W) -> (N, D), D).

`model.pretrained`: false (random init, the default: nothing is downloaded), true (the library
downloads its default weights, so it needs the internet), or the path of a local weights file
(`load_pretrained_file`), so that an offline GPU node can start from pretrained weights too.

`model.stem`: `small` replaces the ImageNet stem (which downsamples 4x before the first block) by a
CIFAR-style one (`apply_small_stem`), so that 32 px images keep a 4 x 4 map, not 1 x 1, at the end;
`auto` (`resolve_stem`) picks it for images up to SMALL_STEM_MAX_SIZE pixels.

torchvision and timm are imported only when a backbone of theirs is built (see `Backbone.factory`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

SMALL_STEM_MAX_SIZE = 32
"""`model.stem: auto` uses the small stem for `preprocess.image_size` <= this, the ImageNet stem above
(the one place of the threshold; to be revisited once the CPU cost of the small stem at 64 px is measured)."""

STEMS = ("auto", "imagenet", "small")


@dataclass(frozen=True)
class Backbone:
    """How to build one network as a flat-feature extractor."""

    factory: Callable[..., nn.Module] | str
    """A callable taking `weights=` (None: random init), or the name of a `torchvision.models` builder
    (imported on first use: importing torchvision costs ~10 s on 2 cores, mostly torch._dynamo through
    torchvision.ops, and timm ~2 s more, which a small_cnn stage process need not pay)."""
    weights: str
    """What `factory` gets as `weights` when pretrained weights are downloaded (torchvision: DEFAULT)."""
    strip: Callable[[nn.Module], int]
    """Replace the classifier with Identity in place; return the feature dimension."""

    def build(self, pretrained: bool) -> tuple[nn.Module, int]:
        factory = self.factory
        if isinstance(factory, str):
            from torchvision import models as tvm

            factory = getattr(tvm, factory)
        net = factory(weights=self.weights if pretrained else None)
        return net, self.strip(net)


def _strip_fc(net: nn.Module) -> int:
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return dim


def _strip_classifier(net: nn.Module) -> int:
    first_linear = next(m for m in net.classifier.modules() if isinstance(m, nn.Linear))
    net.classifier = nn.Identity()
    return first_linear.in_features


def _strip_convnext(net: nn.Module) -> int:
    dim = net.classifier[-1].in_features
    net.classifier[-1] = nn.Identity()
    return dim


CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")
"""Where torchvision classifiers keep their classification layer."""


def _strip_last_linear(net: nn.Module, name: str) -> int:
    """Any torchvision classifier: the last Linear under `fc`, `classifier`, `heads` or `head` becomes
    Identity (hidden classifier layers, e.g. VGG's 4096-wide ones, stay: they are pretrained too);
    return its input width."""
    for attr in CLASSIFIER_ATTRS:
        container = getattr(net, attr, None)
        if not isinstance(container, nn.Module):
            continue
        linears = [n for n, m in container.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            path = f"{attr}.{linears[-1]}" if linears[-1] else attr
            dim = net.get_submodule(path).in_features
            net.set_submodule(path, nn.Identity())
            return dim
    raise ValueError(
        f"backbone {name!r} ({type(net).__name__}): no Linear classifier found under "
        f"{', '.join(CLASSIFIER_ATTRS)} to remove; pick another model"
    )


def _create_timm(name: str, weights: str | None = None) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=weights is not None, num_classes=0)


def _timm_feature_dim(net: nn.Module) -> int:
    """num_classes=0 already made timm's classifier an Identity; the output is the head's pre-logits,
    whose width is `head_hidden_size` (wider than `num_features` where the head has a layer of its
    own, e.g. MobileNetV3's conv_head)."""
    return int(getattr(net, "head_hidden_size", None) or net.num_features)


def _timm_backbone(name: str) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (model.backbone 'timm:{name}'); list them with timm.list_models()")
    return Backbone(partial(_create_timm, name), "pretrained", _timm_feature_dim)


def _torchvision_classifiers() -> list[str]:
    from torchvision import models as tvm

    return tvm.list_models(module=tvm)  # classification only (not detection, segmentation, video)


def _torchvision_backbone(name: str) -> Backbone:
    from torchvision import models as tvm

    if name not in _torchvision_classifiers():
        raise ValueError(
            f"unknown torchvision classification model {name!r} (model.backbone 'tv:{name}'); list them with "
            "torchvision.models.list_models(module=torchvision.models)"
        )
    return Backbone(partial(tvm.get_model, name), "DEFAULT", partial(_strip_last_linear, name=f"tv:{name}"))


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


BACKBONE_SOURCES: dict[str, Callable[[str], Backbone]] = {
    "timm": _timm_backbone,
    "tv": _torchvision_backbone,
    "torchvision": _torchvision_backbone,
}
"""`model.backbone` prefixes naming a library: `timm:convnext_nano`, `tv:regnet_x_400mf`."""

UNPREFIXED_LOOKUP: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("tv", lambda name: name in _torchvision_classifiers()),
    ("timm", _is_timm_model),
)
"""Where an unprefixed name that is not in BACKBONES is looked up, in order."""


class SmallConvNet(nn.Module):
    """A four-block CNN for quick runs and tests (not from torchvision; no pretrained weights).

    `norm="group"`: GroupNorm (Wu & He, "Group Normalization", ECCV 2018) instead of BatchNorm, which
    normalises each sample on its own, so what a step computes does not depend on how the batch is
    split: N processes on CPU (where PyTorch has no SyncBatchNorm) train exactly as one does."""

    def __init__(self, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (width, width * 2, width * 4, width * 8):
            normalise = nn.GroupNorm(8, c_out) if norm == "group" else nn.BatchNorm2d(c_out)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), normalise, nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _small_cnn(weights: str | None = None, norm: str = "batch") -> nn.Module:
    if weights:
        raise ValueError("backbone 'small_cnn' has no pretrained weights; set model.pretrained: false")
    return SmallConvNet(norm=norm)


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone("resnet18", "DEFAULT", _strip_fc),
    "resnet34": Backbone("resnet34", "DEFAULT", _strip_fc),
    "resnet50": Backbone("resnet50", "DEFAULT", _strip_fc),
    "mobilenet_v3_small": Backbone("mobilenet_v3_small", "DEFAULT", _strip_classifier),
    "mobilenet_v3_large": Backbone("mobilenet_v3_large", "DEFAULT", _strip_classifier),
    "efficientnet_b0": Backbone("efficientnet_b0", "DEFAULT", _strip_classifier),
    "convnext_tiny": Backbone("convnext_tiny", "DEFAULT", _strip_convnext),
    "small_cnn": Backbone(_small_cnn, "", lambda net: net.out_dim),
    "small_cnn_gn": Backbone(partial(_small_cnn, norm="group"), "", lambda net: net.out_dim),
}


def resolve_backbone(name: str) -> Backbone:
    """How to build `model.backbone` `name` (see the module docstring for the order of look-up)."""
    if name in BACKBONES:
        return BACKBONES[name]
    prefix, sep, rest = name.partition(":")
    if sep:
        if prefix not in BACKBONE_SOURCES:
            raise ValueError(
                f"unknown model.backbone prefix {prefix!r} in {name!r}; use one of: "
                + ", ".join(f"{p}:<name>" for p in BACKBONE_SOURCES)
            )
        return BACKBONE_SOURCES[prefix](rest)
    for source, knows in UNPREFIXED_LOOKUP:
        if knows(name):
            return BACKBONE_SOURCES[source](name)
    raise ValueError(
        f"unknown model.backbone {name!r}; available: {', '.join(sorted(BACKBONES))}, or any torchvision "
        "classification model ('tv:<name>'; list: torchvision.models.list_models(module=torchvision.models)) "
        "or timm model ('timm:<name>'; list: timm.list_models())"
    )


# --- the small (CIFAR-style) stem ------------------------------------------------------------------


def is_instance_of(net: nn.Module, qualname: str) -> bool:
    """isinstance(net, <module.Class>) without importing the library: were `net` of that class, its
    module would already be imported."""
    module, _, cls_name = qualname.rpartition(".")
    cls = getattr(sys.modules.get(module), cls_name, None)
    return isinstance(cls, type) and isinstance(net, cls)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as ResNets initialise
    return conv


def _resnet_small(net: nn.Module) -> tuple[str, ...]:
    """torchvision / timm ResNet: the 7x7 stride-2 conv1 becomes a new 3x3 stride-1 conv (same width)
    and maxpool Identity. A timm deep stem (3x3 convs: resnet10t, resnet50d, ...) keeps its convs (and
    their pretrained weights) with its first conv at stride 1."""
    reinitialised = ["maxpool"]  # a plain MaxPool2d has no weights; some timm variants pool with a conv
    if isinstance(net.conv1, nn.Conv2d):
        net.conv1 = _conv3x3(net.conv1.in_channels, net.conv1.out_channels)
        reinitialised.append("conv1")
    else:
        next(m for m in net.conv1.modules() if isinstance(m, nn.Conv2d)).stride = (1, 1)
    net.maxpool = nn.Identity()
    return tuple(reinitialised)


def _first_conv_stride_1(first: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], tuple[str, ...]]:
    """Families whose stem is one stride-2 3x3 conv (no pooling): that conv at stride 1, weights kept
    (the network then downsamples 16x instead of 32x)."""

    def apply(net: nn.Module) -> tuple[str, ...]:
        conv = next(m for m in first(net).modules() if isinstance(m, nn.Conv2d))
        conv.stride = (1, 1)
        return ()

    return apply


@dataclass(frozen=True)
class SmallStem:
    """How one family of networks gets the small stem."""

    family: str
    cls: str
    """`module.Class` of the networks of the family (checked without importing the library)."""
    apply: Callable[[nn.Module], tuple[str, ...]]
    """Change the network in place; return the state-dict prefixes of the modules it replaced (their
    pretrained weights no longer fit and are not loaded)."""


_features_0 = _first_conv_stride_1(lambda net: net.features[0])
_conv_stem = _first_conv_stride_1(lambda net: net.conv_stem)

SMALL_STEMS: tuple[SmallStem, ...] = (
    SmallStem("torchvision ResNet", "torchvision.models.resnet.ResNet", _resnet_small),
    SmallStem("timm ResNet", "timm.models.resnet.ResNet", _resnet_small),
    SmallStem("torchvision MobileNetV2", "torchvision.models.mobilenetv2.MobileNetV2", _features_0),
    SmallStem("torchvision MobileNetV3", "torchvision.models.mobilenetv3.MobileNetV3", _features_0),
    SmallStem("torchvision EfficientNet", "torchvision.models.efficientnet.EfficientNet", _features_0),
    SmallStem("timm EfficientNet", "timm.models.efficientnet.EfficientNet", _conv_stem),
    SmallStem("timm MobileNetV3", "timm.models.mobilenetv3.MobileNetV3", _conv_stem),
)
"""The families `model.stem: small` supports (small_cnn too: it has no downsampling stem, so the stem
setting leaves it unchanged)."""


def small_stem_for(net: nn.Module) -> SmallStem | None:
    return next((s for s in SMALL_STEMS if is_instance_of(net, s.cls)), None)


def apply_small_stem(net: nn.Module, name: str) -> tuple[str, ...]:
    """Give `net` (backbone `name`) the small stem in place; return the replaced state-dict prefixes."""
    if isinstance(net, SmallConvNet):
        return ()
    stem = small_stem_for(net)
    if stem is None:
        raise ValueError(
            f"model.stem: small is not available for backbone {name!r} ({type(net).__name__}); supported: "
            + ", ".join(s.family for s in SMALL_STEMS)
            + ", small_cnn (unchanged); use model.stem: imagenet"
        )
    return stem.apply(net)


def resolve_stem(stem: str, image_size: int, backbone: str) -> str:
    """`imagenet` or `small` for `model.stem` `stem` on images of `image_size` px: `auto` means small up
    to SMALL_STEM_MAX_SIZE px where the backbone's family has a small stem, else imagenet (so that
    auto never fails). Resolved at train time and recorded in the model spec, which rebuilds it."""
    if stem not in STEMS:
        raise ValueError(f"model.stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if stem != "auto":
        return stem
    if image_size > SMALL_STEM_MAX_SIZE:
        return "imagenet"
    net, _ = resolve_backbone(backbone).build(False)  # random init: only its class matters
    if isinstance(net, SmallConvNet) or small_stem_for(net) is not None:
        return "small"
    log.info("model.stem auto: %s (%s) has no small stem; using the ImageNet stem", backbone, type(net).__name__)
    return "imagenet"


# --- pretrained weights from a local file -----------------------------------------------------------


def _read_safetensors(path: Path) -> Any:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _read_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never runs pickled code


WEIGHT_READERS: dict[str, Callable[[Path], Any]] = {
    ".safetensors": _read_safetensors,
    ".pth": _read_torch,
    ".pt": _read_torch,
}
"""Readers of `model.pretrained` files by suffix (config.ModelConfig.WEIGHT_SUFFIXES lists the same)."""


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path` (a training checkpoint's `state_dict` / `model` entry is unwrapped);
    ValueError naming the file if it is missing, unreadable or holds anything else."""
    reader = WEIGHT_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"pretrained weights file {path}: unsupported suffix {path.suffix!r}; use {', '.join(WEIGHT_READERS)}")
    if not path.is_file():
        raise ValueError(f"pretrained weights file {path} not found")
    try:
        state = reader(path)
    except Exception as err:  # corrupt file, or a pickle weights_only refuses
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"pretrained weights file {path} cannot be read: {type(err).__name__}: {first_line}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            if not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = state[key]
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"pretrained weights file {path} does not hold a state dict (parameter names -> tensors)")
    return dict(state)


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _in_stripped_module(net: nn.Module, key: str) -> bool:
    """Whether `key` belongs to a module that stripping replaced by Identity (the library's classifier,
    e.g. fc.*, head.fc.*, classifier.*): the deepest existing module on its path is an Identity."""
    parts = key.split(".")[:-1]
    for i in range(len(parts), 0, -1):
        try:
            return isinstance(net.get_submodule(".".join(parts[:i])), nn.Identity)
        except AttributeError:
            continue
    return False


def _few(keys: Sequence[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"


def load_pretrained_file(net: nn.Module, path: Path, name: str, replaced: Sequence[str] = ()) -> None:
    """Load the stripped backbone `net` (built as `name`) from the state dict in `path`, as the
    library's own model has it (a timm / torchvision checkpoint, classifier included).

    The classifier's keys, which the stripped net lacks, are dropped; so are those of the stem modules
    the small stem replaced (`replaced`; logged as a warning: they start from random init). Everything
    else must match exactly: missing or unexpected keys, or a shape mismatch, are a ValueError naming
    the file."""
    state = read_weights_file(path)
    own = net.state_dict()
    stem_keys = [k for k in state if _under(k, replaced)]
    classifier_keys = [k for k in state if k not in own and not _under(k, replaced) and _in_stripped_module(net, k)]
    if stem_keys:
        log.warning(
            "%s: not loading %s: model.stem small replaced those layers, which start from random init",
            path, _few(stem_keys),
        )  # fmt: skip
    skip = set(stem_keys) | set(classifier_keys)
    try:
        result = net.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"pretrained weights file {path} does not fit backbone {name!r}: {' '.join(str(err).split())}") from None
    missing = [k for k in result.missing_keys if not _under(k, replaced)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"pretrained weights file {path} does not match backbone {name!r}: missing keys {_few(missing)}; "
            f"unexpected keys {_few(result.unexpected_keys)}"
        )
    log.info("backbone %s: %d tensors loaded from %s (classifier keys dropped: %s)", name,
             len(state) - len(skip), path, _few(classifier_keys))  # fmt: skip


def build_backbone(
    name: str, pretrained: bool | str | Path = False, stem: str = "imagenet"
) -> tuple[nn.Module, int]:
    """(feature extractor, feature dimension) of backbone `name`.

    `pretrained`: False (random init), True (the library downloads its weights) or the path of a local
    weights file (`load_pretrained_file`; resolve relative paths first, see ModelConfig.pretrained_weights).
    `stem`: `imagenet` (the network as published) or `small` (`apply_small_stem`); resolve `auto` first
    with `resolve_stem`."""
    if stem not in ("imagenet", "small"):
        raise ValueError(f"stem must be 'imagenet' or 'small' here, got {stem!r} (resolve_stem resolves 'auto')")
    net, dim = resolve_backbone(name).build(pretrained is True)
    replaced = apply_small_stem(net, name) if stem == "small" else ()
    if replaced and pretrained is True and any(_under(k, replaced) for k in net.state_dict()):
        log.warning("backbone %s: model.stem small replaced %s, which start from random init", name, ", ".join(replaced))
    if isinstance(pretrained, str | Path):
        load_pretrained_file(net, Path(pretrained), name, replaced)
    return net, dim
