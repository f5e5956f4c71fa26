"""Stage `baselines`: one single-task model per task, same backbone, budget and data as the multi-task one.

Each baseline is the plain single-task network: the same backbone with one head (`hard_sharing` with
one task, whatever `model.arch` the multi-task model uses), trained by the same engine for the same
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

from mtl_core.config import PipelineConfig
from mtl_core.paths import NOT_TRAINED_FILE, ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.training import checkpoint
from mtl_core.training.model_files import ModelFiles
from mtl_core.training.plan import FitJob

# The engine, torchmetrics and MLflow are imported where models are trained (`_train_baselines`): the
# disabled stage (the default, `compare.single_task: false`) runs in every `dvc repro` and so starts in
# ~3 s, not ~10 s.

log = logging.getLogger(__name__)


def single_task_config(cfg: PipelineConfig) -> PipelineConfig:
    """The plain single-task network of `cfg`: same backbone and budget, hard sharing, plain training."""
    model = cfg.model.model_copy(update={"arch": "hard_sharing", "arch_options": {}, "task_groups": None})
    train = cfg.train.model_copy(update={"weighting": "equal", "weighting_options": {}})
    return cfg.model_copy(update={"model": model, "train": train})


def plan(cfg: PipelineConfig, paths: ProjectPaths) -> list[FitJob]:
    """One single-task model per task, in the order of the tasks (none when the stage is disabled); each
    resumes from its own checkpoint, checkpoints/baselines/<task>/."""
    if not cfg.compare.single_task:
        return []
    tasks = TaskSpec.load(paths.tasks_file)
    single = single_task_config(cfg)
    resume_root = checkpoint.checkpoints_root(paths.root) / "baselines"
    return [
        FitJob(task, single, TaskSpec({task: tasks.classes[task]}), [k],
               ModelFiles.in_folder(paths.single_task_dir / task, resume_root / task / checkpoint.LAST))
        for k, task in enumerate(tasks.names)
    ]  # fmt: skip


def run_baselines(cfg: PipelineConfig, root: Path, fresh: bool = False) -> dict[str, Any]:
    """Stage `baselines`. Each task's model resumes from its own checkpoint after a kill (a finished one
    is restored, not retrained), into its own MLflow run; `fresh`: start every one over."""
    paths = ProjectPaths(root)
    if paths.single_task_dir.exists():
        shutil.rmtree(paths.single_task_dir)
    paths.single_task_dir.mkdir(parents=True)
    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.compare.single_task:
        report: dict[str, Any] = {"enabled": False, "reason": "compare.single_task is false"}
        paths.single_task_metrics.write_text(json.dumps(report, indent=2) + "\n")
        (paths.single_task_dir / NOT_TRAINED_FILE).write_text(f"no single-task model trained: {report['reason']}\n")
        log.info("baselines: compare.single_task is false; no single-task model trained")
        return report
    return _train_baselines(cfg, paths, plan(cfg, paths), fresh)


def _train_baselines(cfg: PipelineConfig, paths: ProjectPaths, jobs: list[FitJob], fresh: bool) -> dict[str, Any]:
    """Each job in an MLflow run of its own, then scored on the test split; the report. The tasks' trainings differ
    only in their label column: with `compare.shared_input` the first records its augmented batches and
    the others replay them (same bytes, so the same weights as separate trainings)."""
    from functools import partial  # the imports of a stage that trains: see the note at the top

    import mlflow

    from mtl_core.evaluation.scoring import score_folder
    from mtl_core.tracking.runs import record_new_run, run_name
    from mtl_core.tracking.store import setup_mlflow
    from mtl_core.training.batch_cache import BatchCache
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import training_cost
    from mtl_core.training.runs import fail_orphan_runs, recorded_run_ids, training_run

    exp_id = setup_mlflow(cfg, paths.root)
    resume_root = checkpoint.checkpoints_root(paths.root) / "baselines"
    fail_orphan_runs(exp_id, "baselines", keep=recorded_run_ids(resume_root))
    batches = None
    if cfg.compare.shared_input and jobs:
        batches = BatchCache(resume_root.with_name("baselines.batches"), checkpoint.fingerprint(jobs[0].cfg, paths, None))
    results: dict[str, dict[str, float]] = {}
    runs: dict[str, str] = {}
    cost = {"train_seconds": 0.0, "parameters": 0}
    for job in jobs:
        task, folder = job.name, job.files.weights.parent
        tags = {"mtl.stage": "baselines", "mtl.kind": "single_task_baseline", "mtl.task": task}
        fp = checkpoint.fingerprint(job.cfg, paths, job.label_columns)
        new_run = partial(record_new_run, job.cfg, paths.root, tags)
        with training_run(job.files.resume.parent, fp, experiment_id=exp_id, run_name=run_name(cfg, "stl", task), fresh=fresh, on_new=new_run, stage="baselines") as (run, resume):
            seen = len(batches.events) if batches is not None else 0
            fit(job.cfg, paths, job.tasks, job.files, label_columns=job.label_columns, resume=resume, batches=batches)
            results[task] = score_folder(job.cfg, paths, folder, job.label_columns)[task]
            if batches is not None:  # how its training got its batches (compare.shared_input)
                mlflow.set_tag("mtl.input_batches", batches.summary(seen))
            mlflow.log_metrics({f"test/{task}/{m}": v for m, v in results[task].items() if m != "support"})
            runs[task] = run.info.run_id
        for key, value in training_cost(folder).items():
            cost[key] += value
        log.info("baseline %s: test accuracy %.3f", task, results[task]["accuracy"])
    report = {"enabled": True, "tasks": results, "runs": runs, "cost": cost}
    paths.single_task_metrics.write_text(json.dumps(report, indent=2) + "\n")
    checkpoint.remove(resume_root / "any")  # all finished: nothing left to resume
    if batches is not None:
        batches.remove()
    return report
