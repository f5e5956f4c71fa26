"""CAGrad: conflict-averse gradient descent. Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient
Descent for Multi-task Learning", NeurIPS 2021."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_core.weighting.base import register_weighting
from mtl_core.weighting.gradients import GradientBalancing, combine, gram_matrix


def cagrad_dual(gram: Tensor, c: float) -> np.ndarray:
    """The dual weights w on the simplex: argmin_w g_w . g_0 + c |g_0| |g_w| (g_0 = mean gradient).

    Solved with scipy.optimize.minimize (SLSQP, bounds [0, 1], sum w = 1, start at 1/K) exactly as the
    official implementation; the Gram matrix is first divided by its mean diagonal, which leaves the
    minimiser unchanged (the objective is homogeneous of degree 1 in the Gram matrix).
    """
    k = gram.shape[0]
    a = gram.double().numpy()
    scale = float(np.mean(np.diag(a)))
    if scale <= 0:
        return np.full(k, 1.0 / k)
    a = a / scale
    b = np.full(k, 1.0 / k)
    cc = c * np.sqrt(max(b @ a @ b, 0.0) + 1e-8) + 1e-8

    def objective(x: np.ndarray) -> float:
        return float(x @ a @ b + cc * np.sqrt(max(x @ a @ x, 0.0) + 1e-8))

    from scipy.optimize import minimize  # here: scipy.optimize costs every stage process ~1 s at import

    res = minimize(
        objective,
        b.copy(),
        bounds=[(0.0, 1.0)] * k,
        constraints=({"type": "eq", "fun": lambda x: 1.0 - x.sum()},),
    )
    return res.x


def cagrad_weights(gram: Tensor, c: float = 0.4, rescale: int = 1) -> Tensor:
    """Coefficients w (K,) of d = g_0 + (c |g_0| / |g_w|) g_w, divided by (1 + c^2) (rescale=1,
    official default), by (1 + c) (rescale=2) or not at all (rescale=0). c = 0 gives the mean gradient."""
    k = gram.shape[0]
    gram = gram.double()
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if c == 0:
        return mean
    w = torch.from_numpy(cagrad_dual(gram, c))
    g0_norm = torch.sqrt(torch.clamp(mean @ gram @ mean, min=0) + 1e-8)
    gw_norm = torch.sqrt(torch.clamp(w @ gram @ w, min=0))
    lam = c * g0_norm / (gw_norm + 1e-8)
    coef = mean + lam * w
    if rescale == 1:
        coef = coef / (1 + c**2)
    elif rescale == 2:
        coef = coef / (1 + c)
    return coef


def cagrad_combine(grads: Tensor, c: float = 0.4, rescale: int = 1) -> Tensor:
    return combine(grads, cagrad_weights(gram_matrix(grads), c, rescale))


@register_weighting("cagrad")
class CAGrad(GradientBalancing):
    """CAGrad (Liu et al., 2021): the update maximises the worst local improvement of any task within a
    ball of radius c |g_0| around the mean gradient g_0: d = g_0 + (c |g_0| / |g_w|) g_w with w the
    solution of the small dual problem over the simplex (scipy SLSQP, as in the official code).

    Options: `c` (float >= 0, default 0.4; c = 0 is plain mean-gradient descent), `rescale`
    (0 | 1 | 2, default 1: divide by 1 + c^2), `on` (auto | params | representation; default auto, see weighting.gradients).
    Cost per step: `on: params` -- K backward passes through the network, K x P memory;
    `on: representation` -- K backward passes through the heads + 1 through the backbone,
    K x (batch x features) memory; plus one small SLSQP solve on the K x K Gram matrix (CPU).
    """

    def __init__(
        self, task_names: Sequence[str], *, c: float = 0.4, rescale: int = 1, **options: Any
    ) -> None:
        super().__init__(task_names, **options)
        if c < 0:
            raise ValueError(f"cagrad option c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"cagrad option rescale must be 0, 1 or 2, got {rescale}")
        self.c, self.rescale = float(c), int(rescale)

    def combine_weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        return cagrad_weights(gram, self.c, self.rescale)
