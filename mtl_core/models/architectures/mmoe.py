"""`model.arch: mmoe`: shared experts mixed per task by a softmax gate (Ma et al. 2018)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_core.models.architectures.base import MultiTaskModel, register_architecture
from mtl_core.models.architectures.heads import LinearHeads
from mtl_core.models.backbones import build_backbone


@register_architecture("mmoe")
class MultiGateMixtureOfExperts(MultiTaskModel):
    """Multi-gate Mixture-of-Experts, MMoE (Ma, Zhao, Yi, Chen, Hong & Chi 2018, "Modeling Task
    Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD).

    The backbone gives features f (N, D). `num_experts` shared experts (each Linear(D, H) + ReLU, H =
    `expert_dim`, default D // 2) map f to e_1..e_E (N, H); each task t has its own softmax gate
    g_t = softmax(Linear(D, E)(f)) and head: logits_t = head_t(sum_e g_t,e * e_e).

    Shared / task-specific: backbone + experts are shared; task t's gate and head are its own.
    Representation (`encode`): concat(f, e_1, ..., e_E) of shape (N, D + E*H) -- everything the gates
    and heads need, so `decode` holds exactly the task-specific parameters and representation-gradient
    methods (`on: representation`) see the losses depend on the backbone and experts only through it.

    Cost relative to hard sharing: the same backbone pass, plus E*(D*H + H) expert parameters,
    K*(D*E + E) gate parameters and heads on H instead of D inputs (resnet18, D=512, E=4, H=256:
    ~0.53 M extra parameters on an 11.2 M backbone); compute and memory are a few small matmuls on
    (N, D) features -- negligible next to the backbone. `on: representation` costs K*N*(D + E*H)
    floats instead of K*N*D.
    """

    def __init__(
        self,
        num_classes: dict[str, int],
        backbone: str = "resnet18",
        pretrained: bool | str | Path = False,
        num_experts: int = 4,
        expert_dim: int | None = None,
        stem: str = "imagenet",
    ) -> None:
        super().__init__(num_classes)
        if num_experts < 1:
            raise ValueError(f"mmoe needs at least one expert, got num_experts={num_experts}")
        self.backbone, dim = build_backbone(backbone, pretrained, stem)
        self.feature_dim = dim
        self.num_experts = num_experts
        self.expert_dim = expert_dim or max(dim // 2, 1)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, self.expert_dim), nn.ReLU()) for _ in range(num_experts)
        )
        self.gates = LinearHeads(dim, {t: num_experts for t in num_classes})
        self.heads = LinearHeads(self.expert_dim, num_classes)

    def encode(self, x: Tensor) -> Tensor:
        f = self.backbone(x)
        experts = torch.stack([expert(f) for expert in self.experts], dim=1)  # (N, E, H)
        return torch.cat([f, experts.flatten(1).to(f.dtype)], dim=1)

    def split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The representation split back into features f (N, D) and expert outputs (N, E, H)."""
        return z[:, : self.feature_dim], z[:, self.feature_dim :].unflatten(1, (self.num_experts, self.expert_dim))

    def gate(self, task: str, f: Tensor) -> Tensor:
        """Task `task`'s mixture weights (N, E): a softmax over the experts."""
        return torch.softmax(self.gates[task](f), dim=1)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """All K gates in one matmul, all K mixtures in one einsum, all K heads in one `per_task`."""
        f, experts = self.split(z)
        gates = torch.softmax(F.linear(f, self.gates.weight, self.gates.bias).unflatten(1, (len(self.task_names), self.num_experts)), dim=2)
        mixtures = torch.einsum("nke,neh->nkh", gates.to(experts.dtype), experts)  # (N, K, H)
        return self.heads.per_task(mixtures)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The fused gates and heads (see `LinearHeads`)."""
        yield from self.gates.parameters()
        yield from self.heads.parameters()

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone alone: the experts are shared, but newly initialised like the gates and heads."""
        return list(self.backbone.parameters())

    def last_shared_layer(self) -> None:
        """None: the experts run side by side, so no one shared layer sees every task's gradient (the
        last registered parameter is one expert's weight)."""
        return None
