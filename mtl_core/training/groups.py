"""A grouped solution (`model.task_groups: [[a, b], [c]]`): one multi-task network per group, one model.

Each group is fitted by the engine's `fit` on its tasks' label columns (its own weighting method,
optimizer, schedule and best-on-validation epoch) into `models/groups/<i>/` (the train stage's plan,
stages/train.py, one job per group). `assemble_groups` then puts the members together into one
`TaskGroupedModel` written where the all-in-one model goes (models/model.safetensors + model_spec.json),
so evaluate, register, predict and compare treat the groups as one solution; the reports of the stage
(history, curves, train metrics, task-gradient cosines) are the members' merged, a task's columns from
its group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.torch import save_file

from mtl_core.config import PipelineConfig
from mtl_core.figures.curves import plot_training_curves
from mtl_core.models.grouped import TaskGroupedModel
from mtl_core.models.io import load_model, read_spec, temperatures, write_spec
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.training.model_files import ModelFiles, spec_for, write_gradient_cosine
from mtl_core.training.sink import curve_metric


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


def assemble_groups(
    cfg: PipelineConfig, paths: ProjectPaths, tasks: TaskSpec, groups: Sequence[Sequence[str]], members: Sequence[ModelFiles], sink: Any,
) -> dict[str, Any]:  # fmt: skip
    """The grouped model from its fitted members (`members[i]`: group i's files): its weights, spec,
    merged history, curves, task-gradient cosines (each logged through `sink`: the model's run) and
    train metrics, which it returns. Each member's weights file is removed: the grouped file holds them."""
    groups = [list(g) for g in groups]
    models, summaries, histories, cosine_reports = [], [], [], []
    for files in members:
        model, _ = load_model(files.spec, files.weights)
        models.append(model)
        summaries.append(json.loads(files.summary.read_text()))
        histories.append(pd.read_csv(files.history))
        cosine_reports.append(json.loads(files.gradient_cosine.read_text()) if files.gradient_cosine and files.gradient_cosine.is_file() else {})
        files.weights.unlink()  # the grouped file below holds these weights
    member_specs = [read_spec(files.spec) for files in members]
    grouped = TaskGroupedModel(models, tasks.names)
    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in grouped.state_dict().items()}, paths.weights)
    normalisation = {"mean": tuple(member_specs[0]["mean"]), "std": tuple(member_specs[0]["std"])}  # resolved by fit
    cfg = cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update=normalisation)})
    write_spec(paths.model_spec, spec_for(cfg, tasks, member_specs[0]["stem"], task_groups=groups, calibration=merged_calibration(member_specs)))
    history = merge_histories(histories, tasks.names)
    history.to_csv(paths.train_history, index=False)
    for _, row in history.iterrows():  # the solution's curves, in the model's run
        metrics = {curve_metric(k): float(v) for k, v in row.items() if k != "epoch" and k.split("/")[0] in ("train", "val") and math.isfinite(v)}
        sink.log_metrics(metrics, step=int(row["epoch"]))
    plot_training_curves(history, tasks.names, paths.training_curves)
    sink.log_artifact(paths.training_curves, "plots")
    cosines = merge_cosines(cosine_reports, groups, tasks.names)
    write_gradient_cosine(paths.gradient_cosine, tasks.names, cosines, cfg.train.task_affinity_every, sink)
    summary = _merged_summary(groups, summaries, tasks)
    paths.train_metrics.write_text(json.dumps(summary, indent=2) + "\n")
    sink.log_metrics({"train/throughput_images_per_second": summary["images_per_second"], "val/best/mean_accuracy": summary["best_val_mean_accuracy"]})
    sink.set_tags({"mtl.task_groups": json.dumps(groups)})
    sink.log_artifact(paths.model_spec, "model_spec")
    return summary


def merged_calibration(specs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The members' temperatures (and how they were fitted) as one model's, each task's from its member."""
    if not any("temperatures" in s for s in specs):
        return None
    merged: dict[str, Any] = {"temperatures": {}, "fitted_on": "val", "unfitted": {}, "val_nll": {}}
    for spec in specs:
        merged["temperatures"].update(temperatures(spec))
        for key in ("unfitted", "val_nll"):
            merged[key].update(spec.get("calibration", {}).get(key, {}))
    return merged


def _merged_summary(groups: list[list[str]], summaries: list[dict[str, Any]], tasks: TaskSpec) -> dict[str, Any]:
    val = {t: v for s in summaries for t, v in s["val"].items()}
    seconds = sum(s["train_seconds"] for s in summaries)
    images = sum(s["images_per_second"] * s["train_seconds"] for s in summaries)
    return {
        "best_epoch": {",".join(g): s["best_epoch"] for g, s in zip(groups, summaries)},
        "best_val_mean_accuracy": float(np.mean([val[t] for t in tasks.names])),
        "images_per_second": images / seconds if seconds else 0.0,
        "train_seconds": seconds,
        "parameters": sum(s["parameters"] for s in summaries),
        "device": summaries[0]["device"],
        "task_groups": groups,
        "val": {t: val[t] for t in tasks.names},
    }


def resolve_task_groups(cfg: PipelineConfig, paths: ProjectPaths) -> PipelineConfig:
    """`cfg` with `model.task_groups: auto` replaced by the groups the grouping stage chose
    (reports/task_groups.json): a list of groups, or null when it chose one network for every task.
    Every other `cfg` is returned as it is. What a stage trains, names, fingerprints and records then
    follows the groups actually trained."""
    if not cfg.model.auto_groups:
        return cfg
    if not paths.task_groups.is_file():
        raise FileNotFoundError(f"{paths.task_groups}: model.task_groups is auto; run the grouping stage first (dvc repro)")
    report = json.loads(paths.task_groups.read_text())
    groups = report.get("groups") if report.get("enabled") else None
    if not groups:
        raise ValueError(f"{paths.task_groups}: no groups chosen ({report.get('reason', 'disabled')}); run the grouping stage again")
    chosen = [list(g) for g in groups] if len(groups) > 1 else None
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"task_groups": chosen})})
