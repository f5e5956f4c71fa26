"""The interface every multi-task architecture implements (`MultiTaskModel`), and their registry.

Every architecture maps images to one logit tensor per task and separates its parameters into the
shared part and each task's own part, which gradient-balancing methods need. `encode` returns the
shared representation and `decode` the per-task logits, so representation-gradient methods (MGDA-UB
style) can differentiate with respect to the representation. One architecture per file in this folder,
registered by name (`model.arch`) with `register_architecture`.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import Tensor, nn


class MultiTaskModel(nn.Module):
    """Base class: images (N, 3, H, W) -> {task: logits (N, C_task)}."""

    def __init__(self, num_classes: dict[str, int]) -> None:
        super().__init__()
        self.task_names = list(num_classes)
        self.num_classes = dict(num_classes)

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """The shared representation."""

    @abstractmethod
    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Per-task logits from the shared representation."""

    @abstractmethod
    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters used by one task only."""

    @property
    def exact_representation_gradients(self) -> bool:
        """Whether task losses reach every task-specific parameter only after `encode` (so methods with
        `on: representation` compute exact gradients). False when task-specific parameters sit inside
        the encoder (cross-stitch branches)."""
        return True

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        private = {id(p) for t in self.task_names for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in private]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone network's parameters (what `model.pretrained` initialises), which get
        `train.backbone_lr_scale` x the learning rate and are frozen for `train.freeze_backbone_epochs`:
        by default the shared parameters (hard sharing: exactly the backbone). Overridden where the
        split differs: MMoE's experts are shared but new, cross-stitch's backbones are per task."""
        return self.shared_parameters()

    def last_shared_layer(self) -> list[nn.Parameter] | None:
        """The weight of the last layer every task's output goes through (GradNorm's W): by default the
        last trainable shared parameter with >= 2 dims, in registration (= forward) order. None where
        there is no single one (overridden by MMoE and cross-stitch)."""
        for p in reversed(self.shared_parameters()):
            if p.requires_grad and p.dim() >= 2:
                return [p]
        return None


ARCHITECTURES: dict[str, type[MultiTaskModel]] = {}


def register_architecture(name: str) -> Callable[[type[MultiTaskModel]], type[MultiTaskModel]]:
    def deco(cls: type[MultiTaskModel]) -> type[MultiTaskModel]:
        ARCHITECTURES[name] = cls
        return cls

    return deco


BACKBONE_ARGUMENTS = ("backbone", "pretrained", "stem")
"""How every architecture's constructor is told its backbone (see backbones.build_backbone); the
other keyword arguments are its `model.arch_options`."""


def build_model(
    arch: str,
    num_classes: dict[str, int],
    backbone: str,
    pretrained: bool | str | Path = False,
    options: dict | None = None,
    stem: str = "imagenet",
) -> MultiTaskModel:
    """The architecture `arch` on `backbone` (with `pretrained` weights and `stem`, as build_backbone
    takes them); `options` (params' `model.arch_options`) are its keyword arguments, e.g. `num_experts`
    for mmoe; an unknown one fails naming the ones `arch` takes."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {arch!r}; available: {', '.join(sorted(ARCHITECTURES))}")
    cls = ARCHITECTURES[arch]
    options = dict(options or {})
    skip = ("self", "num_classes", *BACKBONE_ARGUMENTS)
    allowed = [n for n in inspect.signature(cls.__init__).parameters if n not in skip]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown model.arch_options {unknown} for arch {arch!r}; allowed: {', '.join(allowed) or 'none'}"
        )
    return cls(num_classes, backbone=backbone, pretrained=pretrained, stem=stem, **options)
