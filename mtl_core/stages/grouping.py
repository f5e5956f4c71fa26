"""Stage `grouping`: with `model.task_groups: auto`, measure how the tasks help each other and choose groups.

A short probe training of the all-in-one network (`grouping.probe_epochs` epochs of the train section's
schedule, its own MLflow run tagged `mtl.kind=affinity_probe`) measures, every `grouping.every` steps,
both affinities: the lookahead affinity of Fifty et al. 2021 (training.lookahead_affinity) and the
cosine of the task gradients on the shared parameters (training.gradient_cosine). The one that
`grouping.signal` names chooses the partition of the tasks (evaluation/task_grouping.py: the grouping
with the highest total affinity onto each task from its group, fewer networks on a tie); the train
stage then trains that grouping, one network per group (or one network, when the choice is all-in-one).

Writes `reports/task_groups.json` (the decision: groups, signal, scores, the other signal's choice, the
probe's cost), `reports/task_affinity.json` (both mean matrices and their per-epoch values) and
`reports/task_affinity.png` (the deciding signal's heatmap). Without `task_groups: auto` it writes
`{"enabled": false}` and trains nothing, before importing torch's training code or MLflow. With one task,
or a task with too few labelled training rows to measure, it keeps one network and says why.

The choice is unverified until the compare stage tests it against the single-task models
(`compare.single_task: true`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mtl_core.config import PipelineConfig
from mtl_core.evaluation.task_grouping import format_groups, propose_grouping
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import MISSING_LABEL, TaskSpec

log = logging.getLogger(__name__)

SIGNALS = ("lookahead", "cosine")


def probe_config(cfg: PipelineConfig) -> PipelineConfig:
    """The all-in-one network of `cfg`, trained for `grouping.probe_epochs` epochs and measuring the
    task-gradient cosines every `grouping.every` steps."""
    model = cfg.model.model_copy(update={"task_groups": None})
    train = cfg.train.model_copy(update={"epochs": cfg.grouping.probe_epochs, "task_affinity_every": cfg.grouping.every})
    return cfg.model_copy(update={"model": model, "train": train})


def _write(paths: ProjectPaths, report: dict[str, Any]) -> dict[str, Any]:
    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    paths.task_groups.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _write_unmeasured(paths: ProjectPaths, reason: str) -> None:
    """The stage's other outputs when nothing is measured (DVC outputs, and a declared plot): a report
    that says why, and a heatmap that says so."""
    from mtl_core.figures.task_matrix import plot_task_matrix  # matplotlib: only to draw

    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    paths.task_affinity.write_text(json.dumps({"enabled": False, "reason": reason}, indent=2) + "\n")
    tasks = TaskSpec.load(paths.tasks_file).names if paths.tasks_file.is_file() else []
    plot_task_matrix(np.full((len(tasks), len(tasks)), np.nan), tasks, f"not measured: {reason}", paths.task_affinity.with_suffix(".png"))


def _one_network(paths: ProjectPaths, tasks: TaskSpec, reason: str) -> dict[str, Any]:
    log.warning("grouping: %s; one network for all tasks", reason)
    _write_unmeasured(paths, reason)
    return _write(paths, {"enabled": True, "groups": [tasks.names], "signal": None, "measured": False, "reason": reason})


def run_grouping(cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    paths = ProjectPaths(root)
    if not cfg.model.auto_groups:
        report = {"enabled": False, "reason": "model.task_groups is not auto"}
        _write_unmeasured(paths, report["reason"])
        log.info("grouping: model.task_groups is not auto; nothing measured")
        return _write(paths, report)
    tasks = TaskSpec.load(paths.tasks_file)
    if len(tasks.names) == 1:
        return _one_network(paths, tasks, f"one task ({tasks.names[0]}): there is nothing to group")
    labels = np.load(paths.labels_cache("train"))
    labelled = {t: int((labels[:, k] != MISSING_LABEL).sum()) for k, t in enumerate(tasks.names)}
    too_few = {t: n for t, n in labelled.items() if n < cfg.grouping.min_labelled_rows}
    if too_few:
        listed = ", ".join(f"{t} ({n})" for t, n in too_few.items())
        return _one_network(
            paths, tasks, f"too few labelled training rows to measure task {listed}; grouping.min_labelled_rows is "
            f"{cfg.grouping.min_labelled_rows}",
        )  # fmt: skip
    affinity = _probe(cfg, paths, tasks)
    return _choose(cfg, paths, tasks, affinity)


def _probe(cfg: PipelineConfig, paths: ProjectPaths, tasks: TaskSpec) -> dict[str, Any]:
    """Train the probe in its own MLflow run (resumable after a kill, from checkpoints/grouping/, like
    the training stages); return both signals' mean matrices and per-epoch values."""
    import shutil  # the imports of a stage that trains: the disabled stage runs in every `dvc repro`
    from functools import partial

    from mtl_core.tracking.runs import record_new_run, run_name
    from mtl_core.tracking.store import setup_mlflow
    from mtl_core.training import checkpoint
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import ModelFiles, mean_matrix
    from mtl_core.training.runs import fail_orphan_runs, recorded_run_ids, training_run

    probe = probe_config(cfg)
    exp_id = setup_mlflow(cfg, paths.root)
    folder = checkpoint.checkpoints_root(paths.root) / "grouping"
    fail_orphan_runs(exp_id, "grouping", keep=recorded_run_ids(folder))
    files = ModelFiles.in_folder(folder / "probe", folder / checkpoint.LAST, gradient_cosine=True)
    files = ModelFiles(**{**files.__dict__, "lookahead": folder / "probe" / "task_lookahead_affinity.json"})
    fp = checkpoint.fingerprint(probe, paths, None) | {"lookahead_every": cfg.grouping.every}
    new_run = partial(record_new_run, probe, paths.root, {"mtl.stage": "grouping", "mtl.kind": "affinity_probe"})
    with training_run(folder, fp, experiment_id=exp_id, run_name=run_name(probe) + "-affinity-probe", on_new=new_run) as (run, resume):
        log.info("grouping: probe training of %d epoch(s), affinities every %d steps", probe.train.epochs, cfg.grouping.every)
        fit(probe, paths, tasks, files, resume=resume, lookahead_every=cfg.grouping.every)
        summary = json.loads(files.summary.read_text())
        per_signal = {"cosine": json.loads(files.gradient_cosine.read_text()), "lookahead": json.loads(files.lookahead.read_text())}
    out: dict[str, Any] = {"tasks": tasks.names, "run": run.info.run_id, "probe": {
        "epochs": probe.train.epochs, "every_steps": cfg.grouping.every, "train_seconds": summary["train_seconds"],
        "images_per_second": summary["images_per_second"],
    }}  # fmt: skip
    for signal, report in per_signal.items():
        epochs = {int(e): m for e, m in report["epochs"].items()}
        mean = mean_matrix(epochs) if epochs else np.full((len(tasks.names),) * 2, np.nan)
        out[signal] = {"mean": _json_matrix(mean), "epochs": report["epochs"]}
    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    paths.task_affinity.write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)  # finished: nothing left to resume
    return out


