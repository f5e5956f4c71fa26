"""The pure gradient-combination functions of mtl_core.weighting, against hand-computed results."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mtl_core.weighting.aligned_mtl import aligned_mtl_combine, aligned_mtl_weights
from mtl_core.weighting.cagrad import cagrad_combine, cagrad_dual
from mtl_core.weighting.gradients import gram_matrix
from mtl_core.weighting.imtl import imtl_g_combine, imtl_g_weights
from mtl_core.weighting.mgda import mgda_combine, mgda_weights, min_norm_weights
from mtl_core.weighting.nash_mtl import nash_bargaining_solve, nash_mtl_combine, nash_mtl_weights
from mtl_core.weighting.pcgrad import pcgrad_combine, pcgrad_weights


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def random_grads(k: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- PCGrad -----------------------------------------------------------------------------------------


def test_pcgrad_two_conflicting_gradients_hand_computed() -> None:
    g1, g2 = [1.0, 0.0], [-1.0, 1.0]  # g1 . g2 = -1 < 0
    # g1' = g1 - (g1.g2 / |g2|^2) g2 = (1, 0) + 0.5 (-1, 1) = (0.5, 0.5)
    # g2' = g2 - (g2.g1 / |g1|^2) g1 = (-1, 1) + (1, 0)     = (0, 1)
    out = pcgrad_combine(t(g1, g2), torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5], dtype=torch.float64))
    # as coefficients of the original gradients: g1' + g2' = (1 + 1) g1 + (0.5 + 1) g2
    torch.testing.assert_close(pcgrad_weights(gram_matrix(t(g1, g2))), t([2.0, 1.5])[0])


def test_pcgrad_without_conflict_is_the_plain_sum() -> None:
    grads = t([1.0, 0.2], [0.5, 1.0], [0.3, 0.3])
    torch.testing.assert_close(pcgrad_combine(grads), grads.sum(0))


def test_pcgrad_random_order_is_seeded() -> None:
    # three mutually conflicting gradients: the projection order matters
    grads = t([1.0, 0.0, 0.0], [-0.8, 1.0, 0.1], [-0.5, -0.9, 1.0])
    outs = {
        tuple(pcgrad_combine(grads, torch.Generator().manual_seed(s)).round(decimals=9).tolist())
        for s in range(12)
    }
    assert len(outs) > 1, "the task order should change the result"
    a = pcgrad_combine(grads, torch.Generator().manual_seed(5))
    b = pcgrad_combine(grads, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, grads.sum(0))


# --- MGDA -------------------------------------------------------------------------------------------


def test_mgda_orthogonal_unit_gradients_get_equal_weights() -> None:
    grads = t([1.0, 0.0], [0.0, 1.0])
    w = mgda_weights(gram_matrix(grads))
    torch.testing.assert_close(w, t([0.5, 0.5])[0])
    torch.testing.assert_close(mgda_combine(grads), t([0.5, 0.5])[0])


def test_mgda_parallel_gradients_picks_the_smaller() -> None:
    grads = t([1.0, 2.0], [3.0, 6.0])
    torch.testing.assert_close(mgda_weights(gram_matrix(grads)), t([1.0, 0.0])[0])
    torch.testing.assert_close(mgda_combine(grads), t([1.0, 2.0])[0])


def test_mgda_frank_wolfe_satisfies_min_norm_optimality_conditions() -> None:
    grads = random_grads(4, 3, seed=1)  # 4 tasks in 3-D: the min-norm point is interior-ish
    m = gram_matrix(grads)
    w = min_norm_weights(m, max_iter=2000)
    assert torch.all(w >= -1e-12) and abs(float(w.sum()) - 1) < 1e-9
    # KKT: (M w)_t >= w^T M w for every vertex t (no descent direction left on the simplex)
    value = float(w @ m @ w)
    assert torch.all(m @ w >= value - 1e-4)
    # and no point of a fine grid on the simplex does better
    best = min(
        float(v @ m @ v)
        for a, b, c in itertools.product(np.linspace(0, 1, 21), repeat=3)
        if a + b + c <= 1
        for v in [torch.tensor([a, b, c, 1 - a - b - c], dtype=torch.float64)]
    )
    assert value <= best + 1e-6


def test_mgda_normalisations_hand_computed() -> None:
    # orthogonal g1 = (2, 0), g2 = (0, 1): the min-norm point of {a, b} orthogonal has w ∝ 1 / |.|^2
    grads = t([2.0, 0.0], [0.0, 1.0])
    gram, losses = gram_matrix(grads), t([1.0, 2.0])[0]
    torch.testing.assert_close(mgda_weights(gram), t([0.2, 0.8])[0])  # ∝ (1/4, 1)
    torch.testing.assert_close(mgda_weights(gram, normalize="l2"), t([0.5, 0.5])[0])  # unit vectors
    # 'loss': solve on g1 / 1 = (2, 0), g2 / 2 = (0, 0.5) -> ∝ (1/4, 4); the weights multiply the RAW grads
    torch.testing.assert_close(mgda_weights(gram, losses, normalize="loss"), t([1 / 17, 16 / 17])[0])
    # 'loss+': g_t / (L_t |g_t|) = (1, 0), (0, 1/2) -> ∝ (1, 4)
    torch.testing.assert_close(mgda_weights(gram, losses, normalize="loss+"), t([0.2, 0.8])[0])
    with pytest.raises(ValueError, match="normalize"):
        mgda_weights(gram, normalize="bogus")


# --- CAGrad -----------------------------------------------------------------------------------------


def test_cagrad_with_c_zero_is_the_mean_gradient() -> None:
    grads = random_grads(3, 7, seed=2)
    torch.testing.assert_close(cagrad_combine(grads, c=0.0), grads.mean(0))


def test_cagrad_dual_matches_grid_search_and_update_formula() -> None:
    grads = t([1.0, 0.1], [-0.6, 1.0])
    c = 0.4
    m = gram_matrix(grads).numpy()
    g0 = grads.mean(0).numpy()
    g0_norm = np.linalg.norm(g0)

    def dual(p: float) -> float:
        gw = p * grads[0].numpy() + (1 - p) * grads[1].numpy()
        return float(gw @ g0 + c * g0_norm * np.linalg.norm(gw))

    grid = np.linspace(0, 1, 100001)
    p_best = grid[np.argmin([dual(p) for p in grid])]
    w = cagrad_dual(gram_matrix(grads), c)
    assert abs(w[0] - p_best) < 1e-3 and abs(w.sum() - 1) < 1e-6
    gw = w[0] * grads[0].numpy() + w[1] * grads[1].numpy()
    expected = (g0 + c * g0_norm / np.linalg.norm(gw) * gw) / (1 + c**2)
    np.testing.assert_allclose(cagrad_combine(grads, c=c).numpy(), expected, rtol=1e-5, atol=1e-7)
    assert np.allclose(m, m.T)


# --- IMTL-G -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4])
def test_imtl_g_gives_equal_projections_on_unit_gradients(k: int) -> None:
    grads = random_grads(k, 6, seed=k) * torch.tensor([1.0, 5.0, 0.2, 2.0][:k], dtype=torch.float64)[:, None]
    d = imtl_g_combine(grads)
    units = grads / grads.norm(dim=1, keepdim=True)
    proj = units @ d
    torch.testing.assert_close(proj, proj.mean().expand(k), rtol=1e-9, atol=1e-9)
    assert abs(float(imtl_g_weights(gram_matrix(grads)).sum()) - 1) < 1e-9


def test_imtl_g_two_orthogonal_gradients_hand_computed() -> None:
    # g1 = (2, 0), g2 = (0, 1): d = a g1 + (1 - a) g2 with 2a = 1 - a -> a = 1/3, d = (2/3, 2/3)
    torch.testing.assert_close(imtl_g_combine(t([2.0, 0.0], [0.0, 1.0])), t([2 / 3, 2 / 3])[0])


# --- Nash-MTL ---------------------------------------------------------------------------------------


def test_nash_solution_satisfies_bargaining_equation() -> None:
    grads = random_grads(3, 5, seed=4) * torch.tensor([[1.0], [3.0], [0.5]], dtype=torch.float64)
    m = gram_matrix(grads)
    alpha = nash_bargaining_solve(m)
    assert torch.all(alpha > 0)
    torch.testing.assert_close(m @ alpha, 1 / alpha, rtol=1e-8, atol=1e-10)
    # hence every task's directional derivative is d . g_t = 1 / alpha_t and |d|^2 = K
    d = alpha @ grads
    torch.testing.assert_close(grads @ d, 1 / alpha, rtol=1e-8, atol=1e-10)
    assert abs(float(d @ d) - 3) < 1e-8


def test_nash_orthogonal_gradients_hand_computed() -> None:
    # M = diag(4, 1): alpha_t^2 M_tt = 1 -> alpha = (1/2, 1); d = (1, 1)
    grads = t([2.0, 0.0], [0.0, 1.0])
    torch.testing.assert_close(nash_bargaining_solve(gram_matrix(grads)), t([0.5, 1.0])[0])
    # normalised (official code): solved on M / |M|_F for conditioning, |M|_F multiplied back into the
    # constraint, so the weights are those of the raw problem, not |M|_F^(1/2) = 17^(1/4) times them
    for normalize in (True, False):
        torch.testing.assert_close(nash_mtl_weights(gram_matrix(grads), normalize=normalize, ridge=0.0), t([0.5, 1.0])[0])
        torch.testing.assert_close(nash_mtl_combine(grads, normalize=normalize, ridge=0.0), t([1.0, 1.0])[0])


def test_nash_update_does_not_grow_with_the_gradient_scale() -> None:
    # the bargaining solution is homogeneous: gradients s x larger -> alpha 1/s, the same update d
    grads = random_grads(3, 40, seed=3)
    d = nash_mtl_combine(grads)
    for s in (1e-2, 10.0, 1e3):
        torch.testing.assert_close(nash_mtl_combine(grads * s), d, rtol=1e-6, atol=1e-9)
    alpha = nash_mtl_weights(gram_matrix(grads))
    # (G G^T alpha)_t alpha_t = 1, up to the default ridge of 1e-6
    torch.testing.assert_close(grads @ d * alpha, torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)


# --- Aligned-MTL ------------------------------------------------------------------------------------


def test_aligned_mtl_orthogonal_gradients_of_different_norms() -> None:
    # sigma = (2, 1), sigma_min = 1: each gradient is rescaled to norm 1 -> d = (1, 0) + (0, 1)
    grads = t([2.0, 0.0], [0.0, 1.0])
    torch.testing.assert_close(aligned_mtl_combine(grads), t([1.0, 1.0])[0])
    torch.testing.assert_close(aligned_mtl_weights(gram_matrix(grads)), t([0.5, 1.0])[0])


def test_aligned_mtl_aligned_gradients_are_orthogonal_with_norm_sigma_min() -> None:
    grads = random_grads(3, 6, seed=7)
    m = gram_matrix(grads)
    lam, v = torch.linalg.eigh(m)
    sigma = lam.sqrt()
    b = sigma.min() * (v / sigma) @ v.T
    aligned = b @ grads
    torch.testing.assert_close(aligned @ aligned.T, sigma.min() ** 2 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(aligned_mtl_combine(grads), aligned.sum(0))


def test_aligned_mtl_rank_deficient_gradients_stay_finite() -> None:
    grads = t([1.0, 0.0], [2.0, 0.0])
    d = aligned_mtl_combine(grads)
    assert torch.isfinite(d).all()
    # rank 1: the single aligned direction with norm sigma_min = sqrt(5), summed over the two tasks
    torch.testing.assert_close(d.norm(), torch.tensor(3.0, dtype=torch.float64) / np.sqrt(5) * np.sqrt(5))
