"""GradNorm. Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_core.weighting.base import LossWeighting, StepContext, register_weighting
from mtl_core.weighting.gradients import check_source, last_shared_layer, task_gradients


def gradnorm_loss(
    weights: Tensor, grad_norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float
) -> Tensor:
    """L_grad = sum_t |G_t - target_t| with G_t = w_t |grad_W L_t|, target_t = mean(G) * r_t^alpha
    (held constant), r_t = (L_t / L_t(0)) / mean_k (L_k / L_k(0)) the relative inverse training rate."""
    g = weights * grad_norms.detach()
    ratio = losses.detach() / initial_losses.clamp(min=1e-12)
    r = ratio / ratio.mean()
    target = (g.mean() * r**alpha).detach()
    return (g - target).abs().sum()


@register_weighting("gradnorm")
class GradNorm(LossWeighting):
    """GradNorm (Chen et al., 2018): learnable loss weights w_t (init 1) trained to make the weighted
    task-gradient norms G_t = w_t |grad_W L_t| track mean(G) * r_t^alpha, where r_t compares the task's
    training rate L_t / L_t(0) (L_t(0): losses of the first step) with the others'. The network gets
    sum_t w_t L_t (w held constant); w gets grad of sum_t |G_t - target_t| only, into `w.grad` for the
    trainer's optimizer. The paper renormalises w to sum K after every update: done at the start of
    each `backward` (the same thing, as nothing reads w in between), with w clamped to >= 1e-4 first.

    W is the last shared layer -- the last trainable parameter of ctx.shared_params with >= 2 dims
    (its weight matrix / kernel; `on: params`, default) -- or the shared representation
    (`on: representation`, gradient norms w.r.t. ctx.shared_repr).
    Because G_t is linear in w_t, d L_grad / d w_t = sign(G_t - target_t) |grad_W L_t|: no second-order
    backward is needed.

    Options: `alpha` (float >= 0, default 1.5), `on` (params | representation).
    Cost per step: K partial backward passes from the losses down to W only (cheap when W is the last
    shared layer or the representation) + one full backward; memory: K copies of grad_W.
    """

    def __init__(
        self, task_names: Sequence[str], *, alpha: float = 1.5, on: str = "params", **options: Any
    ) -> None:
        super().__init__(task_names, **options)
        if alpha < 0:
            raise ValueError(f"gradnorm option alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.on = check_source(on)
        self.loss_weights = nn.Parameter(torch.ones(self.num_tasks))
        self.initial_losses: Tensor | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [self.loss_weights]

    def _wrt(self, ctx: StepContext) -> list[Tensor]:
        if self.on == "params":
            return last_shared_layer(ctx.shared_params)
        if ctx.shared_repr is None or not ctx.shared_repr.requires_grad:
            raise ValueError("gradnorm on: representation needs ctx.shared_repr (not detached)")
        return [ctx.shared_repr]

    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> dict[str, float]:
        stacked = self.stack_losses(losses)
        w = self.loss_weights
        with torch.no_grad():
            w.clamp_(min=1e-4)
            w.mul_(self.num_tasks / w.sum())
        if self.initial_losses is None:
            self.initial_losses = stacked.detach().float().clone()
        per_task = task_gradients([losses[t] for t in self.task_names], self._wrt(ctx), retain_graph=True)
        norms = per_task.float().norm(dim=1).to(w.device)
        current = stacked.detach().float().to(w.device)
        l_grad = gradnorm_loss(w, norms, current, self.initial_losses.to(w.device), self.alpha)
        (grad_w,) = torch.autograd.grad(l_grad, w)
        w.grad = grad_w if w.grad is None else w.grad + grad_w
        (w.detach().to(device=stacked.device, dtype=stacked.dtype) * stacked).sum().backward()
        return self.as_dict(w)
