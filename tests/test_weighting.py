"""Every weighting method through its `backward`, on hand-made losses and on a tiny seeded model."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_core.weighting import WEIGHTINGS, GradientBalancing, StepContext, build_weighting
from mtl_core.weighting.aligned_mtl import aligned_mtl_weights
from mtl_core.weighting.cagrad import cagrad_weights
from mtl_core.weighting.famo import famo_logit_grad
from mtl_core.weighting.gradients import gram_matrix
from mtl_core.weighting.gradnorm import gradnorm_loss
from mtl_core.weighting.imtl import imtl_g_weights
from mtl_core.weighting.mgda import mgda_weights
from mtl_core.weighting.nash_mtl import nash_mtl_weights
from mtl_core.weighting.pcgrad import pcgrad_weights

NAMES = ("shape", "color", "size")
GRADIENT_METHODS = sorted(n for n, cls in WEIGHTINGS.items() if issubclass(cls, GradientBalancing))
# the pure weight function of each gradient method with default options, for the hand checks
PURE = {
    "pcgrad": lambda gram, losses: pcgrad_weights(gram, torch.Generator().manual_seed(0)),
    "cagrad": lambda gram, losses: cagrad_weights(gram, 0.4, 1),
    "mgda": lambda gram, losses: mgda_weights(gram, losses, "none"),
    "imtl": lambda gram, losses: imtl_g_weights(gram),
    "nash_mtl": lambda gram, losses: nash_mtl_weights(gram, True, 1e-6),
    "aligned_mtl": lambda gram, losses: aligned_mtl_weights(gram),
}


def required_options(name: str, tasks: tuple[str, ...]) -> dict[str, Any]:
    if name == "fixed":
        return {"weights": {t: 1.0 / (i + 1) for i, t in enumerate(tasks)}}
    return {}


class Tiny:
    """A shared Linear(4, 3) + tanh backbone and one Linear(3, 2) head per task, on a seeded batch."""

    def __init__(self, k: int = 2, seed: int = 2) -> None:
        torch.manual_seed(seed)
        self.tasks = NAMES[:k]
        self.shared = nn.Linear(4, 3)
        self.heads = {t: nn.Linear(3, 2) for t in self.tasks}
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(8, 4, generator=gen)
        self.y = {t: torch.randint(0, 2, (8,), generator=gen) for t in self.tasks}

    @property
    def shared_params(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())

    def all_params(self) -> list[nn.Parameter]:
        return [*self.shared_params, *(p for h in self.heads.values() for p in h.parameters())]

    def forward(self) -> tuple[Tensor, dict[str, Tensor]]:
        z = torch.tanh(self.shared(self.x))
        return z, {t: F.cross_entropy(self.heads[t](z), self.y[t]) for t in self.tasks}

    def ctx(self, z: Tensor) -> StepContext:
        return StepContext(
            self.shared_params, {t: list(h.parameters()) for t, h in self.heads.items()}, z,
            last_shared_layer=[self.shared.weight],
        )  # fmt: skip

    def step(self, method: Any) -> dict[str, float]:
        for p in self.all_params():
            p.grad = None
        z, losses = self.forward()
        weights = method.backward(losses, self.ctx(z))
        if method.needs_losses_after_step:
            with torch.no_grad():
                method.after_step(self.forward()[1])
        return method.as_dict(weights)

    def shared_grad(self) -> Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.shared_params])


def leaf_losses(values: list[float], names: tuple[str, ...] = NAMES) -> dict[str, Tensor]:
    return {t: torch.tensor(v, requires_grad=True) for t, v in zip(names, values)}


# --- every method, through backward on the tiny model ---------------------------------------------


def test_the_tiny_model_has_conflicting_task_gradients() -> None:
    """Precondition of the comparisons below: on this batch the two tasks' shared gradients conflict."""
    model = Tiny()
    _, losses = model.forward()
    g = [torch.cat([x.reshape(-1) for x in torch.autograd.grad(losses[t], model.shared_params, retain_graph=True)]) for t in model.tasks]
    assert float(g[0] @ g[1]) < 0


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_method_runs_a_step_with_finite_grads(name: str, k: int) -> None:
    model = Tiny(k)
    method = build_weighting(name, model.tasks, required_options(name, model.tasks))
    for _ in range(2):  # two steps: stateful methods (FAMO, GradNorm) go through their update once
        weights = model.step(method)
        assert list(weights) == list(model.tasks)
        assert all(math.isfinite(w) for w in weights.values())
        for p in model.all_params():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        for p in method.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", [*GRADIENT_METHODS, "gradnorm"])
