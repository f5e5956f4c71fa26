"""What one training leaves behind: the model's files (`ModelFiles`), its spec, and the writing of them
at the end of a training (`ModelOutputs`, rank 0; `NoOutputs` on the other ranks)."""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from mtl_core.config import PipelineConfig
from mtl_core.figures.curves import plot_training_curves
from mtl_core.figures.task_matrix import plot_task_matrix, symmetric_scale
from mtl_core.models.backbones import resolve_stem
from mtl_core.models.io import model_spec, write_spec
from mtl_core.paths import (
    CHECKPOINT_FILE, CURVES_FILE, GRADIENT_COSINE_FILE, HISTORY_FILE, SPEC_FILE, SUMMARY_FILE, WEIGHTS_FILE, ProjectPaths,
)  # fmt: skip
from mtl_core.tasks import TaskSpec
from mtl_core.training import checkpoint
from mtl_core.training.normalisation import resolve_normalisation
from mtl_core.training.sink import NullSink
from mtl_core.training.state import TrainingState


@dataclass(frozen=True)
class ModelFiles:
    """Where one trained model's files go: the multi-task model in models/ (with its reports in
    reports/), each single-task baseline in a folder of its own; `resume`, its resumable checkpoint,
    under checkpoints/ (outside every DVC output: see training/checkpoint.py). `checkpoint` is the final
    training state (last-epoch weights, optimizer, method state) that a finished run leaves in models/.
    `gradient_cosine`: where the task-gradient cosines go (None: not measured); `lookahead`: where the
    lookahead affinities go (when `fit` measures them)."""

    weights: Path
    checkpoint: Path
    spec: Path
    history: Path
    curves: Path
    summary: Path
    gradient_cosine: Path | None = None
    resume: Path | None = None
    lookahead: Path | None = None

    @classmethod
    def multitask(cls, paths: ProjectPaths) -> ModelFiles:
        return cls(
            paths.weights, paths.checkpoint, paths.model_spec, paths.train_history, paths.training_curves,
            paths.train_metrics, paths.gradient_cosine, checkpoint.checkpoints_root(paths.root) / "train" / checkpoint.LAST,
        )  # fmt: skip

    @classmethod
    def in_folder(cls, folder: Path, resume: Path | None = None, gradient_cosine: bool = False) -> ModelFiles:
        return cls(
            folder / WEIGHTS_FILE, folder / CHECKPOINT_FILE, folder / SPEC_FILE, folder / HISTORY_FILE,
            folder / CURVES_FILE, folder / SUMMARY_FILE, folder / GRADIENT_COSINE_FILE if gradient_cosine else None, resume,
        )  # fmt: skip

    def without_resume(self) -> ModelFiles:
        return replace(self, resume=None)


