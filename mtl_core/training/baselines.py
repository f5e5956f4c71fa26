"""Stage `baselines`: one single-task model per task, same backbone, budget and data as the multi-task one.

Each baseline is the plain single-task network: the same backbone with one head (`hard_sharing` with
one task, whatever `model.arch` the multi-task model uses), trained by the same `fit` for the same
epochs, batch size and data with equal weighting (for one task, plain training), in an MLflow run of
its own tagged `mtl.kind=single_task_baseline`, and scored on the test split. DVC caches the stage on
the data and the parameters a single-task model depends on (not `train.weighting` nor `model.arch`),
so trying another multi-task method reuses them.
With `compare.single_task: false` the stage trains nothing and records that it is disabled.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow

from mtl_core.config import PipelineConfig
from mtl_core.evaluation.evaluate import make_test_loader, score
from mtl_core.models.io import load_model
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.tracking import git_commit, ingested_data_hash, setup_mlflow
from mtl_core.training.device import select_device
from mtl_core.training.train import ModelFiles, fit, log_config_params

log = logging.getLogger(__name__)


def run_baselines(cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    paths = ProjectPaths(root)
    if paths.single_task_dir.exists():
        shutil.rmtree(paths.single_task_dir)
    paths.single_task_dir.mkdir(parents=True)
    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.compare.single_task:
        report: dict[str, Any] = {"enabled": False, "reason": "compare.single_task is false"}
        paths.single_task_metrics.write_text(json.dumps(report, indent=2) + "\n")
        log.info("baselines: compare.single_task is false; no single-task model trained")
        return report

    tasks = TaskSpec.load(paths.tasks_file)
    model = cfg.model.model_copy(update={"arch": "hard_sharing", "arch_options": {}})
    cfg = cfg.model_copy(update={"model": model})
    exp_id = setup_mlflow(cfg, root)
    device = select_device(cfg.train.device)
    results: dict[str, dict[str, float]] = {}
    runs: dict[str, str] = {}
    for k, task in enumerate(tasks.names):
        folder = paths.single_task_dir / task
        single = TaskSpec({task: tasks.classes[task]})
        with mlflow.start_run(experiment_id=exp_id, run_name=f"single-task {task}") as run:
            log_config_params(cfg)
            tags = {"mtl.kind": "single_task_baseline", "mtl.task": task, **ingested_data_hash(root)}
            if commit := git_commit(root):
                tags["git_commit"] = commit
            mlflow.set_tags(tags)
            fit(cfg, paths, single, ModelFiles.in_folder(folder), label_columns=[k], weighting_name="equal")
            model, _ = load_model(folder / "model_spec.json", folder / "model.safetensors", device)
            per_task, *_ = score(model, make_test_loader(cfg, paths, [k]), device, cfg.train.amp)
            results[task] = per_task[task]
            mlflow.log_metrics({f"test/{task}/{m}": v for m, v in per_task[task].items() if m != "support"})
            runs[task] = run.info.run_id
        log.info("baseline %s: test accuracy %.3f", task, results[task]["accuracy"])
    report = {"enabled": True, "tasks": results, "runs": runs}
    paths.single_task_metrics.write_text(json.dumps(report, indent=2) + "\n")
    return report
