"""The step loop: one epoch of forward, the weighting method's backward, the optimizer step.

What one epoch has done so far (`EpochProgress`: steps, images, seconds, the running per-task sums) is an
object of its own, so that a checkpoint taken in the middle of an epoch can hold it and a resumed run
continue the epoch's statistics where the killed one stopped. A NaN or infinite task loss or gradient is
caught before it reaches the weights (`train.on_nonfinite`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from mtl_core.config import PipelineConfig
from mtl_core.evaluation.task_relations import GradientCosineTracker
from mtl_core.losses import TaskLoss
from mtl_core.models import MultiTaskModel
from mtl_core.tasks import MISSING_LABEL
from mtl_core.transforms import normalize_on_device
from mtl_core.runtime import Distributed, autocast, distributed, memory_format
from mtl_core.weighting import LossWeighting, StepContext

LOG_EVERY_STEPS = 25
"""How often the progress bar shows the running loss: its one host sync."""


class NonFiniteError(RuntimeError):
    """A task loss or the gradient became NaN or infinite (`train.on_nonfinite: stop`, or too many skips)."""


class EpochStats:
    """Running per-task loss (per labelled sample), accuracy and method weight over one training epoch.

    The sums stay on the training device: nothing here waits for the GPU; `summary()` (once per epoch)
    and `mean_loss()` (once per logging interval) are the only host syncs."""

    def __init__(self, tasks: list[str], device: torch.device) -> None:
        self.tasks = tasks
        k = len(tasks)
        self.loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.correct = torch.zeros(k, dtype=torch.int64, device=device)
        self.count = torch.zeros(k, dtype=torch.int64, device=device)
        self.weight_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.steps = 0

    def update(
        self, losses: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], y: torch.Tensor, weights: torch.Tensor
    ) -> None:
        labelled = y != MISSING_LABEL  # (N, K)
        n = labelled.sum(0)
        loss = torch.stack([losses[t].detach().double() for t in self.tasks])
        pred = torch.stack([logits[t].detach().argmax(1) for t in self.tasks], dim=1)
        self.loss_sum += loss * n
        self.correct += ((pred == y) & labelled).sum(0)
        self.count += n
        self.weight_sum += weights.to(self.weight_sum.device, torch.float64)
        self.steps += 1

    def mean_loss(self) -> float:
        """Mean over tasks of the per-sample training loss so far (a host sync: call it rarely)."""
        per_task = self.loss_sum / self.count.clamp(min=1)
        return float(per_task[self.count > 0].mean()) if bool((self.count > 0).any()) else float("nan")

    def summary(self) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """({task: {loss, accuracy}}, {task: mean method weight per step}); NaN for a task never labelled."""
        loss, correct, count = self.loss_sum.cpu(), self.correct.cpu(), self.count.cpu()
        weights = (self.weight_sum / max(self.steps, 1)).cpu()
        stats = {
            t: {
                "loss": float(loss[k] / count[k]) if count[k] else float("nan"),
                "accuracy": float(correct[k] / count[k]) if count[k] else float("nan"),
            }
            for k, t in enumerate(self.tasks)
        }
        return stats, {t: float(weights[k]) for k, t in enumerate(self.tasks)}

    _SUMS = ("loss_sum", "correct", "count", "weight_sum")
    _RANK_SUMS = ("loss_sum", "correct", "count")  # per-rank sums; the method weights are the same on every rank

    def reduced(self, dist: Distributed) -> EpochStats:
        """The global batch's sums over all ranks (a collective: every rank calls it at the same step)."""
        if not dist.enabled:
            return self
        out = EpochStats(self.tasks, self.loss_sum.device)
        out.steps, out.weight_sum = self.steps, self.weight_sum.clone()
        for name in self._RANK_SUMS:
            setattr(out, name, dist.sum(getattr(self, name)))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, **{name: getattr(self, name).cpu().clone() for name in self._SUMS}}

    def load_state_dict(self, state: dict[str, Any], sums: bool = True) -> None:
        """`sums=False`: the steps only, the per-rank sums left at zero (a distributed resume gives rank 0
        the checkpoint's global sums, the other ranks start theirs at zero)."""
        self.steps = int(state["steps"])
        for name in self._SUMS:
            if sums or name not in self._RANK_SUMS:
                getattr(self, name).copy_(state[name])


