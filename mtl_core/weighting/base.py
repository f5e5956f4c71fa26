"""The one interface every multi-task loss-weighting / gradient-balancing method implements.

A method receives the K per-task losses of a step and is responsible for filling `.grad` of the
model's parameters (it calls backward itself). That single contract covers both families:

* loss weighting (equal, fixed, uncertainty, DWA, ...): form sum_t w_t * L_t and backpropagate once;
* gradient balancing (PCGrad, MGDA, CAGrad, ...): take one gradient per task on the shared parameters
  (or on the shared representation), combine them, and write the result into `.grad`.

Methods with learnable state (log-variances, logits) expose it via `parameters()`; the trainer adds
those to the optimizer (after calling `to(device)`, which moves them in place).

How a trainer drives a method (`method = build_weighting(name, task_names, options).to(device)`)::

    optimizer = Optimizer([*model.parameters(), *method.parameters()], ...)
    for epoch in range(epochs):
        for step, (x, y) in enumerate(loader):
            optimizer.zero_grad(set_to_none=True)
            z = model.backbone(x)                                  # shared representation, not detached
            losses = {t: loss_fn[t](model.heads[t](z), y[t]) for t in task_names}
            ctx = StepContext(shared_params=list(model.backbone.parameters()),
                              task_params={t: list(model.heads[t].parameters()) for t in task_names},
                              shared_repr=z, step=global_step, epoch=epoch)
            weights = method.backward(losses, ctx)                 # fills .grad; never call .backward() yourself
            optimizer.step()
            if method.needs_losses_after_step:                     # FAMO only
                with torch.no_grad():                              # ONE extra forward pass, no backward
                    losses_after = {t: loss_fn[t](model(x)[t], y[t]) for t in task_names}  # same batch x, y
                method.after_step(losses_after)
        method.on_epoch_end(epoch, mean_train_losses)              # per-task mean training loss of the epoch

`backward` ADDS to `.grad` (like `Tensor.backward`), so the trainer zeroes gradients before it.
Gradient clipping, if any, goes between `backward` and `optimizer.step()`. Losses must be unscaled:
with a float16 GradScaler the scaled losses would break the non-linear methods (uncertainty, FAMO,
the gradient-balancing ones), so use bfloat16 autocast or no scaler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass
class StepContext:
    """What a weighting method may need beyond the losses, for one optimisation step."""

    shared_params: Sequence[nn.Parameter]
    """Parameters of the shared part of the network (the backbone), in forward order (the last ones
    belong to the last shared layer; GradNorm measures gradient norms there)."""
    task_params: dict[str, Sequence[nn.Parameter]] = field(default_factory=dict)
    """Parameters private to each task (its head)."""
    shared_repr: Tensor | None = None
    """The shared representation (backbone output) of this batch, for representation-gradient methods
    (`on: representation`, GradNorm `on: representation`). It must be part of the graph (not detached),
    and the task losses must depend on the backbone only through it."""
    step: int = 0
    epoch: int = 0


class LossWeighting(ABC):
    """Turns K task losses into gradients. Subclasses cite their paper in the class docstring."""

    name: ClassVar[str]

    needs_losses_after_step: ClassVar[bool] = False
    """True for methods (FAMO) whose `after_step` needs the losses re-evaluated after the optimizer
    step; the trainer then does one extra no-grad forward pass per step (see `after_step`)."""

    def __init__(self, task_names: Sequence[str], **options: Any) -> None:
        if options:
            raise ValueError(
                f"unknown option(s) for weighting '{self.name}': {', '.join(sorted(options))}"
            )
        if len(task_names) == 0 or len(set(task_names)) != len(task_names):
            raise ValueError(f"task names must be non-empty and unique, got {list(task_names)}")
        self.task_names = list(task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def parameters(self) -> Iterable[nn.Parameter]:
        """Learnable parameters of the method itself (added to the optimizer)."""
        return []

    def to(self, device: torch.device | str) -> LossWeighting:
        """Move learnable state to `device` in place (parameter objects keep their identity)."""
        for p in self.parameters():
            p.data = p.data.to(device)
        return self

    def stack_losses(self, losses: dict[str, Tensor]) -> Tensor:
        """The K losses as one (K,) tensor in `task_names` order; missing or extra tasks are an error."""
        missing = [t for t in self.task_names if t not in losses]
        extra = [t for t in losses if t not in self.task_names]
        if missing or extra:
            raise ValueError(
                f"weighting '{self.name}' expects losses for {self.task_names}; "
                f"missing: {missing}, unexpected: {extra}"
            )
        return torch.stack([losses[t].reshape(()) for t in self.task_names])

    def as_dict(self, weights: Tensor) -> dict[str, float]:
        return {t: float(v) for t, v in zip(self.task_names, weights.detach().double().cpu())}

    @abstractmethod
    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> dict[str, float]:
        """Accumulate gradients for this step; return the effective weight of each task (for logging).

        The effective weight of task t is the coefficient of its gradient in the update of the shared
        parameters: the update is sum_t w_t * grad L_t (for the gradient-balancing methods, of the
        per-task gradients they combined)."""

    def after_step(self, losses_after: dict[str, Tensor]) -> None:
        """Hook called after `optimizer.step()`, only if `needs_losses_after_step` (FAMO).

        `losses_after` are the per-task losses of the SAME batch as the preceding `backward`,
        recomputed with the updated parameters under `torch.no_grad()`: one extra forward pass per
        step, no backward pass. Must be called exactly once after each `backward`. The official FAMO
        code stays in train mode for it (so BatchNorm running statistics see the batch twice)."""

    def on_epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        """Hook for methods that adapt per epoch (DWA): called once at the end of every training epoch
        with the mean TRAINING loss of each task over that epoch. Costs nothing; a no-op by default."""


class LinearCombination(LossWeighting):
    """Loss weighting: backpropagate sum_t w_t L_t (+ a regulariser on the method's own parameters)
    once. One backward pass per step, no extra memory."""

    @abstractmethod
    def weights(self, losses: Tensor, ctx: StepContext) -> Tensor:
        """Weights (K,) for stacked losses (K,); may carry gradient (learned weightings)."""

    def regulariser(self, weights: Tensor, losses: Tensor) -> Tensor | float:
        """Extra term added to the objective (e.g. uncertainty's sum_t s_t/2); 0 by default."""
        return 0.0

    def objective(self, weights: Tensor, losses: Tensor) -> Tensor:
        return (weights * losses).sum() + self.regulariser(weights, losses)

    def total_loss(self, losses: Tensor, ctx: StepContext) -> Tensor:
        return self.objective(self.weights(losses, ctx), losses)

    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> dict[str, float]:
        stacked = self.stack_losses(losses)
        w = self.weights(stacked, ctx)
        self.objective(w, stacked).backward()
        return self.as_dict(w)


WEIGHTINGS: dict[str, type[LossWeighting]] = {}


def register_weighting(name: str) -> Callable[[type[LossWeighting]], type[LossWeighting]]:
    def deco(cls: type[LossWeighting]) -> type[LossWeighting]:
        if name in WEIGHTINGS:
            raise ValueError(f"weighting {name!r} registered twice")
        cls.name = name
        WEIGHTINGS[name] = cls
        return cls

    return deco


def build_weighting(name: str, task_names: Sequence[str], options: dict[str, Any] | None = None) -> LossWeighting:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown train.weighting {name!r}; available: {', '.join(sorted(WEIGHTINGS))}")
    return WEIGHTINGS[name](task_names, **(options or {}))
