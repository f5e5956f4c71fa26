"""FAMO's `update` option: `same_batch` (the reference code: the step's batch re-evaluated after the
optimizer step) and `next_batch` (the next step's losses, no extra forward pass)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_core.weighting import StepContext, build_weighting
from mtl_core.weighting.famo import famo_logit_grad

LR, GAMMA = 0.025, 0.01
B1, B2 = 0.9, 0.999


def leaf(values: list[float], names: tuple[str, ...] = ("a", "b")) -> dict[str, Tensor]:
    return {t: torch.tensor(v, requires_grad=True) for t, v in zip(names, values)}


def ctx(labelled: list[bool] | None = None) -> StepContext:
    return StepContext([], labelled=None if labelled is None else torch.tensor(labelled))


def next_batch(tasks: tuple[str, ...] = ("a", "b"), **options: float) -> object:
    return build_weighting("famo", list(tasks), {"gamma": GAMMA, "w_lr": LR, "update": "next_batch", **options})


def famo_weights(logits: Tensor, losses: Tensor) -> Tensor:
    """FAMO's effective loss weights z_t / (c L_t), c = sum z / L (L* = 0)."""
    z = torch.softmax(logits, 0)
    return (z / losses) / (z / losses).sum()


# --- the option -----------------------------------------------------------------------------------


def test_the_update_option_and_the_extra_forward_it_needs() -> None:
    assert build_weighting("famo", ["a", "b"]).update == "same_batch"  # the default: the reference code
    assert build_weighting("famo", ["a", "b"]).needs_losses_after_step
    assert build_weighting("famo", ["a", "b"], {"update": "same_batch"}).needs_losses_after_step
    method = build_weighting("famo", ["a", "b"], {"update": "next_batch"})
    assert method.needs_losses_after_step is False
    method.backward(leaf([1.0, 2.0]), ctx())
    method.backward(leaf([0.9, 1.9]), ctx())  # no after_step in between: not an error for next_batch
    with pytest.raises(RuntimeError, match="next_batch"):
        method.after_step(leaf([0.9, 1.9]))
    with pytest.raises(ValueError, match="update"):
        build_weighting("famo", ["a", "b"], {"update": "previous_batch"})


# --- by hand --------------------------------------------------------------------------------------


def test_next_batch_logit_updates_by_hand() -> None:
    """Losses (1, 2), (0.5, 1.8), (0.45, 1.0) on three steps. Step 1 has no previous batch: no logit
    update. Step 2, before its weights: delta = log(1 / 0.5), log(2 / 1.8) -> one Adam step. Step 3:
    delta = log(0.5 / 0.45), log(1.8 / 1.0) -> the second Adam step (with weight decay gamma xi)."""
    method = next_batch()
    l1, l2, l3 = [1.0, 2.0], [0.5, 1.8], [0.45, 1.0]

    losses = leaf(l1)
    w1 = method.backward(losses, ctx())
    torch.testing.assert_close(w1, torch.tensor([2 / 3, 1 / 3]))  # xi = 0: z = (1/2, 1/2), w = z/L / sum
    assert float(losses["a"].grad) == pytest.approx(2 / 3)
    assert method.logits.tolist() == [0.0, 0.0] and method.adam_steps.tolist() == [0.0, 0.0]

    losses = leaf(l2)
    w2 = method.backward(losses, ctx())
    # z = (1/2, 1/2): g = z (delta - z . delta) = (+, -) (ln 2 - ln(10/9)) / 4
    s = (math.log(2.0) - math.log(2.0 / 1.8)) / 4
    g1 = torch.tensor([s, -s])
    torch.testing.assert_close(famo_logit_grad(torch.zeros(2), torch.tensor([math.log(2.0), math.log(2.0 / 1.8)])), g1)
    xi1 = -LR * g1 / (g1.abs() + 1e-8)  # first Adam step: bias-corrected m / sqrt(v) = g / |g|; decay 0 at xi = 0
    torch.testing.assert_close(method.logits, xi1)
    assert method.logits[0] < method.logits[1]  # task a's log-loss fell faster -> less weight
    # this step's weights already use the updated logits
    torch.testing.assert_close(w2, famo_weights(xi1, torch.tensor(l2)))
    torch.testing.assert_close(torch.stack([losses["a"].grad, losses["b"].grad]), w2)

    w3 = method.backward(leaf(l3), ctx())
    delta2 = torch.tensor([math.log(0.5 / 0.45), math.log(1.8 / 1.0)])
    g2 = famo_logit_grad(xi1, delta2) + GAMMA * xi1
    m = B1 * (1 - B1) * g1 + (1 - B1) * g2
    v = B2 * (1 - B2) * g1**2 + (1 - B2) * g2**2
    xi2 = xi1 - LR * (m / (1 - B1**2)) / ((v / (1 - B2**2)).sqrt() + 1e-8)
    torch.testing.assert_close(method.logits, xi2)
    torch.testing.assert_close(w3, famo_weights(xi2, torch.tensor(l3)))
    assert method.adam_steps.tolist() == [2.0, 2.0]


