"""Fused heads (models.architectures.LinearHeads) and stacked losses (losses.stacked_cross_entropy):
the same numbers as K separate nn.Linear heads and K per-task losses, and the same files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mtl_core.losses import TaskLoss, weighted_cross_entropy
from mtl_core.models import build_model
from mtl_core.models.io import SPEC_FORMAT, load_model
from mtl_core.tasks import MISSING_LABEL
from mtl_core.weighting import StepContext, build_weighting
from mtl_core.weighting.gradients import batched_task_gradients, task_gradients

NUM_CLASSES = {"a": 2, "b": 5, "c": 2, "d": 3}


def model_and_separate_heads(arch: str) -> tuple[nn.Module, nn.ModuleDict]:
    """A model and K nn.Linear heads holding exactly its heads' weights (the pre-fusion layout)."""
    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES, "small_cnn")
    heads = nn.ModuleDict({t: nn.Linear(model.heads.in_features, n) for t, n in NUM_CLASSES.items()})
    with torch.no_grad():
        for t, head in heads.items():
            head.weight.copy_(model.heads[t].weight)
            head.bias.copy_(model.heads[t].bias)
    return model, heads


def separate_decode(model, heads: nn.ModuleDict, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """What decode computed with K separate heads (and, for MMoE, K separate gates)."""
    if model.heads.in_features == z.shape[-1] and z.dim() == 2:  # hard sharing
        return {t: h(z) for t, h in heads.items()}
    if z.dim() == 3:  # cross-stitch: head t reads branch t
        return {t: heads[t](z[:, k]) for k, t in enumerate(model.task_names)}
    f, experts = model.split(z)  # MMoE, gate by gate as before the fusion
    return {t: heads[t](torch.einsum("ne,neh->nh", model.gate(t, f), experts)) for t in model.task_names}


@pytest.mark.parametrize("arch", ["hard_sharing", "mmoe", "cross_stitch"])
def test_fused_heads_give_the_logits_and_gradients_of_separate_heads(arch):
    model, heads = model_and_separate_heads(arch)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (6, len(NUM_CLASSES)), generator=torch.Generator().manual_seed(2))
    model.eval()  # batch norm: the same statistics in both passes

    def grads(decode) -> tuple[dict, list, dict]:
        model.zero_grad()
        heads.zero_grad()
        z = model.encode(x)
        logits = decode(z)
        loss = sum((k + 1) * nn.functional.cross_entropy(logits[t], y[:, k]) for k, t in enumerate(NUM_CLASSES))
        loss.backward()
        return {t: v.detach() for t, v in logits.items()}, [p.grad.clone() for p in model.shared_parameters()], logits

    fused_logits, fused_shared, _ = grads(model.decode)
    fused_rows = {t: [g.clone() for g in model.heads[t].gradients()] for t in NUM_CLASSES}
    sep_logits, sep_shared, _ = grads(lambda z: separate_decode(model, heads, z))
    for t in NUM_CLASSES:
        torch.testing.assert_close(fused_logits[t], sep_logits[t], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_rows[t][0], heads[t].weight.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_rows[t][1], heads[t].bias.grad, rtol=1e-6, atol=1e-6)
    for a, b in zip(fused_shared, sep_shared):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_task_gradients_on_the_fused_head_are_each_tasks_own_rows():
    """A gradient method takes task k's gradient w.r.t. the fused weight: zero outside k's rows, so the
    K of them accumulate to each head's own gradient (what separate heads got)."""
    model, heads = model_and_separate_heads("hard_sharing")
    z = torch.randn(5, model.heads.in_features, requires_grad=True)
    y = torch.randint(0, 2, (5, len(NUM_CLASSES)), generator=torch.Generator().manual_seed(3))
    losses = TaskLoss(list(NUM_CLASSES))(model.decode(z), y)
    weighting = build_weighting("pcgrad", list(NUM_CLASSES), {"on": "representation"})
    private = {t: list(model.task_parameters(t)) for t in NUM_CLASSES}
    weighting.backward(losses, StepContext(shared_params=[], task_params=private, shared_repr=z))
    sep = TaskLoss(list(NUM_CLASSES))({t: h(z.detach()) for t, h in heads.items()}, y)
    for t in NUM_CLASSES:
        w, b = torch.autograd.grad(sep[t], [heads[t].weight, heads[t].bias], retain_graph=True)
        torch.testing.assert_close(model.heads[t].gradients()[0], w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model.heads[t].gradients()[1], b, rtol=1e-6, atol=1e-7)


