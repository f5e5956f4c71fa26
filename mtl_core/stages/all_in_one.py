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
from mtl_core.paths import NOT_TRAINED_FILE, ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.training import checkpoint
from mtl_core.training.groups import resolve_task_groups
from mtl_core.training.model_files import ModelFiles
from mtl_core.training.plan import FitJob

log = logging.getLogger(__name__)


def disabled_reason(cfg: PipelineConfig) -> str | None:
    """Why the stage trains nothing (`cfg` with `task_groups: auto` resolved), None when it trains."""
    if not cfg.model.task_groups:
        return "model.task_groups is not set: the train stage's model is the all-in-one model"
    if not cfg.compare.single_task:
        return "compare.single_task is false: no comparison to make"
    return None


def all_in_one_config(cfg: PipelineConfig) -> PipelineConfig:
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"task_groups": None})})


def plan(cfg: PipelineConfig, paths: ProjectPaths) -> list[FitJob]:
    """The all-in-one network of every task (none when the stage is disabled), resuming from
    checkpoints/all_in_one/."""
    cfg = resolve_task_groups(cfg, paths)
    if disabled_reason(cfg) is not None:
        return []
    resume = checkpoint.checkpoints_root(paths.root) / "all_in_one" / checkpoint.LAST
    files = ModelFiles.in_folder(paths.all_in_one_dir, resume)
    return [FitJob("all-in-one reference", all_in_one_config(cfg), TaskSpec.load(paths.tasks_file), None, files)]


def run_all_in_one(cfg: PipelineConfig, root: Path, fresh: bool = False) -> dict[str, Any]:
    paths = ProjectPaths(root)
    folder, out = paths.all_in_one_dir, paths.all_in_one_metrics
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve_task_groups(cfg, paths)
    if (reason := disabled_reason(cfg)) is not None:
        report: dict[str, Any] = {"enabled": False, "reason": reason}
        out.write_text(json.dumps(report, indent=2) + "\n")
        (folder / NOT_TRAINED_FILE).write_text(f"no all-in-one reference trained: {reason}\n")
        log.info("all_in_one: %s; nothing trained", reason)
        return report
    (job,) = plan(cfg, paths)
    report = _train_all_in_one(cfg, paths, job, fresh)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("all_in_one: test accuracy %s", ", ".join(f"{t} {m['accuracy']:.3f}" for t, m in report["tasks"].items()))
    return report


def _train_all_in_one(cfg: PipelineConfig, paths: ProjectPaths, job: FitJob, fresh: bool) -> dict[str, Any]:
    """The job in an MLflow run of its own, scored on the test split."""
    from functools import partial  # the imports of a stage that trains: see the module docstring

    import mlflow

    from mtl_core.evaluation.scoring import score_folder
    from mtl_core.tracking.runs import record_new_run, run_name
    from mtl_core.tracking.store import setup_mlflow
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import training_cost
    from mtl_core.training.runs import fail_orphan_runs, recorded_run_ids, training_run

    exp_id = setup_mlflow(cfg, paths.root)
    resume_dir = job.files.resume.parent
    fp = checkpoint.fingerprint(job.cfg, paths, None)
    fail_orphan_runs(exp_id, "all_in_one", keep=recorded_run_ids(resume_dir))
    new_run = partial(record_new_run, job.cfg, paths.root, {"mtl.stage": "all_in_one", "mtl.kind": "all_in_one_reference"})
    with training_run(resume_dir, fp, experiment_id=exp_id, run_name=run_name(cfg, "all_in_one"), fresh=fresh, on_new=new_run, stage="all_in_one") as (run, resume):
        fit(job.cfg, paths, job.tasks, job.files, resume=resume)
        results = score_folder(job.cfg, paths, paths.all_in_one_dir)
        mlflow.log_metrics({f"test/{t}/{m}": v for t, ms in results.items() for m, v in ms.items() if m != "support"})
    checkpoint.remove(resume_dir / checkpoint.LAST)  # finished: nothing left to resume
    return {"enabled": True, "tasks": results, "run": run.info.run_id, "cost": training_cost(paths.all_in_one_dir)}
