"""Multi-task architectures (`model.arch`): a registry of classes with one interface.

Every architecture maps images to one logit tensor per task and separates its parameters into the
shared part and each task's own part, which gradient-balancing methods need. `encode` returns the
shared representation and `decode` the per-task logits, so representation-gradient methods (MGDA-UB
style) can differentiate with respect to the representation.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from mtl_core.models.backbones import build_backbone


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

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        private = {id(p) for t in self.task_names for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in private]


ARCHITECTURES: dict[str, type[MultiTaskModel]] = {}


def register_architecture(name: str) -> Callable[[type[MultiTaskModel]], type[MultiTaskModel]]:
    def deco(cls: type[MultiTaskModel]) -> type[MultiTaskModel]:
        ARCHITECTURES[name] = cls
        return cls

    return deco


@register_architecture("hard_sharing")
class HardSharing(MultiTaskModel):
    """Hard parameter sharing (Caruana 1997): one backbone, one linear head per task."""

    def __init__(self, num_classes: dict[str, int], backbone: str = "resnet18", pretrained: bool = False) -> None:
        super().__init__(num_classes)
        self.backbone, dim = build_backbone(backbone, pretrained)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, n) for t, n in num_classes.items()})

    def encode(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: head(z) for t, head in self.heads.items()}

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()


def build_model(arch: str, num_classes: dict[str, int], backbone: str, pretrained: bool = False) -> MultiTaskModel:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {arch!r}; available: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](num_classes, backbone=backbone, pretrained=pretrained)


@torch.no_grad()
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
