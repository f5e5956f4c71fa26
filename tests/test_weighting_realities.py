"""Weighting methods where users' data is real: a task unlabelled in a batch, state across a checkpoint,
GradNorm's layer on every architecture, Nash-MTL against the authors' solver."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mtl_core.losses import weighted_cross_entropy
from mtl_core.models import build_model
from mtl_core.tasks import MISSING_LABEL
from mtl_core.weighting import WEIGHTINGS, GradientBalancing, StepContext, build_weighting
from mtl_core.weighting.nash_mtl import nash_mtl_weights

TASKS = ("shape", "color", "size")


def options(name: str, tasks: tuple[str, ...]) -> dict[str, Any]:
    return {"weights": {t: 1.0 / (i + 1) for i, t in enumerate(tasks)}} if name == "fixed" else {}


class Net:
    """A shared Linear(4, 5) + tanh and one Linear(5, 3) head per task, each seeded by its task's index,
    so that the model on a subset of the tasks has exactly the same parameters for those tasks."""

    def __init__(self, tasks: tuple[str, ...]) -> None:
        torch.manual_seed(10)
        self.shared = nn.Linear(4, 5)
        self.heads = {}
        for t in tasks:
            torch.manual_seed(20 + TASKS.index(t))
            self.heads[t] = nn.Linear(5, 3)
        self.tasks = tasks

    def params(self) -> list[nn.Parameter]:
        return [*self.shared.parameters(), *(p for h in self.heads.values() for p in h.parameters())]

    def losses(self, x: Tensor, y: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        z = torch.tanh(self.shared(x))
        return z, {t: weighted_cross_entropy(self.heads[t](z), y[t]) for t in self.tasks}

    def ctx(self, z: Tensor, labelled: Tensor | None) -> StepContext:
        return StepContext(
            list(self.shared.parameters()), {t: list(h.parameters()) for t, h in self.heads.items()}, z,
            labelled=labelled, last_shared_layer=[self.shared.weight],
        )  # fmt: skip


def batch(step: int, unlabelled: str | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 4, generator=gen)
    y = {t: torch.randint(0, 3, (16,), generator=gen) for t in TASKS}
    if unlabelled is not None:
        y[unlabelled] = torch.full((16,), MISSING_LABEL)
    return x, y


def train(net: Net, method: Any, steps: list[str | None], use_mask: bool) -> list[Tensor]:
    """SGD on the network and the method's own parameters; returns each step's weights."""
    opt = torch.optim.SGD([*net.params(), *method.parameters()], lr=0.1)
    out = []
    for i, unlabelled in enumerate(steps):
        x, y = batch(i, unlabelled)
        labelled = torch.tensor([(y[t] != MISSING_LABEL).any().item() for t in net.tasks]) if use_mask else None
        opt.zero_grad(set_to_none=True)
        z, losses = net.losses(x, y)
        out.append(method.backward(losses, net.ctx(z, labelled)).detach().double().cpu())
        opt.step()
        if method.needs_losses_after_step:
            with torch.no_grad():
                method.after_step(net.losses(x, y)[1])
    return out


TAKES_ON = sorted(n for n, cls in WEIGHTINGS.items() if issubclass(cls, GradientBalancing) or n == "gradnorm")
CONFIGS = [(n, {}) for n in sorted(WEIGHTINGS)] + [(n, {"on": "representation"}) for n in TAKES_ON]


@pytest.mark.parametrize(("name", "extra"), CONFIGS, ids=[f"{n}-{e.get('on', 'default')}" for n, e in CONFIGS])
def test_an_unlabelled_task_gives_the_update_of_the_labelled_tasks_alone(name: str, extra: dict) -> None:
    """Three steps with `size` unlabelled in every batch: the same weights, shared and head parameters as
    the method built for `shape` and `color` only; `size` gets weight exactly 0 and no update."""
    full, alone = Net(TASKS), Net(TASKS[:2])
    size_head = [p.detach().clone() for p in full.heads["size"].parameters()]
    w_full = train(full, build_weighting(name, TASKS, {**options(name, TASKS), **extra}), ["size"] * 3, True)
    w_alone = train(alone, build_weighting(name, TASKS[:2], {**options(name, TASKS[:2]), **extra}), [None] * 3, False)
    for a, b in zip(w_full, w_alone):
        assert a[2] == 0.0
        torch.testing.assert_close(a[:2], b, rtol=1e-5, atol=1e-7)
    for p, q in zip([*full.shared.parameters(), *full.heads["shape"].parameters(), *full.heads["color"].parameters()],
                    [*alone.shared.parameters(), *alone.heads["shape"].parameters(), *alone.heads["color"].parameters()]):  # fmt: skip
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, before in zip(full.heads["size"].parameters(), size_head):
        torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mgda", "imtl", "famo", "cagrad", "nash_mtl"])
def test_an_unlabelled_task_does_not_stall_or_blow_up_the_update(name: str) -> None:
    """The failure the issue measured: with a zero-gradient task MGDA, IMTL and FAMO made no shared
    update, CAGrad halved it and Nash-MTL logged weights of 1e3. Now the update is the labelled tasks'."""
    net = Net(TASKS)
    x, y = batch(0, "size")
    z, losses = net.losses(x, y)
    method = build_weighting(name, TASKS)
    weights = method.backward(losses, net.ctx(z, torch.tensor([True, True, False])))
    shared_norm = float(torch.cat([p.grad.reshape(-1) for p in net.shared.parameters()]).norm())
    assert shared_norm > 1e-2 and float(weights[2]) == 0.0 and bool(torch.isfinite(weights).all())
    assert float(weights.abs().max()) < 100


