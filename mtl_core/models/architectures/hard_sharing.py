"""`model.arch: hard_sharing`: one backbone, one linear head per task."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from torch import Tensor, nn

from mtl_core.models.architectures.base import MultiTaskModel, register_architecture
from mtl_core.models.architectures.heads import LinearHeads
from mtl_core.models.backbones import build_backbone


@register_architecture("hard_sharing")
class HardSharing(MultiTaskModel):
    """Hard parameter sharing (Caruana 1997): one backbone, one linear head per task.

    `dropout`: dropout on the shared features before the heads (training only; 0: none, no module). It
    draws from PyTorch's global random generator at every step, which a checkpoint saves and a resume
    restores (training.state); tests/test_resume.py resumes such a run bit for bit."""

    def __init__(
        self, num_classes: dict[str, int], backbone: str = "resnet18", pretrained: bool | str | Path = False,
        stem: str = "imagenet", dropout: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.arch_options.dropout must be in [0, 1), got {dropout}")
        self.backbone, dim = build_backbone(backbone, pretrained, stem)
        self.heads = LinearHeads(dim, num_classes)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def encode(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return self.heads(self.dropout(z) if self.dropout is not None else z)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The fused heads (`LinearHeads`: every task's are the same two Parameters; task t's loss
        reaches only its rows), so the shared parameters are exactly the backbone's."""
        return self.heads.parameters()
