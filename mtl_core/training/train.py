"""Stage `train`: fit one shared-backbone network with one head per task.

Opens the model's MLflow run (params, tags, dataset, data report), logs per-epoch per-task loss and
accuracy, checkpoints every epoch, keeps the best-on-validation weights as safetensors, and reports the
training throughput in images per second.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from mtl_core.config import PipelineConfig, TrainConfig
from mtl_core.evaluation.curves import plot_training_curves
from mtl_core.evaluation.task_relations import GradientCosineTracker, plot_task_matrix
from mtl_core.faults import fault_point
from mtl_core.data.dataset import CachedMultiTaskDataset
from mtl_core.inference import predict_loader
from mtl_core.losses import TaskLoss
from mtl_core.models import MultiTaskModel, build_model
from mtl_core.models.backbones import resolve_stem
from mtl_core.models.io import SPEC_FORMAT
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import MISSING_LABEL, TaskSpec
from mtl_core.tracking import flatten, git_commit, ingested_data_hash, setup_mlflow, write_run_info
from mtl_core.training import checkpoint
from mtl_core.training.batch_cache import BatchCache
from mtl_core.runtime import Distributed, distributed, place_model, select_device, seed_everything
from mtl_core.training import ddp as ddp_runtime
from mtl_core.training.loop import EpochProgress, EpochStats, NonFiniteError, train_one_epoch  # noqa: F401  (NonFiniteError: the error training stops with)
from mtl_core.training.runs import Resume, fail_orphan_runs, training_run
from mtl_core.training.sampler import ResumableSampler, ShardSampler
from mtl_core.transforms import eval_transform, train_transform
from mtl_core.weighting import GradientBalancing, LossWeighting, build_weighting
from mtl_core.weighting.gradnorm import GradNorm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    best_epoch: int
    best_val_mean_accuracy: float
    images_per_second: float


def make_loaders(
    cfg: PipelineConfig,
    paths: ProjectPaths,
    generator: torch.Generator,
    device: torch.device,
    label_columns: list[int] | None = None,
    dist: Distributed | None = None,
) -> dict[str, DataLoader]:
    """Train and val loaders over the cache; `label_columns` selects a subset of the tasks. The training
    order and each sample's augmentation come from `train.seed` and the epoch alone (ResumableSampler),
    so they do not depend on the number of workers, and a resumed run sees the batches it would have.
    Distributed: this rank's share of every global batch (`train.batch_size` / world size) and of the
    validation set."""
    dist = dist or Distributed()
    workers = cfg.train.workers(int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
    common = dict(
        batch_size=cfg.train.batch_size // dist.world_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    train_data = CachedMultiTaskDataset(
        paths.images_cache("train"), paths.labels_cache("train"), train_transform(cfg.preprocess, normalize=False),
        paths.weights_cache("train"), label_columns,
    )  # fmt: skip
    loaders = {
        "train": DataLoader(
            train_data,
            sampler=ResumableSampler(
                len(train_data), cfg.train.seed, shuffle=True, batch_size=cfg.train.batch_size,
                rank=dist.rank, world_size=dist.world_size,
            ),  # fmt: skip
            drop_last=False,  # the sampler decides (a last batch of one sample never reaches BatchNorm)
            generator=generator,  # the workers' base seed comes from it, not from the global generator
            **common,
        ),
    }
    val_data = CachedMultiTaskDataset(
        paths.images_cache("val"), paths.labels_cache("val"), eval_transform(cfg.preprocess), None, label_columns
    )
    loaders["val"] = DataLoader(val_data, sampler=ShardSampler(len(val_data), dist.rank, dist.world_size), **common)
    return loaders


def validate(
    model: MultiTaskModel, loader: DataLoader, device: torch.device, amp: bool, dist: Distributed | None = None
) -> dict[str, dict[str, float]]:
    """Per task, the mean negative log-likelihood and the accuracy over the labelled validation samples;
    distributed, each rank scores its shard and the sums are reduced (every sample counted once)."""
    probs, targets = predict_loader(model, loader, device, amp)
    sums = np.zeros((3, len(model.task_names)))  # nll sum, correct, labelled count
    for k, t in enumerate(model.task_names):
        y = targets[:, k]
        labelled = y != MISSING_LABEL
        p = probs[t][labelled]
        sums[0, k] = -np.log(np.clip(p[np.arange(len(p)), y[labelled]], 1e-12, None)).sum()
        sums[1, k] = (probs[t].argmax(1)[labelled] == y[labelled]).sum()
        sums[2, k] = labelled.sum()
    if dist is not None and dist.enabled:
        sums = dist.sum(torch.from_numpy(sums)).numpy()
    out: dict[str, dict[str, float]] = {}
    for k, t in enumerate(model.task_names):
        n = sums[2, k]
        out[t] = {"loss": float(sums[0, k] / n) if n else float("nan"), "accuracy": float(sums[1, k] / n) if n else float("nan")}
    return out


def _metrics(prefix: str, per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {f"{prefix}/{t}/{m}": v for t, ms in per_task.items() for m, v in ms.items()}
    for m in ("loss", "accuracy"):
        out[f"{prefix}/mean/{m}"] = float(np.nanmean([ms[m] for ms in per_task.values()]))
    return out


def write_model_spec(
    path: Path, cfg: PipelineConfig, tasks: TaskSpec, stem: str | None = None, task_groups: list[list[str]] | None = None
) -> None:
    """How to rebuild the trained network (models.io.load_model). `stem`: the resolved `model.stem`
    the model was built with (None: resolved here), never `auto`, whose meaning may change.
    `pretrained` is provenance only: loading uses the trained weights. `task_groups`: the model is
    one network per group (models.grouped.TaskGroupedModel), each built as the spec says."""
    spec = {
        "format": SPEC_FORMAT,
        "arch": cfg.model.arch,
        "arch_options": dict(cfg.model.arch_options),
        "backbone": cfg.model.backbone,
        "stem": stem or resolve_stem(cfg.model.stem, cfg.preprocess.image_size, cfg.model.backbone),
        "pretrained": cfg.model.pretrained,
        "tasks": tasks.classes,
        "image_size": cfg.preprocess.image_size,
        "mean": list(cfg.preprocess.mean),
        "std": list(cfg.preprocess.std),
    }
    if task_groups:
        spec["task_groups"] = [list(g) for g in task_groups]
    path.write_text(json.dumps(spec, indent=2) + "\n")


@dataclass(frozen=True)
class ModelFiles:
    """Where one trained model's files go: the multi-task model in models/ (with its reports in
    reports/), each single-task baseline in a folder of its own; `resume`, its resumable checkpoint,
    under checkpoints/ (outside every DVC output: see training/checkpoint.py). `checkpoint` is the final
    training state (last-epoch weights, optimizer, method state) that a finished run leaves in models/."""

    weights: Path
    checkpoint: Path
    spec: Path
    history: Path
    curves: Path
    summary: Path
    gradient_cosine: Path | None = None
    resume: Path | None = None

    @classmethod
    def multitask(cls, paths: ProjectPaths) -> ModelFiles:
        return cls(
            paths.weights, paths.checkpoint, paths.model_spec, paths.train_history,
            paths.reports_dir / "training_curves.png", paths.train_metrics, paths.gradient_cosine,
            checkpoint.checkpoints_root(paths.root) / "train" / "last.pt",
        )  # fmt: skip

    @classmethod
    def in_folder(cls, folder: Path, resume: Path | None = None) -> ModelFiles:
        return cls(
            folder / "model.safetensors", folder / "checkpoint.pt", folder / "model_spec.json",
            folder / "train_history.csv", folder / "training_curves.png", folder / "train_metrics.json",
            resume=resume,
        )  # fmt: skip


def log_config_params(cfg: PipelineConfig) -> None:
    params = cfg.model_dump(mode="json")
    if isinstance(params["train"]["class_weights"], dict):  # class names need not be valid MLflow keys
        params["train"]["class_weights"] = json.dumps(params["train"]["class_weights"])
    mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})


def build_optimizer(model: MultiTaskModel, weighting: LossWeighting, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over three parameter groups, in this order: the model's new layers (heads, gates, experts,
    stitches: lr), its backbone (`model.backbone_parameters()`: lr x backbone_lr_scale, so pretrained
    features are fine-tuned gently) and the weighting method's own parameters (lr, no weight decay).
    Group 0 keeps the base lr, which the training history logs as `lr`."""
    backbone = model.backbone_parameters()
    in_backbone = {id(p) for p in backbone}
    groups = [
        {"name": "model", "params": [p for p in model.parameters() if id(p) not in in_backbone], "lr": cfg.lr},
        {"name": "backbone", "params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale},
        {"name": "weighting", "params": list(weighting.parameters()), "lr": cfg.lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def freeze_backbone(model: MultiTaskModel, epoch: int, cfg: TrainConfig) -> bool:
    """Freeze the backbone (requires_grad False) in epochs 1..freeze_backbone_epochs, unfreeze it after;
    return whether it is frozen in `epoch`. Frozen parameters get no gradient, so AdamW leaves them
    (and their weight decay) alone and the weighting methods skip them (weighting.gradients.trainable);
    BatchNorm running statistics still follow the data (the model trains in train mode)."""
    frozen = epoch <= cfg.freeze_backbone_epochs
    params = model.backbone_parameters()
    if any(p.requires_grad == frozen for p in params):
        log.info("epoch %d: backbone %s", epoch, "frozen (new layers only)" if frozen else "trainable")
    for p in params:
        p.requires_grad_(not frozen)
    return frozen


def check_freezable(model: MultiTaskModel, weighting: LossWeighting, cfg: PipelineConfig) -> None:
    """Fail before training where a frozen backbone leaves nothing shared to train (hard sharing) and
    the weighting method needs gradients on shared parameters or on the representation (the gradient-
    balancing methods, GradNorm): they would have nothing to balance."""
    if cfg.train.freeze_backbone_epochs == 0 or not isinstance(weighting, GradientBalancing | GradNorm):
        return
    in_backbone = {id(p) for p in model.backbone_parameters()}
    if not any(id(p) not in in_backbone for p in model.shared_parameters()):
        raise ValueError(
            f"train.freeze_backbone_epochs: {cfg.train.freeze_backbone_epochs} leaves model.arch {cfg.model.arch!r} "
            f"nothing shared to train, and train.weighting {cfg.train.weighting!r} balances the gradients of "
            "shared parameters; use a loss-weighting method (equal, fixed, uncertainty, dwa, rlw, famo) or "
            "freeze_backbone_epochs: 0"
        )


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}


def _catch_up_mlflow(history: list[dict[str, float]], cosines: dict[int, list[list[float]]], tasks: list[str]) -> None:
    """Log the epochs a resumed checkpoint holds but the run has not recorded (a kill between the
    checkpoint and the metrics), so the run has one value per epoch, none twice."""
    from mlflow.tracking import MlflowClient

    run_id = mlflow.active_run().info.run_id
    logged = {m.step for m in MlflowClient().get_metric_history(run_id, "val/mean/accuracy")}
    for row in history:
        if row["epoch"] not in logged:
            _log_epoch(row, cosines, tasks)


def _log_epoch(row: dict[str, float], cosines: dict[int, list[list[float]]], tasks: list[str]) -> None:
    epoch = int(row["epoch"])
    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch" and np.isfinite(v)}, step=epoch)
    if epoch in cosines:
        mlflow.log_dict({"tasks": tasks, "epoch": epoch, "cosine": cosines[epoch]},
                        f"task_relations/gradient_cosine_epoch_{epoch:03d}.json")  # fmt: skip


def fit(
    cfg: PipelineConfig,
    paths: ProjectPaths,
    tasks: TaskSpec,
    files: ModelFiles,
    label_columns: list[int] | None = None,
    resume: Resume | None = None,
    batches: BatchCache | None = None,
) -> TrainResult:
    """Train one model on `tasks` (label columns `label_columns` of the cache) inside the active MLflow
    run: per-epoch metrics, the best-on-validation weights, the spec. With `files.resume`, a checkpoint
    every epoch and every `train.checkpoint_every_steps` steps; `resume.state` continues one exactly.
    `batches`: training batches recorded by an earlier training of the same data and schedule, replayed
    (or recorded here) instead of decoded and augmented again (training.batch_cache; one process only).
    Distributed (training.ddp): every rank calls it; rank 0's resume state is broadcast, the collectives
    (loss and gradient reductions, validation, checkpoint statistics) run on all ranks, and only rank 0
    writes files and MLflow records."""
    dist = distributed()
    resume = resume or Resume(checkpoint.fingerprint(cfg, paths, label_columns))
    if dist.enabled:
        resume = Resume(resume.fingerprint, dist.broadcast_state(resume.state), resume.resumed)
    main = dist.is_main
    generator = seed_everything(cfg.train.seed)
    device = select_device(cfg.train.device)
    loaders = make_loaders(cfg, paths, generator, device, label_columns, dist)
    sampler: ResumableSampler = loaders["train"].sampler
    stem = resolve_stem(cfg.model.stem, cfg.preprocess.image_size, cfg.model.backbone)
    model = build_model(
        cfg.model.arch, tasks.num_classes, cfg.model.backbone, cfg.model.pretrained_weights(paths.root),
        cfg.model.arch_options, stem=stem,
    )  # fmt: skip
    model = place_model(ddp_runtime.prepare_model(model, device, cfg, dist), device, cfg.train.channels_last, cfg.train.compile)
    weighting = build_weighting(cfg.train.weighting, tasks.names, dict(cfg.train.weighting_options)).to(device)
    if isinstance(weighting, GradientBalancing):
        weighting.for_model(model.exact_representation_gradients)  # on: auto
    if isinstance(weighting, GradientBalancing) and weighting.on == "representation" and not model.exact_representation_gradients:
        raise ValueError(
            f"train.weighting_options.on: representation gives wrong gradients with model.arch "
            f"{cfg.model.arch!r} (task-specific parameters inside the encoder); use on: params"
        )
    check_freezable(model, weighting, cfg)
    train_labels = loaders["train"].dataset.labels.numpy()
    loss_fn = TaskLoss.from_config(cfg.train, tasks, train_labels).to(device)
    labelled_train = {t: int((train_labels[:, k] != MISSING_LABEL).sum()) for k, t in enumerate(tasks.names)}
    optimizer = build_optimizer(model, weighting, cfg.train)
    full_epoch = sampler.steps()
    steps_per_epoch = min(cfg.train.max_steps_per_epoch or full_epoch, full_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],  # one peak per group: the backbone's scaled
        total_steps=max(1, cfg.train.epochs * steps_per_epoch), pct_start=0.15,
    )  # fmt: skip
    measure = files.gradient_cosine is not None and cfg.train.task_affinity_every > 0
    tracker = GradientCosineTracker(tasks.names, cfg.train.task_affinity_every) if measure else None
    if main:
        for f in (files.weights, files.history, files.summary):
            f.parent.mkdir(parents=True, exist_ok=True)
    run_id = mlflow.active_run().info.run_id if main else ""

    history: list[dict[str, float]] = []
    cosines: dict[int, list[list[float]]] = {}
    best, best_weights = (-math.inf, 0), None
    totals = {"images": 0, "seconds": 0.0, "skipped": 0}
    start_epoch, partial = 1, None
    if (state := resume.state) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        weighting.load_state_dict(state["weighting"])
        if tracker is not None and state.get("tracker") is not None:
            tracker.load_state_dict(state["tracker"])
        checkpoint.restore_rng(state["rng"])
        history, totals = list(state["history"]), dict(state["totals"])
        cosines = {int(e): m for e, m in state["cosines"].items()}
        best, best_weights = (state["best"]["score"], state["best"]["epoch"]), state["best_weights"]
        partial = state["progress"]
        start_epoch = state["epoch"] if partial is not None else state["epoch"] + 1
        if main and best_weights is not None:  # DVC deleted models/ before rerunning the stage
            save_file(best_weights, files.weights)
        if main:
            _catch_up_mlflow(history, cosines, tasks.names)
    elif main:
        log.info(
            "train: %s (%s) on %s%s, tasks %s, %d training images", cfg.model.backbone, cfg.model.arch, device,
            f" x {dist.world_size} processes" if dist.enabled else "", ", ".join(tasks.names), len(loaders["train"].dataset),
        )  # fmt: skip
        log.info("labelled training samples per task: %s", ", ".join(f"{t} {n}" for t, n in labelled_train.items()))
        mlflow.log_params({f"data/{t}/labelled_train": n for t, n in labelled_train.items()})

    def save_checkpoint(epoch: int, progress: EpochProgress | None) -> None:
        if files.resume is None:
            return
        if progress is not None:
            progress = progress.reduced(dist)  # a collective: the global sums go into the checkpoint
        if not main:
            return
        checkpoint.save(files.resume, {
            "fingerprint": resume.fingerprint, "run_id": run_id, "epoch": epoch, "epochs": cfg.train.epochs,
            "progress": progress.state_dict() if progress is not None else None,
            "model": _cpu_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "weighting": weighting.state_dict(), "tracker": tracker.state_dict() if tracker is not None else None,
            "rng": checkpoint.rng_state(), "history": history, "cosines": {str(e): m for e, m in cosines.items()},
            "best": {"score": best[0], "epoch": best[1]}, "best_weights": best_weights, "totals": totals,
        })  # fmt: skip

    every = cfg.train.checkpoint_every_steps
    forward, wrapped_for = None, None
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        freeze_backbone(model, epoch, cfg.train)
        if dist.enabled and wrapped_for != ddp_runtime.trainable_set(model):  # DDP fixes its parameters when built
            forward, wrapped_for = ddp_runtime.wrap(model, device, dist), ddp_runtime.trainable_set(model)
        # with nothing shared left trainable (hard sharing, frozen backbone) there is no shared gradient to measure
        epoch_tracker = tracker if any(p.requires_grad for p in model.shared_parameters()) else None
        progress = EpochProgress(EpochStats(tasks.names, device))
        if partial is not None:
            progress.load_state_dict(partial, sums=main)  # the checkpoint's sums are the global ones: rank 0 holds them
            partial = None
        sampler.set_epoch(epoch, start=progress.steps * cfg.train.batch_size)

        def on_step(p: EpochProgress, epoch: int = epoch) -> None:
            if every and p.steps % every == 0 and p.steps < steps_per_epoch:
                save_checkpoint(epoch, p)
            fault_point("train.after_step")

        train_batches = loaders["train"]
        if batches is not None and not dist.enabled:
            train_batches = batches.loader(loaders["train"], epoch, progress.steps * cfg.train.batch_size, steps_per_epoch)
        progress = train_one_epoch(
            model, train_batches, weighting, loss_fn, optimizer, scheduler, device, cfg, epoch,
            (epoch - 1) * steps_per_epoch, epoch_tracker, progress, steps_per_epoch, on_step, totals["skipped"], forward,
        ).reduced(dist)  # fmt: skip
        train_stats, mean_weights = progress.stats.summary()
        images, seconds = progress.images, progress.seconds
        totals = {"images": totals["images"] + images, "seconds": totals["seconds"] + seconds, "skipped": totals["skipped"] + progress.skipped}
        for where in progress.skipped_at:
            log.warning("train: skipped the batch at %s (train.on_nonfinite: skip)", where)
        weighting.on_epoch_end(epoch, {t: s["loss"] for t, s in train_stats.items()})
        val_stats = validate(model, loaders["val"], device, cfg.train.amp, dist)
        row = {"epoch": epoch, **_metrics("train", train_stats), **_metrics("val", val_stats)}
        row.update({f"weight/{t}": w for t, w in mean_weights.items()})
        row["train/images_per_second"] = images / seconds if seconds else 0.0
        row["train/skipped_steps"] = progress.skipped
        row["lr"] = scheduler.get_last_lr()[0]
        if tracker is not None:  # per task: |g_t|, effective learning rate, step alignment
            for t, task_stats in tracker.epoch_task_stats().items():
                row.update({f"grad/{t}/{name}": v for name, v in task_stats.items()})
        history.append(row)
        if tracker is not None and (matrix := tracker.epoch_average()) is not None:
            cosines[epoch] = matrix.tolist()
        if row["val/mean/accuracy"] > best[0]:
            best, best_weights = (row["val/mean/accuracy"], epoch), _cpu_state(model) if main else None
            if main:
                save_file(best_weights, files.weights)
        save_checkpoint(epoch, None)  # before the metrics: a kill in between is caught up on resume
        fault_point("train.after_epoch_checkpoint")
        if not main:
            continue
        _log_epoch(row, cosines, tasks.names)
        log.info(
            "epoch %d/%d: train loss %.3f, val mean accuracy %.3f (%s), %.1f images/s",
            epoch, cfg.train.epochs, row["train/mean/loss"], row["val/mean/accuracy"],
            ", ".join(f"{t} {s['accuracy']:.3f}" for t, s in val_stats.items()), row["train/images_per_second"],
        )  # fmt: skip

    if not history:
        raise RuntimeError("train: no epoch was trained")
    total_images, total_seconds = totals["images"], totals["seconds"]
    throughput = total_images / total_seconds if total_seconds else 0.0
    if not main:
        return TrainResult("", best[1], best[0], throughput)
    print(f"train: {throughput:.1f} images/s on {device} ({total_images} images in {total_seconds:.1f} s)")
    torch.save(
        {"epoch": cfg.train.epochs, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "weighting": weighting.state_dict()},
        files.checkpoint,
    )
    frame = pd.DataFrame(history)
    frame.to_csv(files.history, index=False, quoting=csv.QUOTE_MINIMAL)
    plot_training_curves(frame, tasks.names, files.curves)
    mlflow.log_artifact(str(files.curves), artifact_path="plots")
    if files.gradient_cosine is not None:
        _write_gradient_cosine(files.gradient_cosine, tasks.names, cosines, cfg.train.task_affinity_every)
    summary = {
        "best_epoch": best[1],
        "best_val_mean_accuracy": best[0],
        "images_per_second": throughput,
        "train_seconds": total_seconds,
        "skipped_steps": totals["skipped"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device) + (f" x {dist.world_size} processes" if dist.enabled else ""),
        "val": {t: history[best[1] - 1][f"val/{t}/accuracy"] for t in tasks.names},
    }
    files.summary.write_text(json.dumps(summary, indent=2) + "\n")
    mlflow.log_metrics({"train/throughput_images_per_second": throughput, "val/best/mean_accuracy": best[0]})
    write_model_spec(files.spec, cfg, tasks, stem)
    mlflow.log_artifact(str(files.spec), artifact_path="model_spec")
    return TrainResult(run_id, best[1], best[0], throughput)


def _write_gradient_cosine(out: Path, tasks: list[str], per_epoch: dict[int, list[list[float]]], every: int) -> None:
    """The per-epoch task-gradient cosine matrices, plus a heatmap of their mean (logged to MLflow)."""
    report = {"tasks": tasks, "measured_every_steps": every, "epochs": {str(e): m for e, m in per_epoch.items()}}
    out.write_text(json.dumps(report, indent=2) + "\n")
    mlflow.log_artifact(str(out), artifact_path="task_relations")
    heatmap = out.with_suffix(".png")
    if per_epoch:
        mean = np.mean([np.asarray(m) for m in per_epoch.values()], axis=0)
        plot_task_matrix(mean, tasks, "task-gradient cosine similarity (mean over epochs)", heatmap)
    else:  # still a file: it is a declared DVC plot
        plot_task_matrix(np.full((len(tasks), len(tasks)), np.nan), tasks, "not measured (train.task_affinity_every: 0)", heatmap)
    mlflow.log_artifact(str(heatmap), artifact_path="task_relations")


def run_train(cfg: PipelineConfig, root: Path, fresh: bool = False) -> TrainResult:
    """Stage `train`: the multi-task model, in the MLflow run that later stages reopen. After a kill,
    the rerun resumes the checkpoint in checkpoints/train/ into the same run (`fresh`: start over)."""
    from mtl_core.tracking import run_name

    paths = ProjectPaths(root)
    tasks = TaskSpec.load(paths.tasks_file)
    paths.models_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(paths.models_dir / "groups", ignore_errors=True)  # a previous grouped solution's members
    if cfg.model.task_groups:
        from mtl_core.models.grouped import validate_groups

        validate_groups(cfg.model.task_groups, tasks.names)  # before any run is opened
    exp_id = setup_mlflow(cfg, root)
    files = ModelFiles.multitask(paths)
    folder = files.resume.parent
    # named and tagged by its method, so that the runs of a sweep (`dvc exp run --queue -S
    # train.weighting=equal,famo`) line up in the MLflow UI's compare view
    fp = checkpoint.fingerprint(cfg, paths, None)
    with training_run(folder, fp, experiment_id=exp_id, run_name=run_name(cfg), fresh=fresh) as (run, resume):
        write_run_info(paths, run.info.run_id, exp_id)
        if not resume.resumed:
            _start_run_records(cfg, paths, root)
        fail_orphan_runs(exp_id, "train", keep=checkpoint_run_ids(root))
        if cfg.model.task_groups:
            from mtl_core.training.groups import fit_groups  # it builds on this module

            result = fit_groups(cfg, paths, tasks, cfg.model.task_groups, fresh=fresh)
        else:
            result = fit(cfg, paths, tasks, files, resume=resume)
    checkpoint.remove(folder)  # finished: nothing left to resume
    return result


def stage_fits(cfg: PipelineConfig, tasks: TaskSpec) -> list[tuple[PipelineConfig, TaskSpec, list[int] | None, bool]]:
    """The `fit` calls `run_train` makes, in order (what the other ranks of a distributed run mirror:
    training.ddp): one model, or one per task group; both measure task-gradient affinities."""
    if not cfg.model.task_groups:
        return [(cfg, tasks, None, True)]
    from mtl_core.models.grouped import validate_groups

    groups = validate_groups(cfg.model.task_groups, tasks.names)
    return [(cfg, TaskSpec({t: tasks.classes[t] for t in g}), [tasks.names.index(t) for t in g], True) for g in groups]


def checkpoint_run_ids(root: Path) -> set[str]:
    from mtl_core.training.runs import recorded_run_ids

    return recorded_run_ids(checkpoint.checkpoints_root(root))


def _start_run_records(cfg: PipelineConfig, paths: ProjectPaths, root: Path) -> None:
    """What a new multi-task run records once: params, tags, the dataset, the data report, params.yaml."""
    from mtl_core.tracking import experiment_tags

    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
    log_config_params(cfg)
    tags = {"mtl.stage": "train", "mtl.kind": "multi_task", "mtl.device": str(select_device(cfg.train.device))}
    tags.update(experiment_tags(cfg))
    tags.update(ingested_data_hash(root))
    if commit := git_commit(root):
        tags["git_commit"] = commit
    mlflow.set_tags(tags)
    with warnings.catch_warnings():  # a local path matches two equivalent MLflow source types
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(manifest, source=str(paths.manifest.resolve()), name=cfg.data.source)
    mlflow.log_input(dataset, context="training")
    mlflow.log_artifact(str(paths.data_report), artifact_path="data")
    if (root / "params.yaml").is_file():
        mlflow.log_artifact(str(root / "params.yaml"))