def test_gradnorm_takes_each_initial_loss_from_the_first_batch_where_the_task_is_labelled() -> None:
    net = Net(TASKS)
    method = build_weighting("gradnorm", TASKS)
    opt = torch.optim.SGD([*net.params(), *method.parameters()], lr=0.05)
    first_size_loss = None
    for i in range(300):
        x, y = batch(i, "size" if i == 0 else None)
        labelled = torch.tensor([(y[t] != MISSING_LABEL).any().item() for t in TASKS])
        opt.zero_grad(set_to_none=True)
        z, losses = net.losses(x, y)
        if i == 1:
            first_size_loss = float(losses["size"].detach())
        weights = method.backward(losses, net.ctx(z, labelled))
        opt.step()
        if i == 0:
            assert math.isnan(float(method.initial_losses[2]))
    assert float(method.initial_losses[2]) == pytest.approx(first_size_loss)
    w = weights  # the last step's effective weights
    assert float(w.sum()) == pytest.approx(3.0, rel=1e-5)
    # the collapse the issue measured was 0.0001 / 3.0 / 0.0001; balanced tasks stay near 1
    assert float(w.min()) > 0.3 and float(w.max()) < 2.0, w


def test_dwa_skips_a_task_with_no_loss_in_an_epoch() -> None:
    method = build_weighting("dwa", ["a", "b"], {"temperature": 2.0})
    method.on_epoch_end(1, {"a": 1.0, "b": 2.0})
    method.on_epoch_end(2, {"a": 0.5, "b": float("nan")})  # b unlabelled all epoch 2
    assert method.current_weights().tolist() == [1.0, 1.0]  # b has one epoch with a loss: still warm-up
    method.on_epoch_end(3, {"a": 0.4, "b": 1.8})
    # r = (0.4 / 0.5, 1.8 / 2.0): b's ratio from its last two epochs with a loss
    ea, eb = math.exp(0.8 / 2), math.exp(0.9 / 2)
    torch.testing.assert_close(method.current_weights(), torch.tensor([2 * ea / (ea + eb), 2 * eb / (ea + eb)], dtype=torch.float64))
    method.on_epoch_end(4, {"a": float("nan"), "b": 0.9})
    ea, eb = math.exp(0.8 / 2), math.exp(0.5 / 2)
    w = method.current_weights()
    assert bool(torch.isfinite(w).all())
    torch.testing.assert_close(w, torch.tensor([2 * ea / (ea + eb), 2 * eb / (ea + eb)], dtype=torch.float64))


# --- state_dict ---------------------------------------------------------------------------------------

STATEFUL = {"uncertainty", "dwa", "gradnorm", "rlw", "famo", "task_assignment"}