def test_state_dict_keeps_one_entry_per_head_and_old_state_dicts_load():
    model, heads = model_and_separate_heads("hard_sharing")
    state = model.state_dict()
    assert {k for k in state if k.startswith("heads.")} == {f"heads.{t}.{n}" for t in NUM_CLASSES for n in ("weight", "bias")}
    # a state dict as K nn.Linear in a ModuleDict wrote it (other weights than the model's)
    old = {k: v for k, v in state.items() if not k.startswith("heads.")}
    with torch.no_grad():
        for t, h in heads.items():
            h.weight.mul_(-2.0)
    old.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    fresh = build_model("hard_sharing", NUM_CLASSES, "small_cnn").eval()
    fresh.load_state_dict(old)
    z = torch.randn(3, fresh.heads.in_features)
    for t, h in heads.items():
        torch.testing.assert_close(fresh.decode(z)[t], h(z))
    # the fused layout loads too
    fused = {k: v for k, v in old.items() if not k.startswith("heads.")}
    fused.update({"heads.weight": fresh.heads.weight.detach().clone(), "heads.bias": fresh.heads.bias.detach().clone()})
    again = build_model("hard_sharing", NUM_CLASSES, "small_cnn").eval()
    again.load_state_dict(fused)
    torch.testing.assert_close(again.heads.weight, fresh.heads.weight)


def test_a_state_dict_with_other_heads_is_refused_naming_them():
    model, _ = model_and_separate_heads("hard_sharing")
    state = model.state_dict()
    wrong = dict(state, **{"heads.b.weight": torch.zeros(4, model.heads.in_features), "heads.b.bias": torch.zeros(4)})
    with pytest.raises(RuntimeError, match="heads of shapes .*'b': \\(4, 256\\)"):
        build_model("hard_sharing", NUM_CLASSES, "small_cnn").load_state_dict(wrong)
    swapped = dict(state, **{"heads.a.weight": state["heads.d.weight"], "heads.d.weight": state["heads.a.weight"]})
    with pytest.raises(RuntimeError, match="heads of shapes .*'a': \\(3, 256\\)"):  # same total rows
        build_model("hard_sharing", NUM_CLASSES, "small_cnn").load_state_dict(swapped)
    missing = {k: v for k, v in state.items() if k != "heads.c.bias"}
    with pytest.raises(RuntimeError, match="Missing key.*heads.c.bias"):
        build_model("hard_sharing", NUM_CLASSES, "small_cnn").load_state_dict(missing)
    extra = dict(state, **{"heads.e.weight": torch.zeros(2, 256), "heads.e.bias": torch.zeros(2)})
    with pytest.raises(RuntimeError, match="Unexpected key.*heads.e.weight"):
        build_model("hard_sharing", NUM_CLASSES, "small_cnn").load_state_dict(extra)


