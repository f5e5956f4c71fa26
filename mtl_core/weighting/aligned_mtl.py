"""Aligned-MTL. Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for
Multi-Task Learning", CVPR 2023."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_core.weighting.base import register_weighting
from mtl_core.weighting.gradients import GradientBalancing, combine, gram_matrix


def aligned_mtl_weights(gram: Tensor) -> Tensor:
    """alpha = 1^T B with B = sigma_min V Sigma^{-1} V^T, where M = G G^T = V Lambda V^T (rank-r part,
    Sigma = Lambda^{1/2} the singular values of G, sigma_min the smallest non-zero one).

    B G has orthogonal rows of equal norm sigma_min (the aligned task gradients, condition number 1);
    the update is their sum, d = 1^T B G = alpha @ G. Eigenvalues below max(lambda) * K * eps are
    treated as zero (rank deficiency), as in the official implementation."""
    m = gram.double()
    lam, v = torch.linalg.eigh(m)
    tol = lam.max().clamp(min=0) * m.shape[0] * torch.finfo(torch.float32).eps
    keep = lam > tol
    if not bool(keep.any()):
        return torch.zeros(m.shape[0], dtype=torch.float64)
    lam, v = lam[keep], v[:, keep]
    sigma = lam.sqrt()
    b = sigma.min() * (v / sigma[None, :]) @ v.T
    return b.sum(0)


def aligned_mtl_combine(grads: Tensor) -> Tensor:
    return combine(grads, aligned_mtl_weights(gram_matrix(grads)))


@register_weighting("aligned_mtl")
class AlignedMTL(GradientBalancing):
    """Aligned-MTL (Senushkin et al., 2023): align the task gradients so that their matrix has
    condition number 1 -- orthogonal, all of norm sigma_min (the smallest singular value of G,
    obtained from the eigen-decomposition of the Gram matrix) -- and step along their sum.

    Options: `on` (auto | params | representation; default auto, see weighting.gradients; the paper's
    Aligned-MTL-UB variant is `on: representation`).
    Cost per step: `on: params` -- K backward passes through the network, K x P memory;
    `on: representation` -- K backward passes through the heads + 1 through the backbone,
    K x (batch x features) memory; plus a K x K eigen-decomposition.
    """

    def combine_weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        return aligned_mtl_weights(gram)
