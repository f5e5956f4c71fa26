"""`model.arch: cross_stitch`: one backbone per task, their activations mixed after every stage by learned
cross-stitch units (Misra et al. 2016)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from mtl_core.models.architectures.base import MultiTaskModel, register_architecture
from mtl_core.models.architectures.heads import LinearHeads
from mtl_core.models.backbones import build_backbone
from mtl_core.models.backbones.stage_split import split_stages


class CrossStitchUnit(nn.Module):
    """Mixes K task activations linearly: out_i = sum_j alpha[i, j] * in_j (alpha learned, K x K).

    Initialised to `alpha_same` on the diagonal and (1 - alpha_same) / (K - 1) off it, so rows sum to
    one (for K = 1 alpha is [[1]]: nothing to mix)."""

    def __init__(self, num_tasks: int, alpha_same: float = 0.9) -> None:
        super().__init__()
        self.alpha = nn.Parameter(self.initial_alpha(num_tasks, alpha_same))

    @staticmethod
    def initial_alpha(num_tasks: int, alpha_same: float = 0.9) -> Tensor:
        if num_tasks == 1:
            return torch.ones(1, 1)
        alpha = torch.full((num_tasks, num_tasks), (1.0 - alpha_same) / (num_tasks - 1))
        return alpha.fill_diagonal_(alpha_same)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        stacked = torch.stack(xs)  # (K, N, ...)
        return list(torch.einsum("ij,j...->i...", self.alpha.to(stacked.dtype), stacked).unbind(0))


@register_architecture("cross_stitch")
class CrossStitch(MultiTaskModel):
    """Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert 2016, "Cross-stitch Networks for
    Multi-task Learning", CVPR).

    One copy of the backbone per task (branch t), split into sequential stages (`stages.split_stages`:
    ResNet stem + layer1..4, small_cnn's conv blocks, ~4 groups of `features` for MobileNetV3 /
    EfficientNet / ConvNeXt). After every stage a cross-stitch unit (a learned K x K matrix, initialised
    to 0.9 on the diagonal and 0.1 / (K - 1) off it, the paper's (alpha_S, alpha_D) = (0.9, 0.1)) mixes
    the K branches' activations; each branch then pools its activations and task t's linear head reads
    branch t. With identity stitches the model is exactly K independent single-task networks.

    Shared / task-specific (the honest consequence of one backbone per task): task t's parameters are
    its backbone copy and its head; `shared_parameters()` are only the cross-stitch units. Hence
    gradient-balancing methods with `on: params` balance only the stitch units; each branch and head is
    trained on the gradient of its own task's loss alone (the gradient other tasks' losses send into
    branch t through the stitches is dropped; loss-weighting methods such as `equal` backpropagate the
    weighted sum and keep it). `encode` returns the stacked per-task final features (N, K, D) and
    `decode` applies head t to slice t. Caveat for `on: representation`: the branches lie before that
    representation, so each branch would get its own task's gradient directly AND the combined
    gradient through the representation; use `on: params` (or `task_specific_branches=False`, which
    makes everything but the heads shared, so that gradient balancing acts on all K backbones and the
    stitches -- K x K x P memory for `on: params` -- and `on: representation` is exact).

    Cost relative to hard sharing: K x the backbone -- K x the parameters, FLOPs and activation memory
    (e.g. 3 tasks on resnet18: 33.5 M instead of 11.2 M parameters) -- plus K^2 parameters per stitch
    unit and one K-way mix of each stage's activations. The paper also trains the stitch units with a
    larger learning rate than the rest; here they use the optimizer's learning rate like every parameter.
    """

    def __init__(
        self,
        num_classes: dict[str, int],
        backbone: str = "resnet18",
        pretrained: bool | str | Path = False,
        alpha_same: float = 0.9,
        task_specific_branches: bool = True,
        stem: str = "imagenet",
    ) -> None:
        super().__init__(num_classes)
        self.backbone_name = backbone
        self.task_specific_branches = task_specific_branches
        self.branches = nn.ModuleDict()
        self.pools = nn.ModuleDict()
        dims = set()
        for t in self.task_names:
            net, dim = build_backbone(backbone, pretrained, stem)
            stages, pool = split_stages(net, backbone)
            self.branches[t], self.pools[t] = stages, pool
            dims.add(dim)
        (dim,) = dims
        num_stages = len(self.branches[self.task_names[0]])
        self.stitches = nn.ModuleList(CrossStitchUnit(len(self.task_names), alpha_same) for _ in range(num_stages))
        self.heads = LinearHeads(dim, num_classes)

    @property
    def exact_representation_gradients(self) -> bool:
        return not self.task_specific_branches

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every task's backbone copy (branch + pool), task-specific or not; not the stitch units."""
        return [p for t in self.task_names for m in (self.branches[t], self.pools[t]) for p in m.parameters()]

    def last_shared_layer(self) -> None:
        """None: with per-task branches the only shared parameters are the K x K stitches (the last
        one mixes final activations, not a layer every task's features are computed by)."""
        return None

    def encode(self, x: Tensor) -> Tensor:
        hs = [x] * len(self.task_names)
        for s, stitch in enumerate(self.stitches):
            hs = stitch([self.branches[t][s](h) for t, h in zip(self.task_names, hs)])
        return torch.stack([self.pools[t](h) for t, h in zip(self.task_names, hs)], dim=1)  # (N, K, D)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return self.heads.per_task(z)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if self.task_specific_branches:
            yield from self.branches[task].parameters()
            yield from self.pools[task].parameters()
        yield from self.heads.parameters()  # fused (see `LinearHeads`)
