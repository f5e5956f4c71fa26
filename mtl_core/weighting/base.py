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
            # (gradient clipping of the shared parameters, if any, goes here)
            optimizer.step()
            if method.needs_losses_after_step:                     # FAMO only
                with torch.no_grad():                              # ONE extra forward pass, no backward
                    losses_after = {t: loss_fn[t](model(x)[t], y[t]) for t in task_names}  # same batch x, y
                method.after_step(losses_after)
        method.on_epoch_end(epoch, mean_train_losses)              # per-task mean training loss of the epoch

`backward` ADDS to `.grad` (like `Tensor.backward`), so the trainer zeroes gradients before it, and
returns the K effective task weights as a detached tensor (on the losses' device: the trainer sums them
there and reads them once per epoch, not once per step).

Unlabelled tasks: with missing labels a task may have no labelled sample in a batch; its loss is then a
constant 0 with zero gradient. `ctx.labelled` (a (K,) bool CPU tensor, built by the trainer from the
batch's labels before they go to the device) says which tasks have one. Every method treats the step
exactly as if it had been built for the labelled tasks alone: weight 0 for the others, left out of
every solve, normaliser and learned statistic (tests/test_weighting_realities.py checks each method).

State: `state_dict()` / `load_state_dict()` hold everything a method carries between steps (learnable
weights, histories, generators, moments), as tensors and numbers only, so a checkpoint holding them
loads with `torch.load(..., weights_only=True)`.

Losses must be unscaled:
with a float16 GradScaler the scaled losses would break the non-linear methods (uncertainty, FAMO,
the gradient-balancing ones), so use bfloat16 autocast or no scaler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mtl_core.runtime import SINGLE, Distributed


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
    labelled: Tensor | None = None
    """(K,) bool CPU tensor in the method's task order: which tasks have at least one labelled sample
    (with a non-zero sample weight) in this batch. None: every task."""
    last_shared_layer: Sequence[Tensor] | None = None
    """The weight(s) of the last layer that every task shares (GradNorm's W), as the architecture
    defines it (`MultiTaskModel.last_shared_layer`); None where the architecture has no single one
    (MMoE's parallel experts, cross-stitch's per-task branches)."""
    dist: Distributed = SINGLE
    """The distributed context. Under DDP the trainer gives every method losses whose VALUE is the
    global batch's (the same on every rank) and whose gradient is this rank's share, and `labelled` for
    the global batch; a method that takes per-task gradients itself (`reduces_gradients`) reduces them
    with it, so that every rank combines the global batch's gradients and takes the same step."""


class LossWeighting(ABC):
    """Turns K task losses into gradients. Subclasses cite their paper in the class docstring."""

    name: ClassVar[str]

    needs_losses_after_step: ClassVar[bool] = False
    """True for methods (FAMO) whose `after_step` needs the losses re-evaluated after the optimizer
    step; the trainer then does one extra no-grad forward pass per step (see `after_step`)."""

    reduces_gradients: ClassVar[bool] = False
    """True for methods that take the per-task gradients with torch.autograd.grad and write `.grad`
    themselves (the gradient-balancing ones): under DDP the trainer runs their step in `no_sync()` and
    they reduce what they take through `ctx.dist`. False: one ordinary backward that DDP averages."""

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

    def labelled_mask(self, ctx: StepContext) -> Tensor:
        """`ctx.labelled` as a (K,) bool CPU tensor (all True when the trainer gave none)."""
        if ctx.labelled is None:
            return torch.ones(self.num_tasks, dtype=torch.bool)
        mask = torch.as_tensor(ctx.labelled, dtype=torch.bool).cpu().reshape(-1)
        if mask.numel() != self.num_tasks:
            raise ValueError(f"ctx.labelled has {mask.numel()} entries for {self.num_tasks} tasks {self.task_names}")
        return mask

    @abstractmethod
    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> Tensor:
        """Accumulate gradients for this step; return the effective weight of each task (K,), detached.

        The effective weight of task t is the coefficient of its gradient in the update of the shared
        parameters: the update is sum_t w_t * grad L_t (for the gradient-balancing methods, of the
        per-task gradients they combined). A task unlabelled in the batch has weight 0."""

    def state_dict(self) -> dict[str, Any]:
        """What the method carries between steps (tensors and numbers only). Subclasses with more state
        than their `parameters()` extend it."""
        return {
            "name": self.name,
            "tasks": list(self.task_names),
            "parameters": [p.detach().cpu().clone() for p in self.parameters()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; refuses the state of another method or task list."""
        if state.get("name") != self.name or list(state.get("tasks", [])) != self.task_names:
            raise ValueError(
                f"weighting state is for {state.get('name')!r} on tasks {state.get('tasks')}, "
                f"not {self.name!r} on {self.task_names}"
            )
        params = list(self.parameters())
        if len(state["parameters"]) != len(params):
            raise ValueError(f"weighting {self.name!r}: {len(state['parameters'])} saved parameters for {len(params)}")
        with torch.no_grad():
            for p, saved in zip(params, state["parameters"]):
                p.copy_(saved.to(p.device))

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
    once. One backward pass per step, no extra memory.

    Unlabelled tasks get weight 0; a method whose weights are normalised (`weights_sum`: they sum to 1,
    or to the number of tasks) renormalises the labelled tasks' weights the same way, which is exactly
    the weights it would give the labelled tasks alone (a softmax restricted to a subset is the
    renormalised softmax)."""

    weights_sum: ClassVar[Literal["one", "num_tasks"] | None] = None

    @abstractmethod
    def weights(self, losses: Tensor, ctx: StepContext) -> Tensor:
        """Weights (K,) for stacked losses (K,); may carry gradient (learned weightings)."""

    def regulariser(self, weights: Tensor, losses: Tensor, labelled: Tensor) -> Tensor | float:
        """Extra term added to the objective (e.g. uncertainty's sum_t s_t/2) over the labelled tasks
        (`labelled`, a (K,) bool tensor on the losses' device); 0 by default."""
        return 0.0

    def restrict(self, weights: Tensor, labelled: Tensor) -> Tensor:
        """The weights of the labelled tasks alone: 0 elsewhere, renormalised per `weights_sum`."""
        w = torch.where(labelled, weights, torch.zeros_like(weights))
        if self.weights_sum == "one":
            return w / w.sum()
        if self.weights_sum == "num_tasks":
            return w * (labelled.sum() / w.sum())
        return w

    def objective(self, weights: Tensor, losses: Tensor, labelled: Tensor) -> Tensor:
        return (weights * losses).sum() + self.regulariser(weights, losses, labelled)

    def weighted(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(objective, weights) for stacked losses, restricted to the labelled tasks."""
        mask = self.labelled_mask(ctx)
        labelled = mask.to(losses.device, non_blocking=True)
        w = self.weights(losses, ctx)
        if not bool(mask.all()):
            w = self.restrict(w, labelled)
        return self.objective(w, losses, labelled), w

    def total_loss(self, losses: Tensor, ctx: StepContext) -> Tensor:
        return self.weighted(losses, ctx)[0]

    def backward(self, losses: dict[str, Tensor], ctx: StepContext) -> Tensor:
        stacked = self.stack_losses(losses)
        if not bool(self.labelled_mask(ctx).any()):  # nothing labelled (all sample weights 0): no update
            return torch.zeros_like(stacked).detach()
        objective, w = self.weighted(stacked, ctx)
        objective.backward()
        return w.detach()


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