def test_methods_run_on_the_representation(name: str) -> None:
    model = Tiny(3)
    weights = model.step(build_weighting(name, model.tasks, {"on": "representation"}))
    assert len(weights) == 3
    assert all(torch.isfinite(p.grad).all() for p in model.all_params())


DISTINCT_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("equal", {}),
    ("fixed", {"weights": {"shape": 1.0, "color": 0.25}}),
    ("uncertainty", {"init": 0.5}),
    ("dwa", {}),  # fed a loss history below
    ("gradnorm", {}),  # first step: weights (1, 1) = plain sum
    ("rlw", {"seed": 0}),
    ("famo", {}),
    ("task_assignment", {}),  # logits set below
    *((m, {}) for m in GRADIENT_METHODS),
    *((m, {"on": "representation"}) for m in GRADIENT_METHODS),
]


def test_different_methods_give_different_updates() -> None:
    """Catches a method silently falling back to another one (or to the plain sum / mean)."""
    updates = {}
    for name, options in DISTINCT_CONFIGS:
        model = Tiny()
        method = build_weighting(name, model.tasks, options)
        if name == "dwa":
            method.on_epoch_end(0, {"shape": 1.0, "color": 1.0})
            method.on_epoch_end(1, {"shape": 0.5, "color": 0.9})
        if name == "task_assignment":
            method.logits.data = torch.tensor([0.7, -0.7])
        model.step(method)
        updates[f"{name}{options.get('on', '')}"] = model.shared_grad()
    assert len(updates) == len(DISTINCT_CONFIGS)
    for (a, ga), (b, gb) in itertools.combinations(updates.items(), 2):
        assert not torch.allclose(ga, gb, rtol=1e-3, atol=1e-7), f"{a} and {b} give the same update"


def per_task_grads(losses: dict[str, Tensor], tasks: tuple[str, ...], wrt: list[Tensor]) -> list[list[Tensor]]:
    return [list(torch.autograd.grad(losses[t], wrt, retain_graph=True)) for t in tasks]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_method_on_params_matches_hand_combination(name: str, k: int) -> None:
    model = Tiny(k)
    _, losses = model.forward()
    shared = per_task_grads(losses, model.tasks, model.shared_params)
    heads = [torch.autograd.grad(losses[t], list(model.heads[t].parameters()), retain_graph=True) for t in model.tasks]
    g = torch.stack([torch.cat([x.reshape(-1) for x in gs]) for gs in shared])
    loss_vec = torch.stack([losses[t].detach() for t in model.tasks]).double()
    expected_w = PURE[name](gram_matrix(g), loss_vec)

    weights = model.step(build_weighting(name, model.tasks))
    torch.testing.assert_close(torch.tensor([weights[t] for t in model.tasks], dtype=torch.float64), expected_w)
    torch.testing.assert_close(model.shared_grad(), expected_w.float() @ g, rtol=1e-5, atol=1e-7)
    for t, hg in zip(model.tasks, heads):  # heads: the plain gradient of their own task
        for p, e in zip(model.heads[t].parameters(), hg):
            torch.testing.assert_close(p.grad, e)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_method_on_representation_is_the_chain_rule(name: str) -> None:
    model = Tiny(2)
    z, losses = model.forward()
    gz = torch.stack([torch.autograd.grad(losses[t], z, retain_graph=True)[0].reshape(-1) for t in model.tasks])
    loss_vec = torch.stack([losses[t].detach() for t in model.tasks]).double()
    w = PURE[name](gram_matrix(gz), loss_vec)
    combined = (w.float() @ gz).view_as(z)
    expected = torch.cat([x.reshape(-1) for x in torch.autograd.grad(z, model.shared_params, combined)])

    weights = model.step(build_weighting(name, model.tasks, {"on": "representation"}))
    torch.testing.assert_close(torch.tensor([weights[t] for t in model.tasks], dtype=torch.float64), w)
    torch.testing.assert_close(model.shared_grad(), expected, rtol=1e-5, atol=1e-7)


