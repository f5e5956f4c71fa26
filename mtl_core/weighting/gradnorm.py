"""GradNorm. Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_core.weighting.base import LossWeighting, StepContext, register_weighting
from mtl_core.weighting.gradients import global_gram, task_gradients


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
    training rate L_t / L_t(0) with the others'. The network gets sum_t w_t L_t (w held constant); w
    gets grad of sum_t |G_t - target_t| only, into `w.grad` for the trainer's optimizer. The paper
    renormalises w to sum K after every update: done at the start of each `backward` (the same thing,
    as nothing reads w in between), with w clamped to >= 1e-4 first; in a batch with unlabelled tasks
    the labelled tasks' weights are renormalised to sum to their number.

    W (option `on`):
    * `auto` (default): the architecture's last shared layer (`ctx.last_shared_layer`: the backbone's
      last weight for hard sharing) where it has one, else the shared representation. MMoE (parallel
      experts) and cross-stitch (per-task branches) have no single last shared layer: there G_t is the
      norm of the gradient w.r.t. the representation each head receives (`ctx.shared_repr`); the
      last expert's or the last stitch's weight would see only part of the shared computation.
    * `params`: `ctx.last_shared_layer` (an error where the architecture has none).
    * `representation`: always the shared representation.
    Because G_t is linear in w_t, d L_grad / d w_t = sign(G_t - target_t) |grad_W L_t|: no second-order
    backward is needed.

    Missing labels: L_t(0) is task t's loss in the first batch where it has a labelled sample (not
    simply the first batch, whose 0 would collapse the weights), and in a batch where task t is
    unlabelled it is left out: weight 0, no gradient norm, not part of mean(G) nor of the rates.

    Options: `alpha` (float >= 0, default 1.5), `on` (auto | params | representation).
    Cost per step: K partial backward passes from the losses down to W only (cheap when W is the last
    shared layer or the representation) + one full backward; memory: K copies of grad_W.
    """

    def __init__(
        self, task_names: Sequence[str], *, alpha: float = 1.5, on: str = "auto", **options: Any
    ) -> None:
        super().__init__(task_names, **options)
        if alpha < 0:
            raise ValueError(f"gradnorm option alpha must be >= 0, got {alpha}")
        if on not in ("auto", "params", "representation"):
            raise ValueError(f"gradnorm option 'on' must be auto, params or representation, got {on!r}")
        self.alpha = float(alpha)
        self.on = on
        self.loss_weights = nn.Parameter(torch.ones(self.num_tasks))
        self.initial_losses = torch.full((self.num_tasks,), float("nan"))  # L_t(0); NaN: not seen labelled yet

    def parameters(self) -> list[nn.Parameter]:
        return [self.loss_weights]

    def _wrt(self, ctx: StepContext) -> list[Tensor]:
        if self.on != "representation" and ctx.last_shared_layer:
            return list(ctx.last_shared_layer)
        if self.on == "params":
            raise ValueError(
                "gradnorm on: params needs the architecture's last shared layer (ctx.last_shared_layer); "
                "this architecture has none (MMoE, cross-stitch): use on: auto or representation"
            )
        if ctx.shared_repr is None or not ctx.shared_repr.requires_grad:
            raise ValueError("gradnorm on the representation needs ctx.shared_repr (not detached)")
        return [ctx.shared_repr]

    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> Tensor:
        stacked = self.stack_losses(losses)
        mask = self.labelled_mask(ctx)
        w = self.loss_weights
        if not bool(mask.any()):
            return torch.zeros_like(stacked).detach()
        idx = mask.nonzero().flatten()
        idx_w = idx.to(w.device)
        with torch.no_grad():  # renormalise the labelled tasks' weights to sum to their number
            w.clamp_(min=1e-4)
            w[idx_w] *= len(idx) / w[idx_w].sum()
        current = stacked.detach().float().to(w.device)  # stays on the device: no host sync per step
        self.initial_losses = self.initial_losses.to(w.device)
        first = mask.to(w.device) & torch.isnan(self.initial_losses)
        self.initial_losses = torch.where(first, current, self.initial_losses)
        active = [self.task_names[i] for i in idx.tolist()]
        wrt = self._wrt(ctx)
        per_task = task_gradients([losses[t] for t in active], wrt, retain_graph=True)
        if ctx.dist.enabled:  # the global batch's |grad_W L_t|: the diagonal of the reduced Gram matrix
            source = "representation" if wrt[0] is ctx.shared_repr else "params"
            norms = global_gram(per_task, ctx, source)[1].diagonal().clamp_min(0).sqrt().to(w.device, torch.float32)
        else:
            norms = per_task.float().norm(dim=1).to(w.device)
        l_grad = gradnorm_loss(
            w[idx_w], norms, current[idx_w], self.initial_losses[idx_w], self.alpha
        )
        (grad_w,) = torch.autograd.grad(l_grad, w)
        w.grad = grad_w if w.grad is None else w.grad + grad_w
        effective = torch.where(mask.to(w.device), w.detach(), torch.zeros_like(w))
        (effective.to(device=stacked.device, dtype=stacked.dtype) * stacked).sum().backward()
        return effective.detach()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial_losses": self.initial_losses.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial_losses = state["initial_losses"].clone().float()
