"""FAMO. Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_core.weighting.base import LossWeighting, StepContext, register_weighting


def famo_logit_grad(logits: Tensor, delta: Tensor) -> Tensor:
    """Gradient w.r.t. the logits xi of softmax(xi) . delta:  z * (delta - z . delta), z = softmax(xi)."""
    z = torch.softmax(logits, dim=0)
    return z * (delta - (z * delta).sum())


def famo_loss(losses: Tensor, logits: Tensor, min_losses: Tensor | float = 0.0, eps: float = 1e-8) -> Tensor:
    """sum_t (z_t / c) log(L_t - L_t* + eps), z = softmax(xi) (constant), c = sum_t z_t / (L_t - L_t* + eps)
    (constant), so the loss gradient is sum_t z_t / (c (L_t - L_t* + eps)) grad L_t: weights summing to 1."""
    d = (losses - min_losses + eps).clamp(min=eps)
    z = torch.softmax(logits.detach(), dim=0).to(d.dtype)
    c = (z / d).sum().detach()
    return (z / c * d.log()).sum()


@register_weighting("famo")
class FAMO(LossWeighting):
    """FAMO (Liu et al., 2023): decrease all task losses at an equal RATE in O(1) space and time.
    Task logits xi (init 0), z = softmax(xi); the network minimises sum_t (z_t / c) log(L_t - L_t* + eps)
    with c = sum_t z_t / (L_t - L_t* + eps), i.e. effective loss weights z_t / (c (L_t - L_t* + eps)),
    which sum to 1 and are what `backward` reports. After the optimizer step, with the losses L' of the
    same batch under the updated parameters, delta_t = log(L_t - L_t* + eps) - log(L'_t - L_t* + eps) and
    xi takes one Adam step (lr w_lr, L2 weight decay gamma, betas (0.9, 0.999)) along
    grad_xi softmax(xi) . delta = z * (delta - z . delta): tasks whose log-loss fell most lose weight.
    As in the official code xi has its own Adam (written out here), so `parameters()` is empty and the
    trainer's optimizer never sees xi; `state_dict()` holds xi and the Adam moments.

    Missing labels: in a batch where some tasks are unlabelled, FAMO runs on the labelled ones alone:
    the softmax over their logits, their losses in c, and after the step an Adam update of their
    logits only (each logit keeps its own step count).

    Needs `after_step` (`needs_losses_after_step = True`): the trainer re-evaluates the losses of the
    same batch under torch.no_grad() after optimizer.step(). `backward` raises if the previous step's
    `after_step` is missing.

    Options: `gamma` (xi weight decay, default 1e-3), `w_lr` (xi learning rate, default 0.025),
    `min_losses` (L_t*: float or {task: float}, default 0.0), `eps` (default 1e-8).
    Cost per step: one backward pass + one extra no-grad forward (for after_step); K extra numbers.
    """

    needs_losses_after_step = True
    STATE = ("logits", "adam_m", "adam_v", "adam_steps")
    """What FAMO carries between steps besides its options (saved by `state_dict`)."""

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        gamma: float = 1e-3,
        w_lr: float = 0.025,
        min_losses: float | Mapping[str, float] = 0.0,
        eps: float = 1e-8,
        **options: Any,
    ) -> None:
        super().__init__(task_names, **options)
        if gamma < 0 or w_lr <= 0 or eps <= 0:
            raise ValueError(f"famo needs gamma >= 0, w_lr > 0, eps > 0; got {gamma}, {w_lr}, {eps}")
        if isinstance(min_losses, Mapping):
            missing = [t for t in self.task_names if t not in min_losses]
            unknown = [t for t in min_losses if t not in self.task_names]
            if missing or unknown:
                raise ValueError(f"famo min_losses: missing tasks {missing}, unknown tasks {unknown}")
            values = [float(min_losses[t]) for t in self.task_names]
        else:
            values = [float(min_losses)] * self.num_tasks
        self.min_losses = torch.tensor(values)
        self.eps = float(eps)
        self.w_lr, self.gamma = float(w_lr), float(gamma)
        self.logits = torch.zeros(self.num_tasks)
        self.adam_m = torch.zeros(self.num_tasks)
        self.adam_v = torch.zeros(self.num_tasks)
        # Adam's step count per logit: a task unlabelled in a batch skips that step's logit update
        self.adam_steps = torch.zeros(self.num_tasks)
        self.prev_losses: Tensor | None = None
        self.prev_labelled: Tensor | None = None

    def to(self, device: torch.device | str) -> FAMO:
        for attr in (*self.STATE, "min_losses"):
            setattr(self, attr, getattr(self, attr).to(device))
        return self

    def _adam_step(
        self, grad: Tensor, active: Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        """One step of torch.optim.Adam (L2 weight decay gamma, bias correction) on the `active` logits,
        written out so that each logit keeps its own step count (with every task labelled in every
        batch this is exactly torch.optim.Adam over the K logits)."""
        b1, b2 = betas
        grad = grad + self.gamma * self.logits
        steps = self.adam_steps + active.to(self.adam_steps.dtype)
        m = torch.where(active, b1 * self.adam_m + (1 - b1) * grad, self.adam_m)
        v = torch.where(active, b2 * self.adam_v + (1 - b2) * grad**2, self.adam_v)
        n = steps.clamp(min=1)
        m_hat = m / (1 - b1**n)
        v_hat = v / (1 - b2**n)
        self.logits = torch.where(active, self.logits - self.w_lr * m_hat / (v_hat.sqrt() + eps), self.logits)
        self.adam_m, self.adam_v, self.adam_steps = m, v, steps

    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> Tensor:
        if self.prev_losses is not None:
            raise RuntimeError(
                "famo: after_step(losses_after) was not called after the previous step "
                "(the trainer must call it after optimizer.step(), see LossWeighting.after_step)"
            )
        stacked = self.stack_losses(losses).float()  # log-losses in float32 even under autocast
        mask = self.labelled_mask(ctx)
        self.prev_labelled = mask.to(self.logits.device)
        self.prev_losses = stacked.detach().clone()
        if not bool(mask.any()):
            return torch.zeros_like(stacked).detach()
        idx = mask.nonzero().flatten().to(stacked.device)
        min_l = self.min_losses.to(stacked.device, stacked.dtype)[idx]
        logits = self.logits.to(stacked.device)[idx]
        sub = stacked[idx]
        famo_loss(sub, logits, min_l, self.eps).backward()
        d = (sub.detach() - min_l + self.eps).clamp(min=self.eps)
        z = torch.softmax(logits, 0).to(d)
        w = torch.zeros_like(stacked).detach()
        w[idx] = (z / d) / (z / d).sum()
        return w

    def after_step(self, losses_after: dict[str, Tensor]) -> None:
        if self.prev_losses is None or self.prev_labelled is None:
            raise RuntimeError("famo: after_step called without a preceding backward")
        curr = self.stack_losses(losses_after).detach().float().to(self.prev_losses.device)
        prev, active = self.prev_losses, self.prev_labelled
        self.prev_losses = self.prev_labelled = None
        if not bool(active.any()):
            return
        min_l = self.min_losses.to(curr.device)
        delta = (prev - min_l + self.eps).clamp(min=self.eps).log() - (curr - min_l + self.eps).clamp(min=self.eps).log()
        delta = delta.to(self.logits)
        grad = torch.zeros_like(self.logits)
        idx = active.nonzero().flatten()
        grad[idx] = famo_logit_grad(self.logits[idx], delta[idx])  # softmax over the labelled tasks' logits
        self._adam_step(grad, active)

    def state_dict(self) -> dict[str, Any]:
        state = {k: getattr(self, k).detach().cpu().clone() for k in self.STATE}
        return {**super().state_dict(), **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.logits.device
        for k in self.STATE:
            setattr(self, k, state[k].clone().to(device, torch.float32))
