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
    trainer's optimizer never sees xi.

    Needs `after_step` (`needs_losses_after_step = True`): the trainer re-evaluates the losses of the
    same batch under torch.no_grad() after optimizer.step(). `backward` raises if the previous step's
    `after_step` is missing.

    Options: `gamma` (xi weight decay, default 1e-3), `w_lr` (xi learning rate, default 0.025),
    `min_losses` (L_t*: float or {task: float}, default 0.0), `eps` (default 1e-8).
    Cost per step: one backward pass + one extra no-grad forward (for after_step); K extra numbers.
    """

    needs_losses_after_step = True

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
        self.adam_steps = 0
        self.prev_losses: Tensor | None = None

    def to(self, device: torch.device | str) -> FAMO:
        for attr in ("logits", "adam_m", "adam_v", "min_losses"):
            setattr(self, attr, getattr(self, attr).to(device))
        return self

    def _adam_step(self, grad: Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        """One step of torch.optim.Adam (L2 weight decay gamma, bias correction) on the logits, written
        out: K numbers do not need an optimizer object (whose construction is slow)."""
        b1, b2 = betas
        grad = grad + self.gamma * self.logits
        self.adam_steps += 1
        self.adam_m = b1 * self.adam_m + (1 - b1) * grad
        self.adam_v = b2 * self.adam_v + (1 - b2) * grad**2
        m_hat = self.adam_m / (1 - b1**self.adam_steps)
        v_hat = self.adam_v / (1 - b2**self.adam_steps)
        self.logits = self.logits - self.w_lr * m_hat / (v_hat.sqrt() + eps)

    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> dict[str, float]:
        if self.prev_losses is not None:
            raise RuntimeError(
                "famo: after_step(losses_after) was not called after the previous step "
                "(the trainer must call it after optimizer.step(), see LossWeighting.after_step)"
            )
        stacked = self.stack_losses(losses).float()  # log-losses in float32 even under autocast
        min_l = self.min_losses.to(stacked.device, stacked.dtype)
        famo_loss(stacked, self.logits.to(stacked.device), min_l, self.eps).backward()
        d = (stacked.detach() - min_l + self.eps).clamp(min=self.eps)
        z = torch.softmax(self.logits, 0).to(d)
        self.prev_losses = stacked.detach().clone()
        return self.as_dict((z / d) / (z / d).sum())

    def after_step(self, losses_after: dict[str, Tensor]) -> None:
        if self.prev_losses is None:
            raise RuntimeError("famo: after_step called without a preceding backward")
        curr = self.stack_losses(losses_after).detach().float().to(self.prev_losses.device)
        min_l = self.min_losses.to(curr.device)
        delta = (self.prev_losses - min_l + self.eps).clamp(min=self.eps).log() - (
            curr - min_l + self.eps
        ).clamp(min=self.eps).log()
        self._adam_step(famo_logit_grad(self.logits, delta.to(self.logits)))
        self.prev_losses = None
