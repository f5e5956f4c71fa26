"""Stage `train`: fit one shared-backbone network with one head per task (or one network per task group).

Opens the model's MLflow run (params, tags, dataset, data report), which the later stages reopen; the
engine (training.engine) logs per-epoch per-task loss and accuracy, checkpoints every epoch, keeps the
best-on-validation weights as safetensors and reports the training throughput. After a kill, the rerun
resumes the checkpoint in checkpoints/train/ into the same run (`fresh`: start over).
"""

from __future__ import annotations

import logging
import shutil
from functools import partial
from pathlib import Path

import mlflow

from mtl_core.config import PipelineConfig
from mtl_core.models.grouped import validate_groups
from mtl_core.paths import ProjectPaths
from mtl_core.runtime import select_device
from mtl_core.tasks import TaskSpec
from mtl_core.tracking.runs import experiment_tags, log_training_data, record_new_run, run_name, write_run_info
from mtl_core.tracking.store import setup_mlflow
from mtl_core.training import checkpoint
from mtl_core.training.engine import FitResult, fit
from mtl_core.training.groups import assemble_groups, group_folder, resolve_task_groups
from mtl_core.training.model_files import ModelFiles
from mtl_core.training.plan import FitJob
from mtl_core.training.runs import fail_orphan_runs, recorded_run_ids, training_run
from mtl_core.training.sink import MlflowSink

log = logging.getLogger(__name__)


def plan(cfg: PipelineConfig, paths: ProjectPaths) -> list[FitJob]:
    """One model of every task, or one per group of `model.task_groups` (into models/groups/<i>/, each
    resuming from checkpoints/train/group-<i>/; `auto`: the groups the grouping stage chose); both measure
    the task-gradient affinities."""
    cfg = resolve_task_groups(cfg, paths)
    tasks = TaskSpec.load(paths.tasks_file)
    if not cfg.model.task_groups:
        return [FitJob("multi-task model", cfg, tasks, None, ModelFiles.multitask(paths))]
    jobs = []
    for i, group in enumerate(validate_groups(cfg.model.task_groups, tasks.names)):
        resume = checkpoint.checkpoints_root(paths.root) / "train" / f"group-{i}" / checkpoint.LAST
        files = ModelFiles.in_folder(group_folder(paths, i), resume, gradient_cosine=True)
        group_tasks = TaskSpec({t: tasks.classes[t] for t in group})
        jobs.append(FitJob(f"group {i + 1}: {', '.join(group)}", cfg, group_tasks, [tasks.names.index(t) for t in group], files))
    return jobs


def run_train(cfg: PipelineConfig, root: Path, fresh: bool = False) -> FitResult:
    """The multi-task model, in the MLflow run that later stages reopen; a grouped model is fitted group
    by group, each in a nested run of its own (resumed from its own checkpoint), then assembled."""
    paths = ProjectPaths(root)
    auto = cfg.model.auto_groups
    cfg = resolve_task_groups(cfg, paths)
    tasks = TaskSpec.load(paths.tasks_file)
    paths.models_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(paths.models_dir / "groups", ignore_errors=True)  # a previous grouped solution's members
    jobs = plan(cfg, paths)  # validates the groups before any run is opened
    exp_id = setup_mlflow(cfg, root)
    folder = checkpoint.checkpoints_root(root) / "train"
    tags = {"mtl.stage": "train", "mtl.kind": "multi_task", "mtl.device": str(select_device(cfg.train.device)), **experiment_tags(cfg)}
    if auto:  # the groups come from the grouping stage's probe, and stay unverified until compare tests them
        tags["mtl.task_groups_source"] = "auto"
    # named and tagged by its method, so that the runs of a sweep (`dvc exp run --queue -S
    # train.weighting=equal,famo`) line up in the MLflow UI's compare view
    fp = checkpoint.fingerprint(cfg, paths, None)
    new_run = partial(_record_new_run, cfg, paths, tags)
    with training_run(folder, fp, experiment_id=exp_id, run_name=run_name(cfg), fresh=fresh, on_new=new_run) as (run, resume):
        write_run_info(paths, run.info.run_id, exp_id)
        fail_orphan_runs(exp_id, "train", keep=recorded_run_ids(checkpoint.checkpoints_root(root)))
        if not cfg.model.task_groups:
            result = fit(jobs[0].cfg, paths, jobs[0].tasks, jobs[0].files, resume=resume)
        else:
            result = _fit_groups(cfg, paths, tasks, jobs, run.info.run_id, fresh)
    checkpoint.remove(folder / checkpoint.LAST)  # finished: nothing left to resume
    return result


def _record_new_run(cfg: PipelineConfig, paths: ProjectPaths, tags: dict[str, str]) -> None:
    record_new_run(cfg, paths.root, tags)
    log_training_data(cfg, paths)


def _fit_groups(cfg: PipelineConfig, paths: ProjectPaths, tasks: TaskSpec, jobs: list[FitJob], parent: str, fresh: bool) -> FitResult:
    """Each group's job in a nested run of the model's run, then the grouped model from the members."""
    for i, job in enumerate(jobs):
        fp = checkpoint.fingerprint(job.cfg, paths, job.label_columns)
        with training_run(job.files.resume.parent, fp, run_name=job.name, nested=True, fresh=fresh) as (_, resume):
            mlflow.set_tags({"mtl.kind": "task_group", "mtl.group": ",".join(job.tasks.names), "mtl.parent_run": parent})
            log.info("task group %d/%d: %s", i + 1, len(jobs), ", ".join(job.tasks.names))
            fit(job.cfg, paths, job.tasks, job.files, label_columns=job.label_columns, resume=resume)
    groups = [job.tasks.names for job in jobs]
    summary = assemble_groups(cfg, paths, tasks, groups, [job.files for job in jobs], MlflowSink())
    best_epoch = max(summary["best_epoch"].values())
    return FitResult(parent, best_epoch, summary["best_val_mean_accuracy"], summary["images_per_second"])
