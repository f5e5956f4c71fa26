"""Stage `all_in_one`: the all-in-one reference model of a grouped solution.

With `model.task_groups` set, the train stage's model is one network per group; the compare stage then
also needs the all-in-one network (every task in one model, the same `model.arch`, weighting and
budget) to say whether the grouping paid for itself. This stage trains it into `models_all_in_one/`
(MLflow tag `mtl.kind=all_in_one_reference`) and scores it on the test split. Without task groups,
or without single-task baselines to compare with, it trains nothing and says so, before importing
torch or MLflow (a stage process that does nothing should cost little).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from mtl_core.config import PipelineConfig
from mtl_core.paths import ProjectPaths

log = logging.getLogger(__name__)


def disabled_reason(cfg: PipelineConfig) -> str | None:
    if not cfg.model.task_groups:
        return "model.task_groups is not set: the train stage's model is the all-in-one model"
    if not cfg.compare.single_task:
        return "compare.single_task is false: no comparison to make"
    return None


def all_in_one_config(cfg: PipelineConfig) -> PipelineConfig:
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"task_groups": None})})


def stage_fits(cfg: PipelineConfig, tasks: Any) -> list[tuple[PipelineConfig, Any, list[int] | None, bool]]:
    """The `fit` calls `run_all_in_one` makes (mirrored by the other ranks: training.ddp)."""
    return [] if disabled_reason(cfg) is not None else [(all_in_one_config(cfg), tasks, None, False)]


def run_all_in_one(cfg: PipelineConfig, root: Path, fresh: bool = False) -> dict[str, Any]:
    paths = ProjectPaths(root)
    folder, out = paths.all_in_one_dir, paths.all_in_one_metrics
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    if (reason := disabled_reason(cfg)) is not None:
        report: dict[str, Any] = {"enabled": False, "reason": reason}
        out.write_text(json.dumps(report, indent=2) + "\n")
        log.info("all_in_one: %s; nothing trained", reason)
        return report

    import mlflow

    from mtl_core.tasks import TaskSpec
    from mtl_core.tracking import git_commit, ingested_data_hash, run_name, setup_mlflow
    from mtl_core.training.baselines import fit_and_score, training_cost
    from mtl_core.training import checkpoint
    from mtl_core.training.runs import fail_orphan_runs, recorded_run_ids, training_run
    from mtl_core.training.train import log_config_params

    tasks = TaskSpec.load(paths.tasks_file)
    exp_id = setup_mlflow(cfg, root)
    all_cfg = all_in_one_config(cfg)
    resume_dir = checkpoint.checkpoints_root(root) / "all_in_one"
    fp = checkpoint.fingerprint(all_cfg, paths, None)
    fail_orphan_runs(exp_id, "all_in_one", keep=recorded_run_ids(resume_dir))
    with training_run(resume_dir, fp, experiment_id=exp_id, run_name=run_name(cfg, "all_in_one"), fresh=fresh) as (run, resume):
        if not resume.resumed:
            log_config_params(all_cfg)
            tags = {"mtl.stage": "all_in_one", "mtl.kind": "all_in_one_reference", **ingested_data_hash(root)}
            if commit := git_commit(root):
                tags["git_commit"] = commit
            mlflow.set_tags(tags)
        results = fit_and_score(all_cfg, paths, tasks, folder, resume=resume, resume_dir=resume_dir)
        mlflow.log_metrics({f"test/{t}/{m}": v for t, ms in results.items() for m, v in ms.items() if m != "support"})
    checkpoint.remove(resume_dir / checkpoint.LAST)  # finished: nothing left to resume
    report = {"enabled": True, "tasks": results, "run": run.info.run_id, "cost": training_cost(folder)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("all_in_one: test accuracy %s", ", ".join(f"{t} {m['accuracy']:.3f}" for t, m in results.items()))
    return report