def run_steps(net: Net, method: Any, first: int, count: int) -> list[Tensor]:
    opt = torch.optim.SGD([*net.params(), *method.parameters()], lr=0.1)
    out = []
    for i in range(first, first + count):
        x, y = batch(i, "color" if i % 3 == 1 else None)
        labelled = torch.tensor([(y[t] != MISSING_LABEL).any().item() for t in TASKS])
        opt.zero_grad(set_to_none=True)
        z, losses = net.losses(x, y)
        out.append(method.backward(losses, net.ctx(z, labelled)).detach().double().cpu())
        out.append(torch.cat([p.grad.reshape(-1) for p in net.shared.parameters()]).detach().double())
        opt.step()
        if method.needs_losses_after_step:
            with torch.no_grad():
                method.after_step(net.losses(x, y)[1])
        method.on_epoch_end(i, {t: float(losses[t].detach()) if t != "size" or i % 2 else float("nan") for t in TASKS})
    return out


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_state_dict_restores_the_method_exactly(name: str) -> None:
    """Four steps, a checkpoint (torch.save / torch.load(weights_only=True)), then the restored method
    takes the same next steps as the original; a fresh one does not, where the method has state."""
    net = Net(TASKS)
    method = build_weighting(name, TASKS, options(name, TASKS))
    run_steps(net, method, 0, 4)
    buffer = io.BytesIO()
    torch.save({"net": [p.detach().clone() for p in net.params()], "weighting": method.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    def resumed(state: dict | None) -> list[Tensor]:
        other = Net(TASKS)
        with torch.no_grad():
            for p, v in zip(other.params(), saved["net"]):
                p.copy_(v)
        fresh = build_weighting(name, TASKS, options(name, TASKS))
        if state is not None:
            fresh.load_state_dict(state)
        return run_steps(other, fresh, 4, 3)

    expected = run_steps(net, method, 4, 3)
    for a, b in zip(resumed(saved["weighting"]), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if name in STATEFUL:
        assert any(not torch.equal(a, b) for a, b in zip(resumed(None), expected)), "state made no difference"
    if hasattr(method, "generator"):  # RLW's draws, PCGrad's task order
        restored = build_weighting(name, TASKS)
        restored.load_state_dict(saved["weighting"])
        assert not torch.equal(restored.generator.get_state(), build_weighting(name, TASKS).generator.get_state())


def test_load_state_dict_refuses_another_method_or_task_list() -> None:
    state = build_weighting("famo", TASKS).state_dict()
    with pytest.raises(ValueError, match="famo"):
        build_weighting("dwa", TASKS).load_state_dict(state)
    with pytest.raises(ValueError, match="tasks"):
        build_weighting("famo", TASKS[:2]).load_state_dict(state)


# --- GradNorm's layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["hard_sharing", "mmoe", "cross_stitch"])
def test_gradnorm_measures_the_layer_the_architecture_shares(arch: str) -> None:
    """First step (w = 1, r = 1): |d L_grad / d w_t| = |grad_W L_t|. For hard sharing W is the backbone's
    last weight; MMoE and cross-stitch have no single shared last layer, so W is the representation."""
    torch.manual_seed(0)
    model = build_model(arch, {"a": 2, "b": 3}, "small_cnn")
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([[0, 1], [1, 2], [0, 0], [1, 1], [0, 2], [1, 0]])
    z = model.encode(x)
    logits = model.decode(z)
    losses = {t: nn.functional.cross_entropy(logits[t], y[:, k]) for k, t in enumerate(model.task_names)}
    layer = model.last_shared_layer()
    wrt = layer if layer is not None else [z]
    norms = [float(torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], wrt, retain_graph=True)]).norm()) for t in model.task_names]
    if arch == "hard_sharing":
        (w,) = layer
        assert w is dict(model.named_parameters())["backbone.features.12.weight"]  # the last conv, not a head
    else:
        assert layer is None
        with pytest.raises(ValueError, match="no"):
            build_weighting("gradnorm", model.task_names, {"on": "params"}).backward(
                losses, StepContext(model.shared_parameters(), shared_repr=z, last_shared_layer=layer)
            )
    method = build_weighting("gradnorm", model.task_names)
    method.backward(losses, StepContext(model.shared_parameters(), shared_repr=z, last_shared_layer=layer))
    torch.testing.assert_close(method.loss_weights.grad.abs(), torch.tensor(norms), rtol=1e-5, atol=1e-8)


# --- Nash-MTL against the authors' solver -------------------------------------------------------------

# alpha from the authors' code (AvivNavon/nash-mtl cce1840, methods/weight_methods.py, NashMTL with its
# defaults: GTG / |GTG|_F, 20 cvxpy/ECOS iterations; cvxpy 1.9.3, ecos 2.0.14), fresh solver per case.
NASH_REFERENCE = {
    "A": [0.8761863418248174, 0.9215359107542468],
    "B": [0.016068411235381035, 0.01392688680325672, 0.013855928730701078],
    "D": [26.216386646669925, 24.25097148669469, 16.85240046627722],
}


def nash_case(name: str) -> np.ndarray:
    if name == "A":
        return np.array([[1.0, 0.0, 0.5], [0.2, 1.0, -0.3]])
    if name == "B":
        return np.random.default_rng(0).normal(size=(3, 50)) * 10
    return np.random.default_rng(2).normal(size=(3, 20)) * 0.01


@pytest.mark.parametrize("case", sorted(NASH_REFERENCE))
def test_nash_mtl_matches_the_authors_solver(case: str) -> None:
    g = torch.from_numpy(nash_case(case))
    alpha = nash_mtl_weights(g @ g.T)
    torch.testing.assert_close(alpha, torch.tensor(NASH_REFERENCE[case], dtype=torch.float64), rtol=2e-6, atol=0)