def _json_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(matrix, dtype=float)]


def _matrix(values: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


def _choose(cfg: PipelineConfig, paths: ProjectPaths, tasks: TaskSpec, affinity: dict[str, Any]) -> dict[str, Any]:
    """The partition the deciding signal's mean affinity chooses; the other signal's choice reported beside it."""
    import mlflow

    from mtl_core.figures.task_matrix import plot_task_matrix, symmetric_scale

    chosen = {s: propose_grouping(_matrix(affinity[s]["mean"]), tasks.names) for s in SIGNALS}
    decision = chosen[cfg.grouping.signal]
    other = next(s for s in SIGNALS if s != cfg.grouping.signal)
    mean = _matrix(affinity[cfg.grouping.signal]["mean"])
    title = {"lookahead": "lookahead affinity Z[row -> column]", "cosine": "task-gradient cosine"}[cfg.grouping.signal]
    heatmap = paths.task_affinity.with_suffix(".png")
    plot_task_matrix(
        mean, tasks.names, f"{title} (probe mean): groups {format_groups(decision.groups)}", heatmap,
        scale=symmetric_scale(mean) if cfg.grouping.signal == "lookahead" else 1.0,
    )  # fmt: skip
    report = {
        "enabled": True, "measured": True, "signal": cfg.grouping.signal, **decision.as_dict(),
        "alternative": {"signal": other, **chosen[other].as_dict()}, "probe": affinity["probe"],
        "run": affinity["run"], "verified": False,
    }  # fmt: skip
    with mlflow.start_run(run_id=affinity["run"]):
        mlflow.log_artifact(str(paths.task_affinity), artifact_path="task_relations")
        mlflow.log_artifact(str(heatmap), artifact_path="task_relations")
        mlflow.set_tag("mtl.task_groups", format_groups(decision.groups))
    log.info(
        "grouping: %s affinity chooses model.task_groups %s (score %.3f, all-in-one %.3f); %s would choose %s",
        cfg.grouping.signal, format_groups(decision.groups), decision.score, decision.all_in_one_score, other,
        format_groups(chosen[other].groups),
    )  # fmt: skip
    return _write(paths, report)
