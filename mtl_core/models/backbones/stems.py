"""`model.stem`: the small (CIFAR-style) stem for small images.

`small` replaces the ImageNet stem (which downsamples 4x before the first block) by a CIFAR-style one
(`apply_small_stem`), so that 32 px images keep a 4 x 4 map, not 1 x 1, at the end; `auto`
(`resolve_stem`) picks it for images up to SMALL_STEM_MAX_SIZE pixels.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mtl_core.models.backbones.registry import resolve_backbone
from mtl_core.models.backbones.small_cnn import SmallConvNet

log = logging.getLogger(__name__)

SMALL_STEM_MAX_SIZE = 32
"""`model.stem: auto` uses the small stem for `preprocess.image_size` <= this, the ImageNet stem above
(the one place of the threshold; to be revisited once the CPU cost of the small stem at 64 px is measured)."""

STEMS = ("auto", "imagenet", "small")


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
