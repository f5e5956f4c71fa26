"""Nash-MTL: multi-task learning as a bargaining game. Navon, Shamsian, Achituve, Maron, Kawaguchi,
Chechik & Fetaya, "Multi-Task Learning as a Bargaining Game", ICML 2022."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_core.weighting.base import register_weighting
from mtl_core.weighting.gradients import GradientBalancing, combine, gram_matrix


def nash_bargaining_solve(
    gram: Tensor, ridge: float = 0.0, max_iter: int = 100, tol: float = 1e-10
) -> Tensor:
    """alpha > 0 with M alpha = 1 / alpha (M = G G^T, the paper's G^T G with gradients as columns).

    That is the stationarity condition of the strictly convex f(alpha) = 1/2 alpha^T M alpha -
    sum_t log alpha_t, minimised here by damped Newton steps (Hessian M + diag(1/alpha^2) is positive
    definite) that stay inside alpha > 0 -- no cvxpy. `ridge` adds ridge * mean(diag M) * I to M: with
    linearly dependent gradients (M singular) the exact solution may not exist (alpha -> infinity);
    the ridge keeps it finite. Stops when max_t |(M alpha)_t alpha_t - 1| < tol.
    """
    m = gram.double().numpy()
    k = m.shape[0]
    scale = float(np.mean(np.diag(m)))
    if scale <= 0:
        return torch.ones(k, dtype=torch.float64)
    m = m + ridge * scale * np.eye(k)
    a = 1.0 / np.sqrt(np.maximum(np.diag(m), 1e-12 * scale))

    def f(x: np.ndarray) -> float:
        return float(0.5 * x @ m @ x - np.log(x).sum())

    for _ in range(max_iter):
        grad = m @ a - 1.0 / a
        if np.max(np.abs(grad * a)) < tol:
            break
        step = -np.linalg.solve(m + np.diag(1.0 / a**2), grad)
        t = 1.0
        neg = step < 0
        if neg.any():
            t = min(1.0, 0.99 * float(np.min(-a[neg] / step[neg])))
        f0, slope = f(a), float(grad @ step)
        while f(a + t * step) > f0 + 1e-4 * t * slope and t > 1e-12:
            t *= 0.5
        a = a + t * step
    return torch.from_numpy(a)


def nash_mtl_weights(gram: Tensor, normalize: bool = True, ridge: float = 1e-6) -> Tensor:
    """Nash-MTL weights: alpha with (M alpha)_t alpha_t = 1 on the raw Gram matrix M.

    normalize=True solves on M / n (n = |M|_F) for conditioning and maps back: if M/n a = 1/a then
    alpha = a / sqrt(n) solves M alpha = 1/alpha. That is what the authors' code does: it divides
    G^T G by n but multiplies n back into the constraint, log(alpha_t n) + log((G^T G / n alpha)_t)
    >= 0 (`methods/weight_methods.py`, `normalization_factor_param`), so its alpha is the solution of
    the unnormalised problem. (Returning a itself, as this project did before, gave updates sqrt(n)
    times too large: 11x to 129x with gradients of order 1.) The result does not depend on
    `normalize`; it only changes the scale the Newton iterations run at."""
    m = gram.double()
    if not normalize:
        return nash_bargaining_solve(m, ridge=ridge)
    n = torch.linalg.norm(m).clamp(min=1e-30)
    return nash_bargaining_solve(m / n, ridge=ridge) / n.sqrt()


def nash_mtl_combine(grads: Tensor, normalize: bool = True, ridge: float = 1e-6) -> Tensor:
    return combine(grads, nash_mtl_weights(gram_matrix(grads), normalize, ridge))


@register_weighting("nash_mtl")
class NashMTL(GradientBalancing):
    """Nash-MTL (Navon et al., 2022): the update d = G^T alpha is the Nash bargaining solution of the
    tasks, characterised by (G G^T) alpha = 1 / alpha, alpha > 0 (each task's directional derivative
    d . g_t = 1 / alpha_t). Solved by damped Newton on a convex potential instead of the paper's
    cvxpy sequence of convex problems. The official code also clips the shared gradient to norm 1.0
    after the method's backward (`max_norm`); here that is the trainer's `train.grad_clip` (set it to
    1.0 to match), which applies to every method.

    Options: `normalize` (bool, default true: solve on G G^T / |G G^T|_F and scale back, as the
    official code; the weights are the same either way), `ridge` (float, default 1e-6, relative Tikhonov term for linearly dependent gradients),
    `on` (auto | params | representation; default auto, see weighting.gradients).
    Cost per step: `on: params` -- K backward passes through the network, K x P memory;
    `on: representation` -- K backward passes through the heads + 1 through the backbone,
    K x (batch x features) memory; plus a few K x K Newton solves.
    """

    def __init__(
        self, task_names: Sequence[str], *, normalize: bool = True, ridge: float = 1e-6, **options: Any
    ) -> None:
        super().__init__(task_names, **options)
        if ridge < 0:
            raise ValueError(f"nash_mtl option ridge must be >= 0, got {ridge}")
        self.normalize, self.ridge = bool(normalize), float(ridge)

    def combine_weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        return nash_mtl_weights(gram, self.normalize, self.ridge)
