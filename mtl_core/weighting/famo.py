"""FAMO. Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_core.weighting.base import LossWeighting, StepContext, register_weighting

UPDATES = ("same_batch", "next_batch")
"""FAMO's `update` option: which losses after the step the logits learn from (see the class docstring)."""


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
    grad_xi softmax(xi) . delta = z * (delta - z . delta): tasks whose log-loss fell most lose weight
    (`update: next_batch` takes L' from the next batch instead, see below).
    As in the official code xi has its own Adam (written out here), so `parameters()` is empty and the
    trainer's optimizer never sees xi; `state_dict()` holds xi and the Adam moments.

    Missing labels: in a batch where some tasks are unlabelled, FAMO runs on the labelled ones alone:
    the softmax over their logits, their losses in c, and after the step an Adam update of their
    logits only (each logit keeps its own step count).

    Option `update` -- which losses after the step the logits learn from:

    * `same_batch` (default): the reference algorithm. Needs `after_step` (`needs_losses_after_step`
      True): the trainer re-evaluates the losses of the same batch under torch.no_grad() after
      optimizer.step(), delta = log L(theta_t; b_t) - log L(theta_{t+1}; b_t). `backward` raises if the
      previous step's `after_step` is missing. Cost per step: one backward + one extra no-grad forward.
    * `next_batch`: no extra forward (`needs_losses_after_step` False, `after_step` raises). At step
      t+1, before computing its weights, `backward` updates xi with delta = log L(theta_t; b_t) -
      log L(theta_{t+1}; b_{t+1}): the losses of the current forward against the previous step's, so
      each step's weights already use the latest update. That delta is the step's progress plus the
      batch-to-batch difference of the losses (noise, and not the in-batch fit that same_batch sees).
      A task unlabelled in either of the two batches gets no logit update (the softmax runs over the
      tasks labelled in both; each logit keeps its own Adam step count). The first step (and the
      first after loading a `same_batch` checkpoint, which has no previous losses) makes no update.
      The previous step's losses carry over epoch boundaries (the step count is global: the first
      step of an epoch learns from the last one of the previous epoch) and are in `state_dict()`, so
      an exact resume reproduces the run. Cost per step: one backward, like equal weighting.
      Provenance: this is this project's variant, not the authors'. Their code
      (github.com/Cranial-XIX/FAMO at 0a6ad06) always re-evaluates the SAME batch: famo.py lines
      85-93 (the usage example: `opt.step()`, then `new_loss` from `model(X)` on the same X under
      torch.no_grad(), then `weight_opt.update(new_loss)`), methods/weight_methods.py lines 135-145
      (`FAMO.update(curr_loss)`), experiments/nyuv2/trainer.py lines 145-155 (likewise cityscapes,
      celeba, quantum_chemistry); neither their README nor any commit mentions using the next batch's
      losses to save the forward.

    Measured 2026-12-02 on this project's 2-CPU-core machine (shared with other jobs; built-in data,
    1,600 images, small_cnn, 3 epochs, batch 64, seeds 0 and 1): seconds per epoch of `fit` vs equal
    weighting same_batch 1.20x, next_batch 1.03x; an interleaved per-step timing (CPU time, less
    sensitive to the load) 1.25x and 0.97x. Mean test accuracy over the 4 tasks: equal 0.623 +- 0.001,
    same_batch 0.620 +- 0.021, next_batch 0.615 +- 0.013 (per task within one standard deviation of
    each other). `same_batch` stays the default: it is the published algorithm, and two short seeds
    cannot tell whether next_batch's noisier delta costs accuracy elsewhere; use next_batch where the
    extra forward matters (large backbones: about a third of a step's compute).

    Other options: `gamma` (xi weight decay, default 1e-3), `w_lr` (xi learning rate, default 0.025),
    `min_losses` (L_t*: float or {task: float}, default 0.0), `eps` (default 1e-8). K extra numbers.
    """

    needs_losses_after_step = True
    STATE = ("logits", "adam_m", "adam_v", "adam_steps")
    """What FAMO carries between steps besides its options (saved by `state_dict`)."""
    NEXT_BATCH_STATE = ("last_losses", "last_labelled")
    """What `update: next_batch` carries besides: the previous step's losses and labelled mask."""

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        gamma: float = 1e-3,
        w_lr: float = 0.025,
        min_losses: float | Mapping[str, float] = 0.0,
        eps: float = 1e-8,
        update: str = "same_batch",
        **options: Any,
    ) -> None:
        super().__init__(task_names, **options)
        if gamma < 0 or w_lr <= 0 or eps <= 0:
            raise ValueError(f"famo needs gamma >= 0, w_lr > 0, eps > 0; got {gamma}, {w_lr}, {eps}")
        if update not in UPDATES:
            raise ValueError(f"famo option update must be one of {', '.join(UPDATES)}; got {update!r}")
        self.update = update
        self.needs_losses_after_step = update == "same_batch"  # next_batch: no extra forward pass
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
        # same_batch: this step's losses and labelled mask, from `backward` until `after_step`
        self.prev_losses: Tensor | None = None
        self.prev_labelled: Tensor | None = None
        # next_batch: the previous step's losses L(theta_t; b_t) and labelled mask (none labelled before
        # the first step, so the first step makes no logit update)
        self.last_losses = torch.zeros(self.num_tasks)
        self.last_labelled = torch.zeros(self.num_tasks, dtype=torch.bool)

    def to(self, device: torch.device | str) -> FAMO:
        for attr in (*self.STATE, *self.NEXT_BATCH_STATE, "min_losses"):
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

    def _logit_update(self, before: Tensor, after: Tensor, active: Tensor) -> None:
        """One Adam step of the `active` logits along grad_xi softmax(xi) . delta, the softmax over the
        active tasks' logits, delta_t = log(before_t - L_t* + eps) - log(after_t - L_t* + eps)."""
        if not bool(active.any()):
            return
        min_l = self.min_losses.to(after.device)
        delta = (before - min_l + self.eps).clamp(min=self.eps).log() - (after - min_l + self.eps).clamp(min=self.eps).log()
        delta = delta.to(self.logits)
        grad = torch.zeros_like(self.logits)
        idx = active.nonzero().flatten()
        grad[idx] = famo_logit_grad(self.logits[idx], delta[idx])  # softmax over the active tasks' logits
        self._adam_step(grad, active)

    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> Tensor:
        if self.prev_losses is not None:
            raise RuntimeError(
                "famo: after_step(losses_after) was not called after the previous step "
                "(the trainer must call it after optimizer.step(), see LossWeighting.after_step)"
            )
        stacked = self.stack_losses(losses).float()  # log-losses in float32 even under autocast
        mask = self.labelled_mask(ctx)
        if self.update == "next_batch":
            # log L(theta_t; b_t) - log L(theta_{t+1}; b_{t+1}) over the tasks labelled in both batches,
            # before this step's weights
            curr = stacked.detach().to(self.logits.device)
            labelled = mask.to(self.logits.device)
            self._logit_update(self.last_losses, curr, self.last_labelled & labelled)
            self.last_losses, self.last_labelled = curr.clone(), labelled.clone()
        else:
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
        if self.update == "next_batch":
            raise RuntimeError("famo update: next_batch takes no after_step (needs_losses_after_step is False)")
        if self.prev_losses is None or self.prev_labelled is None:
            raise RuntimeError("famo: after_step called without a preceding backward")
        curr = self.stack_losses(losses_after).detach().float().to(self.prev_losses.device)
        prev, active = self.prev_losses, self.prev_labelled
        self.prev_losses = self.prev_labelled = None
        self._logit_update(prev, curr, active)  # softmax over the labelled tasks' logits

    def state_dict(self) -> dict[str, Any]:
        keys = (*self.STATE, *self.NEXT_BATCH_STATE) if self.update == "next_batch" else self.STATE
        state = {k: getattr(self, k).detach().cpu().clone() for k in keys}
        return {**super().state_dict(), **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the logits and Adam state; with `update: next_batch` also the previous step's losses.
        A checkpoint without them (one saved with `same_batch`) starts next_batch with no previous batch:
        the first step after it makes no logit update."""
        super().load_state_dict(state)
        device = self.logits.device
        for k in self.STATE:
            setattr(self, k, state[k].clone().to(device, torch.float32))
        if self.update == "next_batch":
            if "last_losses" in state:
                self.last_losses = state["last_losses"].clone().to(device, torch.float32)
                self.last_labelled = state["last_labelled"].clone().to(device, torch.bool)
            else:
                self.last_losses = torch.zeros(self.num_tasks, device=device)
                self.last_labelled = torch.zeros(self.num_tasks, dtype=torch.bool, device=device)
