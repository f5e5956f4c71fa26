"""The backbones by name (`model.backbone`): image classifiers with their classification layer removed.

A name resolves (`resolve_backbone`), in order, to: an entry of `BACKBONES` (the project's short
names, incl. `small_cnn`); `timm:<name>` or `tv:<name>` / `torchvision:<name>` explicitly; else an
unprefixed name torchvision lists as a classification model, then one timm knows. Every build gives
(feature extractor (N, 3, H, W) -> (N, D), D).

torchvision and timm are imported only when a backbone of theirs is built (see `Backbone.factory`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from mtl_core.models.backbones.small_cnn import _small_cnn


@dataclass(frozen=True)
class PretrainedConfig:
    """How a backbone's pretrained weights expect their input: normalisation and native input size."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    source: str


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The normalisation of random-init training (`preprocess.mean: auto` without pretrained weights)."""


@dataclass(frozen=True)
class Backbone:
    """How to build one network as a flat-feature extractor."""

    factory: Callable[..., nn.Module] | str
    """A callable taking `weights=` (None: random init), or the name of a `torchvision.models` builder
    (imported on first use: importing torchvision costs ~10 s on 2 cores, mostly torch._dynamo through
    torchvision.ops, and timm ~2 s more, which a small_cnn stage process need not pay)."""
    weights: str | None
    """What `factory` gets as `weights` when pretrained weights are downloaded (torchvision: DEFAULT);
    None: the network has no pretrained weights (model.pretrained: true is refused)."""
    strip: Callable[[nn.Module], int]
    """Replace the classifier with Identity in place; return the feature dimension."""
    library: tuple[str, str] | None = None
    """("torchvision" | "timm", the library's model name): where the pretrained weights' own config is
    (`pretrained_config`); None for a network without pretrained weights (small_cnn)."""

    def pretrained_config(self) -> PretrainedConfig | None:
        """The normalisation and input size the library's pretrained weights were trained with (timm's
        `pretrained_cfg`, torchvision's weights transforms); None where the library has none."""
        if self.library is None:
            return None
        kind, name = self.library
        if kind == "timm":
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(name)
            if cfg is None or cfg.mean is None or cfg.std is None:
                return None
            return PretrainedConfig(tuple(cfg.mean), tuple(cfg.std), int(cfg.input_size[-1]), f"timm pretrained_cfg of {name}")
        from torchvision import models as tvm

        try:
            transforms = tvm.get_model_weights(name).DEFAULT.transforms()
        except (ValueError, AttributeError, KeyError):  # a model torchvision has no weights for
            return None
        return PretrainedConfig(
            tuple(transforms.mean), tuple(transforms.std), int(transforms.crop_size[0]),
            f"torchvision {name} DEFAULT weights transforms",
        )  # fmt: skip

    def build(self, pretrained: bool) -> tuple[nn.Module, int]:
        factory = self.factory
        if isinstance(factory, str):
            from torchvision import models as tvm

            factory = getattr(tvm, factory)
        if pretrained and self.weights is None:
            raise ValueError("this backbone has no pretrained weights; set model.pretrained: false")
        if not pretrained:
            net = factory(weights=None)
        else:
            try:
                net = factory(weights=self.weights)
            except Exception as err:  # no network, a proxy, a hub that is down: the download failed
                raise PretrainedDownloadError(
                    f"model.pretrained: true: the pretrained weights could not be downloaded ({type(err).__name__}: "
                    f"{_first_line(err)}); without network access, give a local weights file instead "
                    "(model.pretrained: weights/<file>.safetensors or .pth; docs: Models, Pretrained weights)"
                ) from err
        return net, self.strip(net)


class PretrainedDownloadError(RuntimeError):
    """`model.pretrained: true` and the library's weights could not be downloaded."""


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


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
    return Backbone(partial(_create_timm, name), "pretrained", _timm_feature_dim, ("timm", name))


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
    return Backbone(partial(tvm.get_model, name), "DEFAULT", partial(_strip_last_linear, name=f"tv:{name}"), ("torchvision", name))


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


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone("resnet18", "DEFAULT", _strip_fc, ("torchvision", "resnet18")),
    "resnet34": Backbone("resnet34", "DEFAULT", _strip_fc, ("torchvision", "resnet34")),
    "resnet50": Backbone("resnet50", "DEFAULT", _strip_fc, ("torchvision", "resnet50")),
    "mobilenet_v3_small": Backbone("mobilenet_v3_small", "DEFAULT", _strip_classifier, ("torchvision", "mobilenet_v3_small")),
    "mobilenet_v3_large": Backbone("mobilenet_v3_large", "DEFAULT", _strip_classifier, ("torchvision", "mobilenet_v3_large")),
    "efficientnet_b0": Backbone("efficientnet_b0", "DEFAULT", _strip_classifier, ("torchvision", "efficientnet_b0")),
    "convnext_tiny": Backbone("convnext_tiny", "DEFAULT", _strip_convnext, ("torchvision", "convnext_tiny")),
    "small_cnn": Backbone(_small_cnn, None, lambda net: net.out_dim),
    "small_cnn_gn": Backbone(partial(_small_cnn, norm="group"), None, lambda net: net.out_dim),
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
