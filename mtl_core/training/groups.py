"""Training a grouped solution (`model.task_groups: [[a, b], [c]]`): one multi-task network per group.

Each group is fitted by the train stage's own `fit` on its tasks' label columns (its own weighting
method, optimizer, schedule and best-on-validation epoch) into `models/groups/<i>/`, inside a nested
MLflow run of the model's run. The members are then assembled into one `TaskGroupedModel` written
where the all-in-one model goes (models/model.safetensors + model_spec.json), so evaluate, register,
predict and compare treat the groups as one solution; the reports of the stage (history, curves,
train metrics, task-gradient cosines) are the members' merged, a task's columns from its group.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from safetensors.torch import save_file

from mtl_core.config import PipelineConfig
from mtl_core.models.grouped import TaskGroupedModel, validate_groups
from mtl_core.models.io import load_model
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.training import checkpoint
from mtl_core.training.runs import training_run
from mtl_core.evaluation.curves import plot_training_curves
from mtl_core.training.train import ModelFiles, TrainResult, _write_gradient_cosine, fit, write_model_spec

log = logging.getLogger(__name__)


def group_folder(paths: ProjectPaths, index: int) -> Path:
    return paths.models_dir / "groups" / str(index)


def merge_histories(histories: list[pd.DataFrame], tasks: list[str]) -> pd.DataFrame:
    """One row per epoch: every member's per-task columns, and means over all tasks recomputed."""
    merged = histories[0][["epoch"]].copy()
    for h in histories:
        own = [c for c in h.columns if any(c.startswith(f"{p}/{t}/") for t in tasks for p in ("train", "val", "grad"))]
        own += [c for c in h.columns if c.startswith("weight/")]
        merged = merged.merge(h[["epoch", *own]], on="epoch", how="outer")
    for split in ("train", "val"):
        for m in ("loss", "accuracy"):
            merged[f"{split}/mean/{m}"] = merged[[f"{split}/{t}/{m}" for t in tasks]].mean(axis=1)
    return merged


def merge_cosines(per_group: list[dict], groups: list[list[str]], tasks: list[str]) -> dict[int, list[list[float]]]:
    """Per epoch, the K x K matrix with each group's block filled in and NaN across groups (tasks in
    different networks share no parameters to measure on)."""
    index = {t: k for k, t in enumerate(tasks)}
    epochs = sorted({int(e) for report in per_group for e in report.get("epochs", {})})
    out: dict[int, list[list[float]]] = {}
    for e in epochs:
        m = np.full((len(tasks), len(tasks)), np.nan)
        for report, group in zip(per_group, groups):
            block = report.get("epochs", {}).get(str(e))
            if block is None:
                continue
            idx = [index[t] for t in group]
            m[np.ix_(idx, idx)] = np.asarray(block, dtype=float)
        out[e] = m.tolist()
    return out


def fit_groups(
    cfg: PipelineConfig, paths: ProjectPaths, tasks: TaskSpec, groups: list[list[str]], fresh: bool = False
) -> TrainResult:
    """Fit one network per group inside the active (the model's) MLflow run; write the grouped model.
    Each group resumes from its own checkpoint (checkpoints/train/group-<i>/) into its own nested run."""
    groups = validate_groups(groups, tasks.names)
    parent = mlflow.active_run()
    members, summaries, histories, cosine_reports = [], [], [], []
    for i, group in enumerate(groups):
        folder = group_folder(paths, i)
        resume_dir = checkpoint.checkpoints_root(paths.root) / "train" / f"group-{i}"
        files = ModelFiles(**{
            **ModelFiles.in_folder(folder, resume_dir / checkpoint.LAST).__dict__, "gradient_cosine": folder / "task_gradient_cosine.json",
        })  # fmt: skip
        columns = [tasks.names.index(t) for t in group]
        fp = checkpoint.fingerprint(cfg, paths, columns)
        with training_run(resume_dir, fp, run_name=f"group {i + 1}: {', '.join(group)}", nested=True, fresh=fresh) as (_, resume):
            mlflow.set_tags({"mtl.kind": "task_group", "mtl.group": ",".join(group), "mtl.parent_run": parent.info.run_id})
            log.info("task group %d/%d: %s", i + 1, len(groups), ", ".join(group))
            fit(cfg, paths, TaskSpec({t: tasks.classes[t] for t in group}), files, label_columns=columns, resume=resume)
        model, _ = load_model(files.spec, files.weights)
        members.append(model)
        summaries.append(json.loads(files.summary.read_text()))
        histories.append(pd.read_csv(files.history))
        cosine_reports.append(json.loads(files.gradient_cosine.read_text()) if files.gradient_cosine.is_file() else {})
        files.weights.unlink()  # the grouped file below holds these weights

    grouped = TaskGroupedModel(members, tasks.names)
    save_file({k: v.detach().contiguous().cpu() for k, v in grouped.state_dict().items()}, paths.weights)
    write_model_spec(paths.model_spec, cfg, tasks, task_groups=groups)
    history = merge_histories(histories, tasks.names)
    history.to_csv(paths.train_history, index=False)
    for _, row in history.iterrows():  # the solution's curves, in the model's run
        metrics = {k: float(v) for k, v in row.items() if k != "epoch" and k.split("/")[0] in ("train", "val") and math.isfinite(v)}
        mlflow.log_metrics(metrics, step=int(row["epoch"]))
    curves = paths.reports_dir / "training_curves.png"
    plot_training_curves(history, tasks.names, curves)
    mlflow.log_artifact(str(curves), artifact_path="plots")
    cosines = merge_cosines(cosine_reports, groups, tasks.names)
    _write_gradient_cosine(paths.gradient_cosine, tasks.names, cosines, cfg.train.task_affinity_every)

    val = {t: v for s in summaries for t, v in s["val"].items()}
    seconds = sum(s["train_seconds"] for s in summaries)
    images = sum(s["images_per_second"] * s["train_seconds"] for s in summaries)
    summary = {
        "best_epoch": {",".join(g): s["best_epoch"] for g, s in zip(groups, summaries)},
        "best_val_mean_accuracy": float(np.mean([val[t] for t in tasks.names])),
        "images_per_second": images / seconds if seconds else 0.0,
        "train_seconds": seconds,
        "parameters": sum(s["parameters"] for s in summaries),
        "device": summaries[0]["device"],
        "task_groups": groups,
        "val": {t: val[t] for t in tasks.names},
    }
    paths.train_metrics.write_text(json.dumps(summary, indent=2) + "\n")
    mlflow.log_metrics({"train/throughput_images_per_second": summary["images_per_second"], "val/best/mean_accuracy": summary["best_val_mean_accuracy"]})
    mlflow.set_tag("mtl.task_groups", json.dumps(groups))
    mlflow.log_artifact(str(paths.model_spec), artifact_path="model_spec")
    return TrainResult(parent.info.run_id, max(s["best_epoch"] for s in summaries), summary["best_val_mean_accuracy"], summary["images_per_second"])
