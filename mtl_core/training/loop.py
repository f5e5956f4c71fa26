"""The step loop: one epoch of forward, the weighting method's backward, the optimizer step.

It takes the training state (model, optimizer, schedule, weighting method, gradient tracker), the loss,
the batches and a small settings object (`StepSettings`), never the whole configuration. A NaN or
infinite task loss or gradient is caught before it reaches the weights (`train.on_nonfinite`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from mtl_core.losses import TaskLoss
from mtl_core.runtime import Distributed, autocast, distributed, memory_format
from mtl_core.tasks import MISSING_LABEL
from mtl_core.training.ddp import global_batch, global_losses
from mtl_core.training.normalisation import resolve_normalisation
from mtl_core.training.progress import EpochProgress, EpochStats
from mtl_core.training.state import TrainingState
from mtl_core.transforms import normalize_on_device
from mtl_core.weighting import StepContext

if TYPE_CHECKING:
    from mtl_core.config import PipelineConfig

LOG_EVERY_STEPS = 25
"""How often the progress bar shows the running loss: its one host sync."""


class NonFiniteError(RuntimeError):
    """A task loss or the gradient became NaN or infinite (`train.on_nonfinite: stop`, or too many skips)."""


@dataclass(frozen=True)
class StepSettings:
    """What the step loop needs of the configuration (`from_config`)."""

    mean: Sequence[float]  # of the uint8 batches' normalisation, on the device
    std: Sequence[float]
    amp: bool = True
    channels_last: bool | str = "auto"
    grad_clip: float | None = None
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10
    max_steps_per_epoch: int | None = None

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> StepSettings:
        """The step settings of `cfg` (`preprocess.mean/std: auto` resolved, training.normalisation)."""
        t = cfg.train
        if "auto" in (cfg.preprocess.mean, cfg.preprocess.std):  # fit resolves them once; others here
            cfg = resolve_normalisation(cfg)
        return cls(
            cfg.preprocess.mean, cfg.preprocess.std, t.amp, t.channels_last, t.grad_clip, t.on_nonfinite,
            t.max_skipped_steps, t.max_steps_per_epoch,
        )  # fmt: skip


@dataclass(frozen=True)
class EpochPlan:
    """Where an epoch stands in the training: its number, the optimizer steps of the epochs before it,
    its length in steps (None: the loader's), the batches skipped in earlier epochs, and whether the
    gradient tracker measures in it (nothing shared left trainable: no shared gradient to measure)."""

    epoch: int
    global_step: int = 0
    steps: int | None = None
    skipped_before: int = 0
    measure: bool = True


@dataclass
class _StepParts:
    """The parameter lists a step hands the weighting method, taken once per epoch."""

    shared: list[torch.nn.Parameter]
    private: dict[str, list[torch.nn.Parameter]]
    last_shared: list[torch.nn.Parameter] | None
    trainable: list[torch.Tensor]


def labelled_tasks(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(K,) bool: which tasks have a labelled sample with non-zero weight in the batch (CPU tensors in,
    so the weighting methods get it without a device sync)."""
    return ((y != MISSING_LABEL) & (w > 0)[:, None]).any(0)


def _nonfinite_losses(losses: dict[str, torch.Tensor]) -> list[str]:
    """The tasks whose loss is NaN or infinite (one host sync for all of them)."""
    finite = torch.isfinite(torch.stack([losses[t].detach().float() for t in losses])).tolist()
    return [t for t, ok in zip(losses, finite) if not ok]


def _gradient_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def train_one_epoch(
    state: TrainingState,
    loss_fn: TaskLoss,
    loader: Iterable,
    settings: StepSettings,
    device: torch.device,
    plan: EpochPlan,
    progress: EpochProgress | None = None,
    on_step: Callable[[EpochProgress], None] | None = None,
    ddp: torch.nn.Module | None = None,
) -> EpochProgress:
    """One pass over the training data (or the rest of one: `progress` of a resumed epoch, whose loader
    starts where it stopped). `on_step(progress)` after every optimizer step (the checkpoint hook).
    `ddp`: the model's DistributedDataParallel forward (training.ddp) when several processes train;
    the returned progress is this rank's (`EpochProgress.reduced` sums the ranks')."""
    dist = distributed() if ddp is not None else Distributed()
    model = state.model
    model.train()
    progress = progress or EpochProgress(EpochStats(model.task_names, device))
    parts = _StepParts(
        model.shared_parameters(), {t: list(model.task_parameters(t)) for t in model.task_names},
        model.last_shared_layer(), [p for p in model.parameters() if p.requires_grad] + list(state.weighting.parameters()),
    )  # fmt: skip
    total = plan.steps or len(loader)
    max_steps = min(settings.max_steps_per_epoch or total, total)
    bar = tqdm(loader, total=max_steps - progress.steps, desc=f"epoch {plan.epoch}", unit="batch", disable=None, leave=False)
    layout = memory_format(device, settings.channels_last)  # the model's (training.engine): NHWC batches on CUDA
    t0 = time.perf_counter()
    for x, y, w in bar:
        if progress.steps >= max_steps:
            break
        stepped = _train_step(state, parts, loss_fn, (x, y, w), settings, device, layout, plan, progress, dist, ddp)
        progress.steps += 1
        progress.seconds += time.perf_counter() - t0
        if stepped:
            if progress.steps % LOG_EVERY_STEPS == 0 and not bar.disable:
                bar.set_postfix(loss=f"{progress.stats.mean_loss():.3f}")
            if on_step is not None:
                on_step(progress)  # outside the timed part: a checkpoint write is not training time
        t0 = time.perf_counter()
    bar.close()
    return progress


def _train_step(
    state: TrainingState, parts: _StepParts, loss_fn: TaskLoss, batch: tuple[torch.Tensor, ...],
    settings: StepSettings, device: torch.device, layout: torch.memory_format, plan: EpochPlan,
    progress: EpochProgress, dist: Distributed, ddp: torch.nn.Module | None,
) -> bool:  # fmt: skip
    """One batch: forward, the method's backward, the step; False when the batch was skipped (a
    non-finite loss or gradient under `on_nonfinite: skip`: no step, but the schedule moves on)."""
    model, weighting, tracker = state.model, state.weighting, state.tracker if plan.measure else None
    x, y, w = batch
    step = plan.global_step + progress.steps
    labelled = labelled_tasks(y, w)
    x, y, w = x.to(device, non_blocking=True), y.to(device, non_blocking=True), w.to(device, non_blocking=True)
    x = x.contiguous(memory_format=layout)  # before normalising: the uint8 copy is a quarter of the bytes
    if x.dtype == torch.uint8:  # the train loader's uint8 batches, normalised here, on the device
        x = normalize_on_device(x, settings.mean, settings.std)
    denominators, labelled = global_batch(loss_fn, y, w, labelled, dist)
    # a method that reduces its own per-task gradients steps outside DDP's gradient hooks
    sync = ddp.no_sync() if ddp is not None and weighting.reduces_gradients else contextlib.nullcontext()
    with sync:
        with autocast(device, settings.amp):
            z, logits = ddp(x) if ddp is not None else _encode_decode(model, x)
            losses = loss_fn(logits, y, w, denominators)
        if dist.enabled:
            losses = global_losses(losses, dist)
        state.optimizer.zero_grad(set_to_none=True)
        if bad := _nonfinite_losses(losses):
            _on_nonfinite(settings, progress, plan, step, f"loss of task(s) {', '.join(bad)}")
            _skip_step(state)
            return False
        if tracker is not None and tracker.due(step):
            tracker.measure(losses, parts.shared, labelled, reduce=dist.mean if dist.enabled else None)
        if plan.measure and state.lookahead is not None and state.lookahead.due(step):
            with autocast(device, settings.amp):
                _measure_lookahead(state, parts, loss_fn, x, y, w, denominators, losses, labelled)
        ctx = StepContext(
            shared_params=parts.shared, task_params=parts.private, shared_repr=z, step=step, epoch=plan.epoch,
            labelled=labelled, last_shared_layer=parts.last_shared, dist=dist,
        )  # fmt: skip
        weights = weighting.backward(losses, ctx)
    if settings.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(parts.shared, settings.grad_clip)
    if not _gradient_finite(parts.trainable):
        _on_nonfinite(settings, progress, plan, step, f"gradient ({weighting.name} combination of the task gradients)")
        if tracker is not None:
            tracker.discard()  # no step: nothing to relate its measurement to
        _skip_step(state)
        return False
    state.optimizer.step()
    state.scheduler.step()
    if tracker is not None:
        tracker.after_step(parts.shared)
    if weighting.needs_losses_after_step:  # FAMO: the same batch's losses under the updated weights
        with torch.no_grad(), autocast(device, settings.amp):
            after = loss_fn(model(x), y, w, denominators)
            weighting.after_step(global_losses(after, dist) if dist.enabled else after)
    progress.stats.update(losses, logits, y, weights)
    progress.images += len(x)
    return True


def _measure_lookahead(
    state: TrainingState, parts: _StepParts, loss_fn: TaskLoss, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
    denominators: torch.Tensor | None, losses: dict[str, torch.Tensor], labelled: torch.Tensor,
) -> None:  # fmt: skip
    """The lookahead affinity of this batch (training.lookahead_affinity), each shared parameter stepped
    at its own group's current learning rate."""
    lr = {id(p): group["lr"] for group in state.optimizer.param_groups for p in group["params"]}
    state.lookahead.measure(
        state.model, lambda logits: loss_fn(logits, y, w, denominators), x, losses, parts.shared, lr, labelled
    )


def _encode_decode(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    z = model.encode(x)
    return z, model.decode(z)


def _on_nonfinite(settings: StepSettings, progress: EpochProgress, plan: EpochPlan, step: int, what: str) -> None:
    """Stop (train.on_nonfinite: stop, or past max_skipped_steps), else count the batch as skipped."""
    where = f"epoch {plan.epoch}, step {step + 1} (batch {progress.steps + 1} of the epoch)"
    if settings.on_nonfinite == "stop":
        raise NonFiniteError(
            f"non-finite {what} at {where}; training stopped (train.on_nonfinite: stop). A lower train.lr, "
            "train.grad_clip, or train.on_nonfinite: skip may help"
        )
    progress.skipped += 1
    progress.skipped_at.append(f"{where}: {what}")
    if plan.skipped_before + progress.skipped > settings.max_skipped_steps:
        raise NonFiniteError(
            f"non-finite {what} at {where}: {plan.skipped_before + progress.skipped} batches skipped, more than "
            f"train.max_skipped_steps ({settings.max_skipped_steps}); training stopped"
        )


def _skip_step(state: TrainingState) -> None:
    """Drop the batch: no optimizer step (its gradient is discarded), but the schedule moves on, so the
    learning rate of every later step is the one planned."""
    state.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # torch warns of a scheduler step without an optimizer step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        state.scheduler.step()