@dataclass
class EpochProgress:
    """How far one epoch has come: what a mid-epoch checkpoint must hold to continue it exactly."""

    stats: EpochStats
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    skipped: int = 0  # batches dropped for a non-finite loss or gradient (on_nonfinite: skip)
    skipped_at: list[str] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": self.stats.state_dict(), "steps": self.steps, "images": self.images,
            "seconds": self.seconds, "skipped": self.skipped, "skipped_at": list(self.skipped_at),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], sums: bool = True) -> None:
        self.stats.load_state_dict(state["stats"], sums)
        self.steps, self.seconds = int(state["steps"]), float(state["seconds"])
        self.images = int(state["images"]) if sums else 0
        self.skipped, self.skipped_at = int(state["skipped"]), list(state["skipped_at"])

    def reduced(self, dist: Distributed) -> EpochProgress:
        """This epoch so far over all ranks: summed statistics and images (seconds: this rank's)."""
        if not dist.enabled:
            return self
        images = int(dist.sum(torch.tensor([self.images], dtype=torch.int64)).item())
        return EpochProgress(self.stats.reduced(dist), self.steps, images, self.seconds, self.skipped, list(self.skipped_at))


def labelled_tasks(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(K,) bool: which tasks have a labelled sample with non-zero weight in the batch (CPU tensors in,
    so the weighting methods get it without a device sync)."""
    return ((y != MISSING_LABEL) & (w > 0)[:, None]).any(0)


class _GlobalValue(torch.autograd.Function):
    """Forward: the global batch's loss (bit-identical on every rank); backward: into this rank's loss."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, global_value: torch.Tensor) -> torch.Tensor:
        return global_value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def global_losses(losses: dict[str, torch.Tensor], dist: Distributed) -> dict[str, torch.Tensor]:
    """Under DDP, each task's loss with the global batch's value (the ranks' mean: each rank's loss is
    normalised by the global denominator / W) and this rank's gradient. A weighting method computes
    its weights from these values, identical on every rank, and the gradient of anything it builds
    from them is this rank's share of the global gradient, which DDP's mean completes. One all-reduce
    of K floats."""
    stacked = torch.stack([losses[t].detach().float() for t in losses])
    mean = dist.mean(stacked)
    return {t: _GlobalValue.apply(loss, mean[k].to(loss.dtype)) for k, (t, loss) in enumerate(losses.items())}


def global_batch(
    loss_fn: TaskLoss, y: torch.Tensor, w: torch.Tensor, labelled: torch.Tensor, dist: Distributed
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(each task's loss denominator for this rank: the global batch's / W, which tasks are labelled in
    the global batch): one all-reduce of 2K floats; (None, labelled) with one process."""
    if not dist.enabled:
        return None, labelled
    k = len(labelled)
    local = torch.cat([loss_fn.denominators(y, w), labelled.to(y.device, torch.float32)])
    total = dist.sum(local)
    return total[:k] / dist.world_size, total[k:].cpu() > 0


def _nonfinite_losses(losses: dict[str, torch.Tensor]) -> list[str]:
    """The tasks whose loss is NaN or infinite (one host sync for all of them)."""
    finite = torch.isfinite(torch.stack([losses[t].detach().float() for t in losses])).tolist()
    return [t for t, ok in zip(losses, finite) if not ok]


def _gradient_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def train_one_epoch(
    model: MultiTaskModel,
    loader: Iterable,
    weighting: LossWeighting,
    loss_fn: TaskLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    cfg: PipelineConfig,
    epoch: int,
    global_step: int,
    tracker: GradientCosineTracker | None = None,
    progress: EpochProgress | None = None,
    steps_per_epoch: int | None = None,
    on_step: Callable[[EpochProgress], None] | None = None,
    skipped_before: int = 0,
    ddp: torch.nn.Module | None = None,
) -> EpochProgress:
    """One pass over the training data (or the rest of one: `progress` of a resumed epoch, whose loader
    starts where it stopped). `global_step`: steps of the epochs before; `on_step(progress)` after every
    optimizer step (the checkpoint hook); `skipped_before`: batches skipped in earlier epochs.
    `ddp`: the model's DistributedDataParallel forward (training.ddp) when several processes train;
    the returned progress is this rank's (`EpochProgress.reduced` sums the ranks')."""
    dist = distributed() if ddp is not None else Distributed()
    model.train()
    tasks = model.task_names
    progress = progress or EpochProgress(EpochStats(tasks, device))
    shared = model.shared_parameters()
    private = {t: list(model.task_parameters(t)) for t in tasks}
    last_shared = model.last_shared_layer()
    trainable = [p for p in model.parameters() if p.requires_grad] + list(weighting.parameters())
    total = steps_per_epoch or len(loader)
    max_steps = min(cfg.train.max_steps_per_epoch or total, total)
    bar = tqdm(loader, total=max_steps - progress.steps, desc=f"epoch {epoch}", unit="batch", disable=None, leave=False)
    layout = memory_format(device, cfg.train.channels_last)  # the model's (train.fit): NHWC batches on CUDA
    t0 = time.perf_counter()
    for x, y, w in bar:
        if progress.steps >= max_steps:
            break
        step = global_step + progress.steps
        labelled = labelled_tasks(y, w)
        x, y, w = x.to(device, non_blocking=True), y.to(device, non_blocking=True), w.to(device, non_blocking=True)
        x = x.contiguous(memory_format=layout)  # before normalising: the uint8 copy is a quarter of the bytes
        if x.dtype == torch.uint8:  # the train loader's uint8 batches, normalised here, on the device
            x = normalize_on_device(x, cfg.preprocess.mean, cfg.preprocess.std)
        denominators, labelled = global_batch(loss_fn, y, w, labelled, dist)
        # a method that reduces its own per-task gradients steps outside DDP's gradient hooks
        sync = ddp.no_sync() if ddp is not None and weighting.reduces_gradients else contextlib.nullcontext()
        with sync:
            with autocast(device, cfg.train.amp):
                if ddp is not None:
                    z, logits = ddp(x)
                else:
                    z = model.encode(x)
                    logits = model.decode(z)
                losses = loss_fn(logits, y, w, denominators)
            if dist.enabled:
                losses = global_losses(losses, dist)
            optimizer.zero_grad(set_to_none=True)
            if bad := _nonfinite_losses(losses):
                _on_nonfinite(cfg, progress, skipped_before, epoch, step, f"loss of task(s) {', '.join(bad)}")
                _skip_step(optimizer, scheduler, progress, t0)
                t0 = time.perf_counter()
                continue
            if tracker is not None and tracker.due(step):
                tracker.measure(losses, shared, labelled, reduce=dist.mean if dist.enabled else None)
            ctx = StepContext(
                shared_params=shared, task_params=private, shared_repr=z, step=step, epoch=epoch,
                labelled=labelled, last_shared_layer=last_shared, dist=dist,
            )  # fmt: skip
            weights = weighting.backward(losses, ctx)
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(shared, cfg.train.grad_clip)
        if not _gradient_finite(trainable):
            _on_nonfinite(cfg, progress, skipped_before, epoch, step, f"gradient ({weighting.name} combination of the task gradients)")
            if tracker is not None:
                tracker.discard()  # no step: nothing to relate its measurement to
            _skip_step(optimizer, scheduler, progress, t0)
            t0 = time.perf_counter()
            continue
        optimizer.step()
        scheduler.step()
        if tracker is not None:
            tracker.after_step(shared)
        if weighting.needs_losses_after_step:  # FAMO: the same batch's losses under the updated weights
            with torch.no_grad(), autocast(device, cfg.train.amp):
                after = loss_fn(model(x), y, w, denominators)
                weighting.after_step(global_losses(after, dist) if dist.enabled else after)
        progress.stats.update(losses, logits, y, weights)
        progress.images += len(x)
        progress.steps += 1
        progress.seconds += time.perf_counter() - t0
        if progress.steps % LOG_EVERY_STEPS == 0 and not bar.disable:
            bar.set_postfix(loss=f"{progress.stats.mean_loss():.3f}")
        if on_step is not None:
            on_step(progress)  # outside the timed part: a checkpoint write is not training time
        t0 = time.perf_counter()
    bar.close()
    return progress


def _on_nonfinite(cfg: PipelineConfig, progress: EpochProgress, skipped_before: int, epoch: int, step: int, what: str) -> None:
    """Stop (train.on_nonfinite: stop, or past max_skipped_steps), else count the batch as skipped."""
    where = f"epoch {epoch}, step {step + 1} (batch {progress.steps + 1} of the epoch)"
    if cfg.train.on_nonfinite == "stop":
        raise NonFiniteError(
            f"non-finite {what} at {where}; training stopped (train.on_nonfinite: stop). A lower train.lr, "
            "train.grad_clip, or train.on_nonfinite: skip may help"
        )
    progress.skipped += 1
    progress.skipped_at.append(f"{where}: {what}")
    if skipped_before + progress.skipped > cfg.train.max_skipped_steps:
        raise NonFiniteError(
            f"non-finite {what} at {where}: {skipped_before + progress.skipped} batches skipped, more than "
            f"train.max_skipped_steps ({cfg.train.max_skipped_steps}); training stopped"
        )


def _skip_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, progress: EpochProgress, t0: float) -> None:
    """Drop the batch: no optimizer step (its gradient is discarded), but the schedule moves on, so the
    learning rate of every later step is the one planned."""
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # torch warns of a scheduler step without an optimizer step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
    progress.steps += 1
    progress.seconds += time.perf_counter() - t0
