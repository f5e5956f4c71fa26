"""MGDA / MGDA-UB: multiple-gradient descent as multi-objective optimisation. Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_core.weighting.base import register_weighting
from mtl_core.weighting.gradients import GradientBalancing, combine, gram_matrix

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _segment_min(aa: float, ab: float, bb: float) -> float:
    """argmin_{gamma in [0, 1]} |(1 - gamma) a + gamma b|^2 given a.a, a.b, b.b."""
    denom = aa - 2 * ab + bb
    if denom <= 1e-30:
        return 0.0
    return float(np.clip((aa - ab) / denom, 0.0, 1.0))


def min_norm_weights(gram: Tensor, max_iter: int = 250, tol: float = 1e-10) -> Tensor:
    """w on the simplex minimising |sum_k w_k g_k|^2 = w^T M w (M the Gram matrix), by Frank-Wolfe.

    As the official MinNormSolver: start from the best closed-form two-task solution over all pairs,
    then Frank-Wolfe steps towards the vertex e_t with the smallest (M w)_t, with exact line search.
    For K = 2 the start is already exact.
    """
    m = gram.double().numpy()
    k = m.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    best, w = np.inf, np.full(k, 1.0 / k)
    for i, j in combinations(range(k), 2):
        gamma = _segment_min(m[i, i], m[i, j], m[j, j])  # weight on j
        value = (1 - gamma) ** 2 * m[i, i] + 2 * gamma * (1 - gamma) * m[i, j] + gamma**2 * m[j, j]
        if value < best:
            best, w = value, np.zeros(k)
            w[i], w[j] = 1 - gamma, gamma
    for _ in range(max_iter):
        mw = m @ w
        t = int(np.argmin(mw))
        gamma = _segment_min(float(w @ mw), float(mw[t]), float(m[t, t]))
        step = -gamma * w
        step[t] += gamma
        w = w + step
        if np.abs(step).sum() < tol:
            break
    return torch.from_numpy(w)


def mgda_weights(gram: Tensor, losses: Tensor | None = None, normalize: str = "none") -> Tensor:
    """Effective weights: the min-norm solution computed on gradients g_t / n_t (n_t from `normalize`:
    none 1, l2 |g_t|, loss L_t, loss+ L_t |g_t|) and, as in the official code, applied to the
    UNnormalised gradients (the MGDA scales multiply the raw task losses)."""
    gram = gram.double()
    norms = torch.sqrt(torch.clamp(torch.diagonal(gram), min=0))
    if normalize == "none":
        n = torch.ones_like(norms)
    elif normalize == "l2":
        n = norms
    elif normalize in ("loss", "loss+"):
        if losses is None:
            raise ValueError(f"normalize={normalize!r} needs the losses")
        n = losses.double() * (norms if normalize == "loss+" else 1.0)
    else:
        raise ValueError(f"mgda option normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    n = torch.clamp(n, min=1e-12)
    return min_norm_weights(gram / torch.outer(n, n))


def mgda_combine(grads: Tensor, losses: Tensor | None = None, normalize: str = "none") -> Tensor:
    return combine(grads, mgda_weights(gram_matrix(grads), losses, normalize))


@register_weighting("mgda")
class MGDA(GradientBalancing):
    """MGDA (Sener & Koltun, 2018): step along the minimum-norm point of the convex hull of the task
    gradients, min_{w in simplex} |sum_t w_t g_t|, found by Frank-Wolfe; a common descent direction
    for all tasks (zero at a Pareto-stationary point). With `on: representation` this is MGDA-UB, the
    paper's efficient upper-bound variant on the shared representation.

    Options: `normalize` (none | l2 | loss | loss+, default none: the plain min-norm point of the raw
    gradients, as in the paper's theory; the official repo's normalisers rescale the gradients before
    the solve only), `on` (auto | params | representation; default auto, see weighting.gradients).
    Cost per step: `on: params` -- K backward passes through the network, K x P memory;
    `on: representation` -- K backward passes through the heads + 1 through the backbone,
    K x (batch x features) memory. Frank-Wolfe runs on the K x K Gram matrix (negligible).
    """

    def __init__(self, task_names: Sequence[str], *, normalize: str = "none", **options: Any) -> None:
        super().__init__(task_names, **options)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"mgda option normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize

    def combine_weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        return mgda_weights(gram, losses, self.normalize)
