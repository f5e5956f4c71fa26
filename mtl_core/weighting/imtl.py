"""IMTL-G: impartial multi-task learning, gradient part. Liu, Li, Kuang, Xue, Chen, Yang, Liao &
Zhang, "Towards Impartial Multi-task Learning", ICLR 2021."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_core.weighting.base import register_weighting
from mtl_core.weighting.gradients import GradientBalancing, combine, gram_matrix


def imtl_g_weights(gram: Tensor) -> Tensor:
    """alpha (K,), sum alpha = 1, such that d = sum_t alpha_t g_t has equal projections d . u_t on all
    unit gradients u_t = g_t / |g_t|: with D = [g_1 - g_t]_{t>=2}, U = [u_1 - u_t]_{t>=2},
    alpha_{2:K} = g_1 U^T (D U^T)^{-1} and alpha_1 = 1 - sum alpha_{2:K} (closed form of the paper).
    Everything is expressed through P_ij = g_i . u_j = M_ij / |g_j|; a pseudo-inverse guards the
    singular case (collinear gradients)."""
    m = gram.double()
    k = m.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = torch.sqrt(torch.clamp(torch.diagonal(m), min=0)).clamp(min=1e-12)
    p = m / norms[None, :]
    g1_u = p[0, 0] - p[0, 1:]  # g_1 . (u_1 - u_b), b >= 2
    du = p[0, 0] - p[0, 1:][None, :] - p[1:, 0][:, None] + p[1:, 1:]  # (g_1 - g_a) . (u_1 - u_b)
    alpha = g1_u @ torch.linalg.pinv(du)
    return torch.cat([(1 - alpha.sum()).reshape(1), alpha])


def imtl_g_combine(grads: Tensor) -> Tensor:
    return combine(grads, imtl_g_weights(gram_matrix(grads)))


@register_weighting("imtl")
class IMTLG(GradientBalancing):
    """IMTL-G (Liu et al., 2021): the shared update d = sum_t alpha_t g_t (sum alpha = 1) whose
    projections onto every task's unit gradient are equal, so no task dominates the shared update;
    closed form, no iterative solver. (The paper's loss-scale part IMTL-L is not included.)

    Options: `on` (auto | params | representation; default auto, see weighting.gradients).
    Cost per step: `on: params` -- K backward passes through the network, K x P memory;
    `on: representation` -- K backward passes through the heads + 1 through the backbone,
    K x (batch x features) memory; plus a (K-1) x (K-1) pseudo-inverse.
    """

    def combine_weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        return imtl_g_weights(gram)