def test_representation_mode_needs_the_representation() -> None:
    model = Tiny()
    _, losses = model.forward()
    method = build_weighting("mgda", model.tasks, {"on": "representation"})
    with pytest.raises(ValueError, match="shared_repr"):
        method.backward(losses, StepContext(model.shared_params))


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="bogus"):
        build_weighting("pcgrad", ["a", "b"], {"bogus": 1})
    with pytest.raises(ValueError, match="'on'"):
        build_weighting("cagrad", ["a", "b"], {"on": "weights"})
    with pytest.raises(ValueError, match="unknown train.weighting"):
        build_weighting("nope", ["a", "b"])
    with pytest.raises(ValueError, match="missing: \\['b'\\]"):
        build_weighting("equal", ["a", "b"]).backward({"a": torch.tensor(1.0)}, StepContext([]))


# --- fixed ------------------------------------------------------------------------------------------


def test_fixed_weights_give_exactly_the_weighted_sum_gradient() -> None:
    model = Tiny()
    _, losses = model.forward()
    expected = torch.autograd.grad(1.0 * losses["shape"] + 0.25 * losses["color"], model.all_params())
    weights = model.step(build_weighting("fixed", model.tasks, {"weights": {"shape": 1.0, "color": 0.25}}))
    assert weights == {"shape": 1.0, "color": 0.25}
    for p, e in zip(model.all_params(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)


def test_fixed_weights_name_missing_and_unknown_tasks() -> None:
    with pytest.raises(ValueError, match=r"missing: \['color'\], unknown: \['colour'\]"):
        build_weighting("fixed", ["shape", "color"], {"weights": {"shape": 1.0, "colour": 0.5}})
    with pytest.raises(ValueError, match="needs option weights"):
        build_weighting("fixed", ["shape", "color"])
    with pytest.raises(ValueError, match="color"):
        build_weighting("fixed", ["shape", "color"], {"weights": {"shape": 1.0, "color": -1.0}})


# --- uncertainty ------------------------------------------------------------------------------------


def test_uncertainty_loss_and_log_variance_gradient() -> None:
    method = build_weighting("uncertainty", ["a", "b"])
    s = torch.tensor([0.3, -0.2])
    method.log_vars.data = s.clone()
    losses = leaf_losses([1.5, 0.7], ("a", "b"))
    stacked = torch.stack(list(losses.values()))
    # classification form: sum_t exp(-s_t) L_t + s_t / 2
    expected_value = sum(math.exp(-sv) * lv + sv / 2 for sv, lv in zip(s.tolist(), [1.5, 0.7]))
    assert abs(method.total_loss(stacked, StepContext([])).item() - expected_value) < 1e-6
    weights = method.as_dict(method.backward(losses, StepContext([])))
    expected_ds = [-math.exp(-sv) * lv + 0.5 for sv, lv in zip(s.tolist(), [1.5, 0.7])]
    torch.testing.assert_close(method.log_vars.grad, torch.tensor(expected_ds))
    for t, sv in zip(("a", "b"), s.tolist()):
        assert abs(weights[t] - math.exp(-sv)) < 1e-6
        assert abs(float(losses[t].grad) - math.exp(-sv)) < 1e-6


# --- DWA --------------------------------------------------------------------------------------------


def test_dwa_weights_from_a_known_loss_history() -> None:
    method = build_weighting("dwa", ["a", "b"], {"temperature": 2.0})
    assert method.as_dict(method.backward(leaf_losses([1.0, 1.0], ("a", "b")), StepContext([]))) == {"a": 1.0, "b": 1.0}
    method.on_epoch_end(0, {"a": 1.0, "b": 2.0})
    assert method.as_dict(method.backward(leaf_losses([1.0, 1.0], ("a", "b")), StepContext([]))) == {"a": 1.0, "b": 1.0}
    method.on_epoch_end(1, {"a": 0.5, "b": 1.8})
    # r = (0.5 / 1.0, 1.8 / 2.0) = (0.5, 0.9); w = 2 softmax(r / 2)
    ea, eb = math.exp(0.25), math.exp(0.45)
    expected = {"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)}
    losses = leaf_losses([0.4, 1.7], ("a", "b"))
    weights = method.as_dict(method.backward(losses, StepContext([])))
    for t in ("a", "b"):
        assert abs(weights[t] - expected[t]) < 1e-6
        assert abs(float(losses[t].grad) - expected[t]) < 1e-6
    assert weights["b"] > weights["a"]  # the slower-improving task gets more weight
    method.on_epoch_end(2, {"a": 0.5, "b": 0.9})  # only the last two epochs count: r = (1, 0.5)
    ea, eb = math.exp(0.5), math.exp(0.25)
    assert abs(method.current_weights()[0].item() - 2 * ea / (ea + eb)) < 1e-9


# --- GradNorm ---------------------------------------------------------------------------------------


def test_gradnorm_pure_update_direction_from_training_rates() -> None:
    # equal gradient norms, task a has not improved (L/L0 = 1), task b has halved its loss:
    # r = (4/3, 2/3); targets = 1 * r^1.5 = (1.54, 0.54); G = (1, 1) -> grad = sign(G - target) * norms
    w = torch.ones(2, requires_grad=True)
    loss = gradnorm_loss(w, torch.ones(2), torch.tensor([2.0, 1.0]), torch.tensor([2.0, 2.0]), alpha=1.5)
    (grad,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(grad, torch.tensor([-1.0, 1.0]))  # SGD raises w_a, lowers w_b
    assert abs(loss.item() - (abs(1 - (4 / 3) ** 1.5) + abs(1 - (2 / 3) ** 1.5))) < 1e-6
    # alpha = 0: targets are the mean norm, no preference for either task
    loss0 = gradnorm_loss(w, torch.ones(2), torch.tensor([2.0, 1.0]), torch.tensor([2.0, 2.0]), alpha=0.0)
    assert loss0.item() == 0.0


def test_gradnorm_backward_on_a_hand_made_layer() -> None:
    # W is a 1x1 "last shared layer"; L_a = 3 W, L_b = W: |grad_W L| = (3, 1)
    weight = nn.Parameter(torch.ones(1, 1))
    method = build_weighting("gradnorm", ["a", "b"], {"alpha": 1.5})

    def losses() -> dict[str, Tensor]:
        return {"a": 3 * weight.sum(), "b": weight.sum()}

    weights = method.as_dict(method.backward(losses(), StepContext([weight], last_shared_layer=[weight])))
    # first step: L = L(0), r = (1, 1), target = mean(G) = 2, G = (3, 1) -> dLgrad/dw = (+3, -1)
    assert weights == {"a": 1.0, "b": 1.0}
    torch.testing.assert_close(method.loss_weights.grad, torch.tensor([3.0, -1.0]))
    torch.testing.assert_close(weight.grad, torch.tensor([[4.0]]))  # network: 1 * 3 + 1 * 1
    # an SGD step on w, then the next backward renormalises w to sum K = 2
    with torch.no_grad():
        method.loss_weights -= 0.1 * method.loss_weights.grad
    weight.grad = None
    method.loss_weights.grad = None
    weights = method.as_dict(method.backward(losses(), StepContext([weight], last_shared_layer=[weight])))
    torch.testing.assert_close(torch.tensor([weights["a"], weights["b"]]), torch.tensor([0.7, 1.1]) * 2 / 1.8)
    torch.testing.assert_close(weight.grad, torch.tensor([[(3 * 0.7 + 1.1) * 2 / 1.8]]))


# --- RLW --------------------------------------------------------------------------------------------


def test_rlw_weights_sum_to_one_and_are_seeded() -> None:
    def run(seed: int) -> list[list[float]]:
        method = build_weighting("rlw", ["a", "b", "c"], {"seed": seed})
        out = []
        for _ in range(3):
            losses = leaf_losses([1.0, 2.0, 3.0], ("a", "b", "c"))
            w = method.as_dict(method.backward(losses, StepContext([])))
            assert abs(sum(w.values()) - 1) < 1e-6 and all(v > 0 for v in w.values())
            assert [float(losses[t].grad) for t in "abc"] == pytest.approx(list(w.values()), rel=1e-6)
            out.append(list(w.values()))
        return out

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # fresh weights every step
    gen = torch.Generator().manual_seed(7)
    torch.testing.assert_close(
        torch.tensor(a[0], dtype=torch.float64), torch.softmax(torch.randn(3, generator=gen, dtype=torch.float64), 0)
    )


# --- FAMO -------------------------------------------------------------------------------------------


def test_famo_effective_weights_and_logit_update() -> None:
    gamma, lr = 0.01, 0.025
    method = build_weighting("famo", ["a", "b"], {"gamma": gamma, "w_lr": lr})
    before = [1.0, 2.0]
    losses = leaf_losses(before, ("a", "b"))
    weights = method.as_dict(method.backward(losses, StepContext([])))
    # xi = 0 -> z = (1/2, 1/2), c = sum z / L; loss-gradient weights z_t / (c L_t) = (2/3, 1/3)
    for t, e in zip("ab", [2 / 3, 1 / 3]):
        assert abs(weights[t] - e) < 1e-6 and abs(float(losses[t].grad) - e) < 1e-6

    after = [0.5, 1.8]
    method.after_step(leaf_losses(after, ("a", "b")))
    delta = torch.tensor([math.log(1.0 / 0.5), math.log(2.0 / 1.8)])
    z = torch.tensor([0.5, 0.5])
    d1 = z * (delta - (z * delta).sum())
    torch.testing.assert_close(famo_logit_grad(torch.zeros(2), delta), d1)
    # Adam, first step (bias-corrected m/sqrt(v) = g/|g|), weight decay gamma * xi = 0 at xi = 0
    xi1 = -lr * d1 / (d1.abs() + 1e-8)
    torch.testing.assert_close(method.logits.detach(), xi1)
    assert method.logits[0] < method.logits[1]  # task a's log-loss fell faster -> less weight

    # second step from xi1: hand Adam with weight decay
    method.backward(leaf_losses([0.5, 1.8], ("a", "b")), StepContext([]))
    method.after_step(leaf_losses([0.45, 1.0], ("a", "b")))
    delta2 = torch.tensor([math.log(0.5 / 0.45), math.log(1.8 / 1.0)])
    g1 = d1
    g2 = famo_logit_grad(xi1, delta2) + gamma * xi1
    b1, b2 = 0.9, 0.999
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    xi2 = xi1 - lr * (m / (1 - b1**2)) / ((v / (1 - b2**2)).sqrt() + 1e-8)
    torch.testing.assert_close(method.logits.detach(), xi2)


def test_famo_requires_after_step() -> None:
    method = build_weighting("famo", ["a", "b"])
    assert method.needs_losses_after_step
    method.backward(leaf_losses([1.0, 2.0], ("a", "b")), StepContext([]))
    with pytest.raises(RuntimeError, match="after_step"):
        method.backward(leaf_losses([1.0, 2.0], ("a", "b")), StepContext([]))


# --- task assignment --------------------------------------------------------------------------------


def test_task_assignment_weights_are_a_softmax_summing_to_one() -> None:
    method = build_weighting("task_assignment", ["a", "b", "c"], {"entropy": 0.5})
    theta = torch.tensor([0.2, -1.0, 0.5])
    method.logits.data = theta.clone()
    lv = torch.tensor([1.0, 0.3, 2.0])
    weights = method.as_dict(method.backward(leaf_losses(lv.tolist(), ("a", "b", "c")), StepContext([])))
    w = torch.softmax(theta, 0)
    torch.testing.assert_close(torch.tensor(list(weights.values())), w)
    assert abs(sum(weights.values()) - 1) < 1e-6
    # dJ/dtheta for J = w . L + lambda sum w log w:  w * (a - w . a) with a = L + lambda (log w + 1)
    a = lv + 0.5 * (w.log() + 1)
    torch.testing.assert_close(method.logits.grad, w * (a - (w * a).sum()))


def test_task_assignment_entropy_prevents_collapse() -> None:
    lv = torch.tensor([0.5, 1.5])
    for lam, expected in [(1.0, torch.softmax(-lv / 1.0, 0)), (0.0, torch.tensor([1.0, 0.0]))]:
        method = build_weighting("task_assignment", ["a", "b"], {"entropy": lam})
        for _ in range(300):  # plain gradient descent on the logits, lr 1
            method.logits.grad = None
            method.backward(leaf_losses(lv.tolist(), ("a", "b")), StepContext([]))
            with torch.no_grad():
                method.logits -= method.logits.grad
        w = torch.softmax(method.logits.detach(), 0)
        torch.testing.assert_close(w, expected, atol=2e-2, rtol=0)
