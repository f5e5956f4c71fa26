"""Per-task gradient plumbing shared by the gradient-balancing methods.

Two places to take the K per-task gradients from (the `on` option of every gradient-balancing method):

* `on: params` -- gradients w.r.t. the shared parameters `ctx.shared_params`, flattened to
  G (K, P). Cost: K backward passes through the whole network (graph kept alive between them) and
  K*P extra floats for G. The combined gradient is written straight into the shared `.grad`.
* `on: representation` -- gradients w.r.t. the shared representation `ctx.shared_repr` (the batch's
  backbone output, B x F...), flattened to G (K, B*F). Cost: the K backward passes through the HEADS
  only, taken as one vectorised pass (`batched_task_gradients`), then ONE backward through the
  backbone with the combined representation gradient; memory K*B*F.
  This is the "upper bound" variant of Sener & Koltun (MGDA-UB); it assumes the losses depend on the
  backbone only through `shared_repr`.

* `on: auto` (default) -- `params` up to AUTO_REPRESENTATION_ABOVE tasks, `representation` above (logged
  once), where the K backward passes through the network make a step many times dearer than equal
  weighting's (docs/benchmark-task-scaling.md); `params` where the architecture's representation
  gradients are not exact (`for_model`: cross-stitch with per-task branches).

In both modes each head receives the plain gradient of its own task's loss (weight 1), taken in the
same backward pass as its task's shared gradient. Every method is a function of the K x K Gram
matrix G G^T (and the losses) returning weights w (K,); the combined gradient is d = w @ G, so w is
exactly the effective per-task weight that `backward` reports.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtl_core.weighting.base import LossWeighting, StepContext

GradientSource = Literal["params", "representation"]

log = logging.getLogger(__name__)

AUTO_REPRESENTATION_ABOVE = 10
"""`on: auto` takes the per-task gradients on the representation above this many tasks. Measured
(docs/benchmark-task-scaling.md: small_cnn, batch 64, 2 CPU cores): pcgrad on the parameters costs
2.4x equal weighting at K = 4, ~6x at K = 10 and ~21x at K = 40; on the representation 0.9-1.1x at
every K. Up to 10 tasks the parameters (the methods' original, exact formulation) stay the default;
above, their cost grows past 5x a step."""


def trainable(params: Sequence[Tensor]) -> list[Tensor]:
    return [p for p in params if p.requires_grad]


def flatten(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate gradients into one vector; a None (unused tensor) counts as zeros."""
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, like)]
    )


