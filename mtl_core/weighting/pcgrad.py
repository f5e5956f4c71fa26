"""PCGrad: gradient surgery. Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_core.weighting.base import register_weighting
from mtl_core.weighting.gradients import GradientBalancing, combine, gram_matrix


def pcgrad_weights(gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Coefficients w (K,) with sum_i g_i^PC = sum_k w_k g_k, computed on the Gram matrix alone.

    For each task i (Algorithm 1): g_i^PC starts at g_i and, for every other task j in a random order
    (a fresh permutation per i, as the official code shuffles per task), if g_i^PC . g_j < 0 it is
    projected onto the normal plane of g_j: g_i^PC -= (g_i^PC . g_j / |g_j|^2) g_j. Tracking g_i^PC as
    coefficients over the original gradients keeps everything K x K. generator=None: fixed order 0..K-1.
    """
    k = gram.shape[0]
    g = gram.double().numpy()  # NumPy, not tensor ops: the K^2 tiny steps cost ~75 ms as tensors at K = 40
    coef = np.eye(k)
    for i in range(k):
        order = torch.randperm(k, generator=generator).tolist() if generator is not None else range(k)
        for j in order:
            if j == i or g[j, j] <= 0:
                continue
            dot = coef[i] @ g[:, j]
            if dot < 0:
                coef[i, j] -= dot / g[j, j]
    return torch.from_numpy(coef.sum(0))


def pcgrad_combine(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """sum_i g_i^PC for per-task gradients grads (K, D)."""
    return combine(grads, pcgrad_weights(gram_matrix(grads), generator))


@register_weighting("pcgrad")
class PCGrad(GradientBalancing):
    """PCGrad (Yu et al., 2020): project each task gradient onto the normal plane of every task gradient
    it conflicts with (negative dot product), in a random task order, and sum the projected gradients.

    Options: `seed` (int, default 0) seeds the random task order; `on` (auto | params | representation; default auto, see weighting.gradients).
    Cost per step: `on: params` -- K backward passes through the network, K x P memory for the
    per-task gradients; `on: representation` -- K backward passes through the heads + 1 through the
    backbone, K x (batch x features) memory. The projections are O(K^2) on the K x K Gram matrix.
    """

    def __init__(self, task_names: Sequence[str], *, seed: int = 0, **options: Any) -> None:
        super().__init__(task_names, **options)
        self.generator = torch.Generator().manual_seed(int(seed))

    def combine_weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        return pcgrad_weights(gram, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