def spec_for(
    cfg: PipelineConfig, tasks: TaskSpec, stem: str | None = None, task_groups: list[list[str]] | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model spec (models.io) of a network trained with `cfg` on `tasks`; `stem`: the resolved
    `model.stem` it was built with (None: resolved here), never `auto`, whose meaning may change;
    `task_groups`: one network per group (models.grouped); `calibration`: the temperatures
    (training.calibration)."""
    if "auto" in (cfg.preprocess.mean, cfg.preprocess.std):  # fit resolves them once; others here
        cfg = resolve_normalisation(cfg)
    stem = stem or resolve_stem(cfg.model.stem, cfg.preprocess.image_size, cfg.model.backbone)
    return model_spec(
        cfg.model.arch, cfg.model.arch_options, cfg.model.backbone, stem, cfg.model.pretrained, tasks.classes,
        cfg.preprocess.image_size, cfg.preprocess.mean, cfg.preprocess.std, task_groups, calibration,
    )  # fmt: skip


def write_gradient_cosine(
    out: Path, tasks: list[str], per_epoch: dict[int, list[list[float]]], every: int, sink: Any,
    title: str = "task-gradient cosine similarity (mean over epochs)", unmeasured: str = "not measured (train.task_affinity_every: 0)",
    own_scale: bool = False,
) -> None:  # fmt: skip
    """The per-epoch task-affinity matrices (the gradient cosines, or `title`'s), plus a heatmap of their
    mean (both as run artifacts); `own_scale`: colours over the matrix's own range, not [-1, 1]."""
    report = {"tasks": tasks, "measured_every_steps": every, "epochs": {str(e): m for e, m in per_epoch.items()}}
    out.write_text(json.dumps(report, indent=2) + "\n")
    sink.log_artifact(out, "task_relations")
    heatmap = out.with_suffix(".png")
    if per_epoch:
        mean = mean_matrix(per_epoch)
        plot_task_matrix(mean, tasks, title, heatmap, scale=symmetric_scale(mean) if own_scale else 1.0)
    else:  # still a file: it is a declared DVC plot
        plot_task_matrix(np.full((len(tasks), len(tasks)), np.nan), tasks, unmeasured, heatmap)
    sink.log_artifact(heatmap, "task_relations")


def mean_matrix(per_epoch: dict[int, list[list[float]]]) -> np.ndarray:
    """The mean over epochs of per-epoch K x K matrices, a pair NaN only where no epoch measured it."""
    stack = np.asarray([np.asarray(m, dtype=float) for m in per_epoch.values()])
    if not np.isnan(stack).any():
        return stack.mean(axis=0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stack, axis=0)


class NoOutputs:
    """A rank other than 0: writes nothing."""

    def prepare(self) -> None:
        pass

    def save_best(self, weights: dict[str, torch.Tensor]) -> None:
        pass

    def finish(
        self, state: TrainingState, cfg: PipelineConfig, tasks: TaskSpec, stem: str, device: torch.device, processes: int,
        throughput: float, calibration: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        pass


class ModelOutputs(NoOutputs):
    """Rank 0: the best weights as they improve, and at the end the final training state, the history,
    its curves, the task-gradient cosines, the summary and the spec, each logged through `sink`."""

    def __init__(self, files: ModelFiles, sink: Any = None) -> None:
        self.files, self.sink = files, sink or NullSink()

    def prepare(self) -> None:
        for f in (self.files.weights, self.files.history, self.files.summary):
            f.parent.mkdir(parents=True, exist_ok=True)

    def save_best(self, weights: dict[str, torch.Tensor]) -> None:
        save_file(weights, self.files.weights)

    def finish(
        self, state: TrainingState, cfg: PipelineConfig, tasks: TaskSpec, stem: str, device: torch.device, processes: int,
        throughput: float, calibration: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        files, sink, totals = self.files, self.sink, state.totals
        print(f"train: {throughput:.1f} images/s on {device} ({totals['images']} images in {totals['seconds']:.1f} s)")
        torch.save(
            {"epoch": cfg.train.epochs, "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
             "weighting": state.weighting.state_dict()},
            files.checkpoint,
        )  # fmt: skip
        frame = pd.DataFrame(state.history)
        frame.to_csv(files.history, index=False, quoting=csv.QUOTE_MINIMAL)
        plot_training_curves(frame, tasks.names, files.curves)
        sink.log_artifact(files.curves, "plots")
        if files.gradient_cosine is not None:
            write_gradient_cosine(files.gradient_cosine, tasks.names, state.cosines, cfg.train.task_affinity_every, sink)
        if files.lookahead is not None and state.lookahead is not None:
            write_gradient_cosine(
                files.lookahead, tasks.names, state.lookaheads, state.lookahead.every, sink,
                "lookahead affinity Z[row -> column] (mean over epochs)", "not measured", own_scale=True,
            )  # fmt: skip
        summary = {
            "best_epoch": state.best_epoch,
            "best_val_mean_accuracy": state.best_score,
            "images_per_second": throughput,
            "train_seconds": totals["seconds"],
            "skipped_steps": totals["skipped"],
            "parameters": sum(p.numel() for p in state.model.parameters()),
            "device": str(device) + (f" x {processes} processes" if processes > 1 else ""),
            "val": {t: state.history[state.best_epoch - 1][f"val/{t}/accuracy"] for t in tasks.names},
        }
        files.summary.write_text(json.dumps(summary, indent=2) + "\n")
        sink.log_metrics({"train/throughput_images_per_second": throughput, "val/best/mean_accuracy": state.best_score})
        write_spec(files.spec, spec_for(cfg, tasks, stem, calibration=calibration))
        sink.log_artifact(files.spec, "model_spec")


def training_cost(folder: Path) -> dict[str, float]:
    """Training seconds and parameter count of a model fitted into `folder` (its train_metrics.json)."""
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    return {"train_seconds": summary["train_seconds"], "parameters": summary["parameters"]}