def accumulate_grad(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Add `grads` into `p.grad` (creating it), like `Tensor.backward` does."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        g = g.detach().to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


def accumulate_flat_grad(params: Sequence[Tensor], vec: Tensor) -> None:
    """Split the flat vector `vec` along `params` and add the pieces into their `.grad`."""
    pieces, offset = [], 0
    for p in params:
        pieces.append(vec[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    if offset != vec.numel():
        raise ValueError(f"gradient vector has {vec.numel()} entries, parameters {offset}")
    accumulate_grad(params, pieces)


def task_gradients(
    losses: Sequence[Tensor],
    wrt: Sequence[Tensor],
    heads: Sequence[Sequence[Tensor]] | None = None,
    retain_graph: bool = True,
) -> Tensor:
    """G (K, D): row k is the flattened gradient of losses[k] w.r.t. `wrt` (K backward passes).

    If `heads` is given, the gradient of losses[k] w.r.t. heads[k] is taken in the same pass and
    accumulated into their `.grad`. With retain_graph=False the graph is freed by the last pass.
    """
    rows = []
    for k, loss in enumerate(losses):
        head = trainable(heads[k]) if heads is not None else []
        keep = retain_graph or k < len(losses) - 1
        grads = torch.autograd.grad(loss, [*wrt, *head], retain_graph=keep, allow_unused=True)
        rows.append(flatten(grads[: len(wrt)], wrt))
        accumulate_grad(head, grads[len(wrt) :])
    return torch.stack(rows)


def batched_task_gradients(
    losses: Sequence[Tensor], wrt: Sequence[Tensor], heads: Sequence[Sequence[Tensor]] | None = None
) -> Tensor:
    """`task_gradients` (graph kept) in ONE vectorised backward pass instead of K: torch.autograd.grad
    with `is_grads_batched` (vmap over the K one-hot output gradients). Why: on the representation the
    K passes are K rounds of the same small head and loss kernels, which at tens of tasks cost more than
    the backbone's one pass (docs/benchmark-task-scaling.md); batched, they are one round of K-wide ones.

    Head parameters get the same accumulated gradient as in `task_gradients`: the sum over the tasks k
    that list a parameter in heads[k] of the gradient of losses[k] (memory: K x the head parameters)."""
    k = len(losses)
    head_lists = [trainable(h) for h in heads] if heads is not None else [[] for _ in losses]
    unique = list({id(p): p for h in head_lists for p in h}.values())  # fused heads: listed by every task
    stacked = torch.stack([loss.reshape(()).float() for loss in losses])
    eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(
        stacked, [*wrt, *unique], grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
    )  # fmt: skip
    rows = torch.cat([
        (g if g is not None else torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device)).reshape(k, -1)
        for g, p in zip(grads[: len(wrt)], wrt)
    ], dim=1)  # fmt: skip
    own = []
    for p, g in zip(unique, grads[len(wrt) :]):
        listed = [i for i in range(k) if any(q is p for q in head_lists[i])]
        own.append(None if g is None else (g.sum(0) if len(listed) == k else g[listed].sum(0)))
    accumulate_grad(unique, own)
    return rows


def gram_matrix(grads: Tensor) -> Tensor:
    """G G^T as a float64 CPU tensor (the small K x K problem every method solves)."""
    g = grads if grads.dtype == torch.float64 else grads.float()
    return (g @ g.T).double().cpu()


def combine(grads: Tensor, weights: Tensor) -> Tensor:
    """d = sum_k weights[k] * grads[k]."""
    return weights.to(device=grads.device, dtype=grads.dtype) @ grads


def check_source(on: str) -> str:
    if on not in ("auto", "params", "representation"):
        raise ValueError(f"option 'on' must be 'auto', 'params' or 'representation', got {on!r}")
    return on


def resolve_source(on: str, num_tasks: int) -> GradientSource:
    """`on` with `auto` resolved for `num_tasks` tasks (see AUTO_REPRESENTATION_ABOVE)."""
    if check_source(on) != "auto":
        return on  # type: ignore[return-value]
    return "representation" if num_tasks > AUTO_REPRESENTATION_ABOVE else "params"


def shared_task_gradients(
    losses: Sequence[Tensor], task_names: Sequence[str], ctx: StepContext, on: GradientSource
) -> Tensor:
    """Per-task gradients on the shared params or representation; heads get their own task's grads."""
    heads = [ctx.task_params.get(t, []) for t in task_names]
    if on == "params":
        return task_gradients(losses, trainable(ctx.shared_params), heads, retain_graph=False)
    if ctx.shared_repr is None or not ctx.shared_repr.requires_grad:
        raise ValueError("on: representation needs ctx.shared_repr (the backbone output, not detached)")
    return batched_task_gradients(losses, [ctx.shared_repr], heads)


def apply_shared_gradient(combined: Tensor, ctx: StepContext, on: GradientSource) -> None:
    """Write the combined gradient: into the shared `.grad`, or backpropagate it through the backbone."""
    if on == "params":
        accumulate_flat_grad(trainable(ctx.shared_params), combined)
    else:
        assert ctx.shared_repr is not None
        ctx.shared_repr.backward(combined.view_as(ctx.shared_repr).to(ctx.shared_repr.dtype))


def global_gram(grads: Tensor, ctx: StepContext, on: GradientSource) -> tuple[Tensor, Tensor]:
    """(grads, Gram matrix) of the GLOBAL batch under DDP (unchanged with one process).

    The rank's per-task gradients are its share of the global batch's, scaled by the world size W (the
    trainer's losses use the global denominator / W). On the parameters the global gradients are their
    mean over the ranks: one all-reduce of K x P floats. On the representation each rank holds the rows
    of its own samples, so the global Gram matrix is sum_r G_r G_r^T / W^2: one all-reduce of K x K
    floats; the rank keeps its own rows (the combined gradient of its samples, up to the factor W that
    the final mean of the parameter gradients takes out)."""
    dist = ctx.dist
    if on == "params":
        grads = dist.mean(grads)
        return grads, gram_matrix(grads)
    return grads, dist.sum(gram_matrix(grads)) / dist.world_size**2


class GradientBalancing(LossWeighting):
    """Base of the methods that combine per-task gradients (option `on`: params | representation).

    Under DDP (`reduces_gradients`): the per-task gradients or their Gram matrix are reduced over the
    ranks before the solve (`global_gram`), so every rank solves the same K x K problem; the gradients
    each rank still holds of its own samples (the heads', and on the representation the backbone's)
    are averaged after it. Communication per step: K x P + heads (params), K x K + P (representation)."""

    reduces_gradients = True

    def __init__(self, task_names: Sequence[str], *, on: str = "auto", **options: Any) -> None:
        super().__init__(task_names, **options)
        self.on_option = check_source(on)
        self.on: GradientSource = resolve_source(on, self.num_tasks)
        if self.on_option == "auto" and self.on == "representation":
            log.info(
                "%s on: auto -> representation for %d tasks (more than %d): on the parameters every step "
                "would take %d backward passes through the whole network (set on: params to insist)",
                self.name, self.num_tasks, AUTO_REPRESENTATION_ABOVE, self.num_tasks,
            )  # fmt: skip

    def for_model(self, exact_representation_gradients: bool) -> None:
        """`on: auto` falls back to the parameters where the representation's gradients are not exact
        (task-specific parameters inside the encoder); an explicit `on` is left as set (the trainer
        refuses `on: representation` there)."""
        if self.on_option == "auto" and self.on == "representation" and not exact_representation_gradients:
            log.info("%s on: auto -> params: this architecture's representation gradients are not exact", self.name)
            self.on = "params"

    @abstractmethod
    def combine_weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        """Weights w (K,), float64, from the Gram matrix (K, K, float64) and detached losses (K,)."""

    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> Tensor:
        """Solve on the labelled tasks alone: an unlabelled task (zero loss, zero gradient) is left out
        of the per-task gradients and of the solve, and gets weight 0."""
        stacked = self.stack_losses(losses)
        mask = self.labelled_mask(ctx)
        weights = torch.zeros(self.num_tasks, dtype=torch.float64)
        if not bool(mask.any()):
            return weights
        active = [t for t, m in zip(self.task_names, mask.tolist()) if m]
        grads = shared_task_gradients([losses[t] for t in active], active, ctx, self.on)
        grads, gram = global_gram(grads, ctx, self.on)
        w = self.combine_weights(gram, stacked.detach()[mask.to(stacked.device)].double().cpu())
        apply_shared_gradient(combine(grads, w), ctx, self.on)
        if ctx.dist.enabled:  # what is still this rank's own: the heads' (and the backbone's) gradients
            # once each: tasks may share one fused head Parameter (models.architectures.LinearHeads)
            local = list({id(p): p for t in active for p in ctx.task_params.get(t, [])}.values())
            if self.on == "representation":
                local += trainable(ctx.shared_params)
            ctx.dist.average_gradients(local)
        weights[mask] = w
        return weights