def test_next_batch_equals_same_batch_when_the_next_losses_are_the_re_evaluated_ones() -> None:
    """The two variants differ only in which losses follow the step: fed the same numbers, they take the
    same logit steps (next_batch one step later: its update happens at the start of the next step)."""
    same = build_weighting("famo", ["a", "b"], {"gamma": GAMMA, "w_lr": LR})
    nxt = next_batch()
    seq = [[1.0, 2.0], [0.5, 1.8], [0.45, 1.0], [0.44, 0.7], [0.3, 0.69]]
    for before, after in zip(seq, seq[1:]):
        same.backward(leaf(before), ctx())
        same.after_step(leaf(after))
        nxt.backward(leaf(before), ctx())
    nxt.backward(leaf(seq[-1]), ctx())
    for k in same.STATE:
        torch.testing.assert_close(getattr(nxt, k), getattr(same, k), rtol=0, atol=0)


# --- labelled tasks -------------------------------------------------------------------------------


def test_a_task_unlabelled_in_the_previous_or_the_current_batch_keeps_its_logit() -> None:
    tasks = ("a", "b", "c")
    method = next_batch(tasks)
    method.backward(leaf([1.0, 2.0, 1.5], tasks), ctx([True, True, True]))
    method.backward(leaf([0.5, 1.8, 1.4], tasks), ctx([True, True, True]))  # all three take step 1
    xi, m, v = method.logits.clone(), method.adam_m.clone(), method.adam_v.clone()
    assert method.adam_steps.tolist() == [1.0, 1.0, 1.0]

    # c unlabelled in the CURRENT batch (its loss is a constant 0): a and b take a step on their own
    w = method.backward(leaf([0.4, 1.5, 0.0], tasks), ctx([True, True, False]))
    assert float(w[2]) == 0.0
    assert method.logits[2] == xi[2] and method.adam_m[2] == m[2] and method.adam_v[2] == v[2]
    assert method.adam_steps.tolist() == [2.0, 2.0, 1.0]
    # a and b: Adam's second step along the softmax over their two logits alone, delta from their losses
    g = famo_logit_grad(xi[:2], torch.tensor([math.log(0.5 / 0.4), math.log(1.8 / 1.5)])) + GAMMA * xi[:2]
    m2, v2 = B1 * m[:2] + (1 - B1) * g, B2 * v[:2] + (1 - B2) * g**2
    xi2 = xi[:2] - LR * (m2 / (1 - B1**2)) / ((v2 / (1 - B2**2)).sqrt() + 1e-8)
    torch.testing.assert_close(method.logits[:2], xi2)
    torch.testing.assert_close(w[:2], famo_weights(xi2, torch.tensor([0.4, 1.5])))

    # c unlabelled in the PREVIOUS batch, labelled now: still no update for c (its previous loss was the 0)
    xi_c = method.logits[2].clone()
    method.backward(leaf([0.35, 1.4, 1.2], tasks), ctx([True, True, True]))
    assert method.logits[2] == xi_c
    assert method.adam_steps.tolist() == [3.0, 3.0, 1.0]

    # labelled in both batches again: c takes its second Adam step
    method.backward(leaf([0.3, 1.3, 1.0], tasks), ctx([True, True, True]))
    assert method.logits[2] != xi_c
    assert method.adam_steps.tolist() == [4.0, 4.0, 2.0]


