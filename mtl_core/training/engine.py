"""The fitting engine: `fit` trains one model on some tasks of the preprocessed data.

Every training stage (train, baselines, all_in_one, the task groups), every DDP worker rank, the
benchmarks and the tests train through `fit`. One call: seed, build the loaders, the network, the
weighting method, the loss, the optimizer and its schedule (`_build`), restore a checkpoint's
`TrainingState` when resuming, then per epoch (`_run_epoch`): freezing, the step loop (training.loop),
validation, the best-on-validation weights, a checkpoint (training.checkpoint), the epoch's record
(through the sink: training.sink); at the end the model's files (training.model_files).

Distributed (training.ddp): every rank calls `fit`; rank 0's resume state is broadcast, the collectives
(loss and gradient reductions, validation, checkpoint statistics) run on all ranks, and only rank 0
writes files (`ModelOutputs`) and reports (`MlflowSink`); the others get `NoOutputs` and `NullSink`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtl_core.config import PipelineConfig
from mtl_core.faults import fault_point
from mtl_core.losses import TaskLoss
from mtl_core.models import build_model
from mtl_core.models.backbones import resolve_stem
from mtl_core.paths import ProjectPaths
from mtl_core.runtime import Distributed, distributed, place_model, seed_everything, select_device
from mtl_core.tasks import MISSING_LABEL, TaskSpec
from mtl_core.training import checkpoint
from mtl_core.training.batch_cache import BatchCache
from mtl_core.training.calibration import calibrate
from mtl_core.training.checkpoint import Checkpointer
from mtl_core.training.ddp import prepare_model, trainable_set, wrap
from mtl_core.training.gradient_cosine import GradientCosineTracker
from mtl_core.training.loaders import make_loaders
from mtl_core.training.lookahead_affinity import LookaheadAffinityTracker
from mtl_core.training.loop import EpochPlan, StepSettings, train_one_epoch
from mtl_core.training.model_files import ModelFiles, ModelOutputs, NoOutputs
from mtl_core.training.normalisation import resolve_normalisation
from mtl_core.training.optim import build_optimizer, build_scheduler, check_weighting, freeze_backbone
from mtl_core.training.progress import EpochProgress, EpochStats
from mtl_core.training.checkpoint import Resume
from mtl_core.training.sink import MlflowSink, NullSink
from mtl_core.training.state import TrainingState
from mtl_core.training.validation import prefixed_metrics, validate
from mtl_core.weighting import build_weighting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    run_id: str
    best_epoch: int
    best_val_mean_accuracy: float
    images_per_second: float


@dataclass
class _Training:
    """What `fit` builds before the first epoch."""

    state: TrainingState
    loss_fn: TaskLoss
    loaders: dict[str, DataLoader]
    device: torch.device
    stem: str
    steps_per_epoch: int
    labelled_train: dict[str, int]


def fit(
    cfg: PipelineConfig,
    paths: ProjectPaths,
    tasks: TaskSpec,
    files: ModelFiles,
    label_columns: list[int] | None = None,
    resume: Resume | None = None,
    batches: BatchCache | None = None,
    sink: Any = None,
    lookahead_every: int = 0,
) -> FitResult:
    """Train one model on `tasks` (label columns `label_columns` of the cache): per-epoch metrics, the
    best-on-validation weights, the spec, written to `files`. With `files.resume`, a checkpoint every
    epoch and every `train.checkpoint_every_steps` steps; `resume.state` continues one exactly.
    `batches`: training batches recorded by an earlier training of the same data and schedule, replayed
    (or recorded here) instead of decoded and augmented again (training.batch_cache; one process only).
    `sink`: where it reports (default: the active MLflow run on rank 0, nothing on the other ranks).
    `lookahead_every`: also measure the lookahead task affinity every N steps (training.lookahead_affinity;
    one process only), into `files.lookahead`."""
    dist = distributed()
    cfg = resolve_normalisation(cfg)  # preprocess.mean/std: auto
    if lookahead_every and dist.enabled:
        raise ValueError("the lookahead task affinity is measured in one process (the grouping stage's probe), not under DDP")
    resume = resume or Resume(checkpoint.fingerprint(cfg, paths, label_columns))
    if dist.enabled:
        resume = Resume(resume.fingerprint, dist.broadcast_state(resume.state), resume.resumed)
    sink = sink or (MlflowSink() if dist.is_main else NullSink())
    generator = seed_everything(cfg.train.seed)
    device = select_device(cfg.train.device)
    loaders = make_loaders(cfg, paths, generator, device, label_columns, dist)
    measure = files.gradient_cosine is not None and cfg.train.task_affinity_every > 0
    t = _build(cfg, paths, tasks, loaders, device, dist, measure)
    if lookahead_every:
        t.state.lookahead = LookaheadAffinityTracker(tasks.names, lookahead_every)
    outputs = ModelOutputs(files, sink) if dist.is_main else NoOutputs()
    outputs.prepare()
    checkpointer = Checkpointer(files.resume, resume.fingerprint, sink.run_id, cfg.train.epochs, dist)
    if resume.state is not None:
        t.state.load_state_dict(resume.state)
        if t.state.best_weights is not None:  # DVC deleted models/ before rerunning the stage
            outputs.save_best(t.state.best_weights)
        sink.catch_up(t.state.history, t.state.cosines, tasks.names)
    else:
        _announce(cfg, tasks, t, dist, sink)
    settings, ddp_forward, wrapped_for = StepSettings.from_config(cfg), None, None
    for epoch in range(t.state.start_epoch, cfg.train.epochs + 1):
        freeze_backbone(t.state.model, epoch, cfg.train)
        if dist.enabled and wrapped_for != trainable_set(t.state.model):  # DDP fixes its parameters when built
            ddp_forward, wrapped_for = wrap(t.state.model, device, dist), trainable_set(t.state.model)
        row = _run_epoch(cfg, t, epoch, settings, checkpointer, batches, ddp_forward, dist)
        if t.state.record_best(row["val/mean/accuracy"], epoch, keep_weights=dist.is_main):
            outputs.save_best(t.state.best_weights)
        checkpointer.save(t.state, epoch)  # before the metrics: a kill in between is caught up on resume
        fault_point("train.after_epoch_checkpoint")
        sink.log_epoch(row, t.state.cosines, tasks.names, cfg.train.epochs)
    if not t.state.history:
        raise RuntimeError("train: no epoch was trained")
    totals = t.state.totals
    throughput = totals["images"] / totals["seconds"] if totals["seconds"] else 0.0
    calibration = calibrate(t.state, t.loaders["val"], device, cfg.train.amp) if dist.is_main else None
    outputs.finish(t.state, cfg, tasks, t.stem, device, dist.world_size, throughput, calibration)
    sink.flush()  # what a store that failed during the training did not take, or StoreUnavailable
    return FitResult(sink.run_id, t.state.best_epoch, t.state.best_score, throughput)


def _build(
    cfg: PipelineConfig, paths: ProjectPaths, tasks: TaskSpec, loaders: dict[str, DataLoader], device: torch.device,
    dist: Distributed, measure: bool,
) -> _Training:  # fmt: skip
    """The network (placed, laid out, compiled as `train` says), the weighting method, the loss, the
    optimizer and schedule, the gradient tracker (`measure`), in the order their random draws are made."""
    stem = resolve_stem(cfg.model.stem, cfg.preprocess.image_size, cfg.model.backbone)
    model = build_model(
        cfg.model.arch, tasks.num_classes, cfg.model.backbone, cfg.model.pretrained_weights(paths.root),
        cfg.model.arch_options, stem=stem,
    )  # fmt: skip
    model = prepare_model(model, device, cfg.train.distributed.sync_batchnorm, dist)
    model = place_model(model, device, cfg.train.channels_last, cfg.train.compile)
    weighting = build_weighting(cfg.train.weighting, tasks.names, dict(cfg.train.weighting_options)).to(device)
    check_weighting(model, weighting, cfg.model.arch, cfg.train)
    train_labels = loaders["train"].dataset.labels.numpy()
    loss_fn = TaskLoss.from_config(cfg.train, tasks, train_labels).to(device)
    labelled_train = {t: int((train_labels[:, k] != MISSING_LABEL).sum()) for k, t in enumerate(tasks.names)}
    optimizer = build_optimizer(model, weighting, cfg.train)
    full_epoch = loaders["train"].sampler.steps()
    steps_per_epoch = min(cfg.train.max_steps_per_epoch or full_epoch, full_epoch)
    scheduler = build_scheduler(optimizer, cfg.train.epochs * steps_per_epoch)
    tracker = GradientCosineTracker(tasks.names, cfg.train.task_affinity_every) if measure else None
    state = TrainingState(model, optimizer, scheduler, weighting, tracker)
    return _Training(state, loss_fn, loaders, device, stem, steps_per_epoch, labelled_train)


def _announce(cfg: PipelineConfig, tasks: TaskSpec, t: _Training, dist: Distributed, sink: Any) -> None:
    """What a new training says once: model, device, tasks, labelled training samples per task."""
    sink.info(
        "train: %s (%s) on %s%s, tasks %s, %d training images", cfg.model.backbone,
        cfg.model.arch if len(tasks.names) > 1 else "single-task", t.device,  # a baseline is no hard sharing
        f" x {dist.world_size} processes" if dist.enabled else "", ", ".join(tasks.names), len(t.loaders["train"].dataset),
    )  # fmt: skip
    sink.info("labelled training samples per task: %s", ", ".join(f"{k} {n}" for k, n in t.labelled_train.items()))
    sink.log_params({f"data/{k}/labelled_train": n for k, n in t.labelled_train.items()})


def _run_epoch(
    cfg: PipelineConfig, t: _Training, epoch: int, settings: StepSettings, checkpointer: Checkpointer,
    batches: BatchCache | None, ddp_forward: torch.nn.Module | None, dist: Distributed,
) -> dict[str, float]:  # fmt: skip
    """Train epoch `epoch` (or the rest of it, resumed), validate, and return its history row."""
    state = t.state
    progress = EpochProgress(EpochStats(state.model.task_names, t.device))
    if state.progress is not None:  # the checkpoint's sums are the global ones: rank 0 holds them
        progress.load_state_dict(state.progress, sums=dist.is_main)
        state.progress = None
    t.loaders["train"].sampler.set_epoch(epoch, start=progress.steps * cfg.train.batch_size)
    every = cfg.train.checkpoint_every_steps

    def on_step(p: EpochProgress) -> None:
        if every and p.steps % every == 0 and p.steps < t.steps_per_epoch:
            checkpointer.save(state, epoch, p)
        fault_point("train.after_step")

    loader = t.loaders["train"]
    if batches is not None and not dist.enabled:
        loader = batches.loader(loader, epoch, progress.steps * cfg.train.batch_size, t.steps_per_epoch)
    # with nothing shared left trainable (hard sharing, frozen backbone) there is no shared gradient to measure
    measure = any(p.requires_grad for p in state.model.shared_parameters())
    plan = EpochPlan(epoch, (epoch - 1) * t.steps_per_epoch, t.steps_per_epoch, state.totals["skipped"], measure)
    progress = train_one_epoch(state, t.loss_fn, loader, settings, t.device, plan, progress, on_step, ddp_forward).reduced(dist)
    totals = state.totals
    state.totals = {
        "images": totals["images"] + progress.images, "seconds": totals["seconds"] + progress.seconds,
        "skipped": totals["skipped"] + progress.skipped,
    }  # fmt: skip
    for where in progress.skipped_at:
        log.warning("train: skipped the batch at %s (train.on_nonfinite: skip)", where)
    train_stats, mean_weights = progress.stats.summary()
    state.weighting.on_epoch_end(epoch, {k: s["loss"] for k, s in train_stats.items()})
    val_stats = validate(state.model, t.loaders["val"], t.device, cfg.train.amp, dist)
    row = {"epoch": epoch, **prefixed_metrics("train", train_stats), **prefixed_metrics("val", val_stats)}
    row.update({f"weight/{k}": w for k, w in mean_weights.items()})
    row["train/images_per_second"] = progress.images / progress.seconds if progress.seconds else 0.0
    row["train/skipped_steps"] = progress.skipped
    row["lr"] = state.scheduler.get_last_lr()[0]
    if state.tracker is not None:  # per task: |g_t|, effective learning rate, step alignment
        for k, task_stats in state.tracker.epoch_task_stats().items():
            row.update({f"grad/{k}/{name}": v for name, v in task_stats.items()})
    state.history.append(row)
    if state.tracker is not None and (matrix := state.tracker.epoch_average()) is not None:
        state.cosines[epoch] = matrix.tolist()
    if state.lookahead is not None and (matrix := state.lookahead.epoch_average()) is not None:
        state.lookaheads[epoch] = matrix.tolist()
    return row
