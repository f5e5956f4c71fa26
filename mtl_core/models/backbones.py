"""Backbones: torchvision classifiers with their classification layer removed (`model.backbone`).

Each entry builds (feature extractor, feature dimension). Pretrained weights are an option the user
turns on (`model.pretrained: true`); they are downloaded by torchvision, so the default is off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Backbone:
    """How to build one torchvision network as a flat-feature extractor."""

    factory: Callable[..., nn.Module] | str
    """A callable, or the name of a `torchvision.models` builder (imported on first use: importing
    torchvision costs ~10 s on 2 cores, mostly torch._dynamo through torchvision.ops, which a
    small_cnn stage process need not pay)."""
    weights: str
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


class SmallConvNet(nn.Module):
    """A four-block CNN for quick runs and tests (not from torchvision; no pretrained weights)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (width, width * 2, width * 4, width * 8):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _small_cnn(weights: str | None = None) -> nn.Module:
    if weights:
        raise ValueError("backbone 'small_cnn' has no pretrained weights; set model.pretrained: false")
    return SmallConvNet()


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone("resnet18", "DEFAULT", _strip_fc),
    "resnet34": Backbone("resnet34", "DEFAULT", _strip_fc),
    "resnet50": Backbone("resnet50", "DEFAULT", _strip_fc),
    "mobilenet_v3_small": Backbone("mobilenet_v3_small", "DEFAULT", _strip_classifier),
    "mobilenet_v3_large": Backbone("mobilenet_v3_large", "DEFAULT", _strip_classifier),
    "efficientnet_b0": Backbone("efficientnet_b0", "DEFAULT", _strip_classifier),
    "convnext_tiny": Backbone("convnext_tiny", "DEFAULT", _strip_convnext),
    "small_cnn": Backbone(_small_cnn, "", lambda net: net.out_dim),
}


def build_backbone(name: str, pretrained: bool = False) -> tuple[nn.Module, int]:
    if name not in BACKBONES:
        raise ValueError(f"unknown model.backbone {name!r}; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name].build(pretrained)