def test_a_task_never_labelled_gives_the_method_of_the_labelled_tasks_alone() -> None:
    full, alone = next_batch(("a", "b", "c")), next_batch(("a", "b"))
    for values in ([1.0, 2.0], [0.5, 1.8], [0.45, 1.0], [0.44, 0.7]):
        wf = full.backward(leaf([*values, 0.0], ("a", "b", "c")), ctx([True, True, False]))
        wa = alone.backward(leaf(values), ctx())
        assert float(wf[2]) == 0.0
        torch.testing.assert_close(wf[:2], wa, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(full.logits[:2], alone.logits, rtol=1e-6, atol=1e-7)
    assert full.logits[2] == 0.0 and full.adam_steps[2] == 0.0


def test_nothing_labelled_makes_no_update_and_is_no_previous_batch() -> None:
    method = next_batch()
    method.backward(leaf([1.0, 2.0]), ctx())
    w = method.backward(leaf([0.0, 0.0]), ctx([False, False]))
    assert w.tolist() == [0.0, 0.0] and method.logits.tolist() == [0.0, 0.0]
    method.backward(leaf([0.5, 1.8]), ctx())  # the previous batch had nothing labelled: still no update
    assert method.logits.tolist() == [0.0, 0.0] and method.adam_steps.tolist() == [0.0, 0.0]


# --- epochs and checkpoints -----------------------------------------------------------------------


def test_the_previous_losses_carry_over_an_epoch_boundary() -> None:
    method = next_batch()
    method.backward(leaf([1.0, 2.0]), ctx())  # the last step of epoch 1
    method.on_epoch_end(1, {"a": 1.0, "b": 2.0})
    method.backward(leaf([0.5, 1.8]), ctx())  # the first step of epoch 2 updates from it
    assert method.adam_steps.tolist() == [1.0, 1.0] and method.logits[0] < method.logits[1]


class Net:
    """A seeded shared Linear(4, 6) + tanh and one Linear(6, 3) head per task, trained with SGD."""

    def __init__(self, tasks: tuple[str, ...]) -> None:
        torch.manual_seed(0)
        self.shared = nn.Linear(4, 6)
        self.heads = {t: nn.Linear(6, 3) for t in tasks}
        self.tasks = tasks

    def params(self) -> list[nn.Parameter]:
        return [*self.shared.parameters(), *(p for h in self.heads.values() for p in h.parameters())]

    def steps(self, method: object, first: int, count: int) -> list[Tensor]:
        """SGD steps on seeded batches (task c unlabelled in every third one); each step's weights and
        shared gradient."""
        opt = torch.optim.SGD(self.params(), lr=0.2)
        out = []
        for i in range(first, first + count):
            gen = torch.Generator().manual_seed(100 + i)
            x = torch.randn(16, 4, generator=gen)
            y = {t: torch.randint(0, 3, (16,), generator=gen) for t in self.tasks}
            labelled = [True, True, i % 3 != 1]
            opt.zero_grad(set_to_none=True)
            z = torch.tanh(self.shared(x))
            losses = {t: F.cross_entropy(self.heads[t](z), y[t]) * (1.0 if ok else 0.0) for t, ok in zip(self.tasks, labelled)}
            out.append(method.backward(losses, StepContext(list(self.shared.parameters()), labelled=torch.tensor(labelled))).detach().clone())
            out.append(torch.cat([p.grad.reshape(-1) for p in self.shared.parameters()]).detach().clone())
            opt.step()
            assert not method.needs_losses_after_step
        return out


def test_state_dict_round_trip_reproduces_the_next_steps_exactly() -> None:
    tasks = ("a", "b", "c")
    net = Net(tasks)
    method = next_batch(tasks)
    net.steps(method, 0, 5)
    buffer = io.BytesIO()
    torch.save({"net": [p.detach().clone() for p in net.params()], "weighting": method.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert {"last_losses", "last_labelled"} <= set(saved["weighting"])
    assert "last_losses" not in build_weighting("famo", list(tasks)).state_dict()  # same_batch: as before

    def resumed(state: dict | None) -> list[Tensor]:
        other = Net(tasks)
        with torch.no_grad():
            for p, v in zip(other.params(), saved["net"]):
                p.copy_(v)
        fresh = next_batch(tasks)
        if state is not None:
            fresh.load_state_dict(state)
        return other.steps(fresh, 5, 3)

    expected = net.steps(method, 5, 3)
    for a, b in zip(resumed(saved["weighting"]), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(resumed(None), expected))
    # without the previous losses (logits and Adam state only) the first weights after resuming differ
    partial = {k: v for k, v in saved["weighting"].items() if k not in ("last_losses", "last_labelled")}
    assert not torch.equal(resumed(partial)[0], expected[0])


def test_a_same_batch_checkpoint_starts_next_batch_with_no_previous_batch() -> None:
    same = build_weighting("famo", ["a", "b"], {"gamma": GAMMA, "w_lr": LR})
    same.backward(leaf([1.0, 2.0]), ctx())
    same.after_step(leaf([0.5, 1.8]))
    method = next_batch()
    method.load_state_dict(same.state_dict())
    torch.testing.assert_close(method.logits, same.logits, rtol=0, atol=0)
    method.backward(leaf([0.45, 1.0]), ctx())
    torch.testing.assert_close(method.logits, same.logits, rtol=0, atol=0)  # no logit update on this step