def test_load_model_reads_a_model_file_written_with_separate_heads(tmp_path):
    """A safetensors file of K separate heads (every model file written before the fusion) loads and
    predicts what those heads did; a file of other tasks is refused, naming the file."""
    model, heads = model_and_separate_heads("hard_sharing")
    model.eval()
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("heads.")}
    weights.update({f"heads.{k}": v.detach().clone() for k, v in heads.state_dict().items()})
    save_file(weights, tmp_path / "model.safetensors")
    spec = {"format": SPEC_FORMAT, "arch": "hard_sharing", "backbone": "small_cnn", "tasks": {t: [str(i) for i in range(n)] for t, n in NUM_CLASSES.items()}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    loaded, _ = load_model(tmp_path / "spec.json", tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = model.encode(x)
        for t, h in heads.items():
            torch.testing.assert_close(loaded(x)[t], h(z))
    spec["tasks"]["b"] = ["0", "1"]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="model.safetensors: the weights do not fit the network of .*spec.json"):
        load_model(tmp_path / "spec.json", tmp_path / "model.safetensors")


def test_stacked_losses_equal_the_per_task_formula():
    """TaskLoss computes tasks of one class count without class weights together: each value is the
    per-task weighted_cross_entropy, with missing labels, sample weights, smoothing and given denominators."""
    gen = torch.Generator().manual_seed(0)
    names = [f"t{k}" for k in range(6)]
    classes = [2, 2, 3, 2, 3, 4]
    n = 9
    logits = {t: torch.randn(n, c, generator=gen, requires_grad=True) for t, c in zip(names, classes)}
    y = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in classes], 1)
    y[torch.rand(n, len(names), generator=gen) < 0.3] = MISSING_LABEL
    y[:, 4] = MISSING_LABEL  # a task with no label in the batch: loss 0, in the graph
    w = torch.rand(n, generator=gen)
    class_weights = {"t1": torch.tensor([1.0, 3.0])}  # t1 has class weights: computed on its own
    for smoothing in (0.0, 0.1):
        loss_fn = TaskLoss(names, class_weights, smoothing)
        for weights in (None, w):
            for denominators in (None, torch.rand(len(names), generator=gen) + 0.5):
                got = loss_fn(logits, y, weights, denominators)
                assert list(got) == names
                for k, t in enumerate(names):
                    want = weighted_cross_entropy(
                        logits[t], y[:, k], weights, class_weights.get(t), smoothing,
                        None if denominators is None else denominators[k],
                    )  # fmt: skip
                    torch.testing.assert_close(got[t], want, rtol=1e-6, atol=1e-7)
                    g_got = torch.autograd.grad(got[t], logits[t], retain_graph=True)[0]
                    g_want = torch.autograd.grad(want, logits[t])[0]
                    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-7)
                assert float(got["t4"].detach()) == 0.0 and got["t4"].requires_grad


@pytest.mark.parametrize("arch", ["hard_sharing", "mmoe"])
def test_batched_task_gradients_equal_k_backward_passes(arch):
    """on: representation takes the K per-task gradients in one vectorised pass: the same rows, and the
    same head gradients, as K passes (fused heads listed by every task; a parameter listed by one)."""
    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES, "small_cnn").eval()
    x = torch.randn(5, 3, 32, 32)
    y = torch.randint(0, 2, (5, len(NUM_CLASSES)), generator=torch.Generator().manual_seed(4))
    y[1, 2] = MISSING_LABEL
    extra = torch.nn.Parameter(torch.ones(()))  # a parameter only task "b" uses
    heads = [list(model.task_parameters(t)) + ([extra] if t == "b" else []) for t in NUM_CLASSES]

    def run(fn):
        model.zero_grad()
        extra.grad = None
        z = model.encode(x).detach().requires_grad_()
        losses = TaskLoss(list(NUM_CLASSES))(model.decode(z), y)
        losses["b"] = losses["b"] * extra
        return fn(list(losses.values()), [z], heads), [p.grad.clone() for p in (*model.task_parameters("a"), extra)]

    rows_k, heads_k = run(lambda losses, wrt, h: task_gradients(losses, wrt, h, retain_graph=True))
    rows_b, heads_b = run(batched_task_gradients)
    torch.testing.assert_close(rows_b, rows_k, rtol=1e-6, atol=1e-7)
    for a, b in zip(heads_b, heads_k):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
