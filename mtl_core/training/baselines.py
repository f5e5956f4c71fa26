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
from typing import TYPE_CHECKING, Any

from mtl_core.config import PipelineConfig
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import TaskSpec

if TYPE_CHECKING:
    from mtl_core.training.batch_cache import BatchCache
    from mtl_core.training.runs import Resume

# torch, torchmetrics and MLflow are imported where a model is trained: the disabled stage (the
# default, `compare.single_task: false`) runs in every `dvc repro` and so starts in ~3 s, not ~10 s

log = logging.getLogger(__name__)


def fit_and_score(
    cfg: PipelineConfig, paths: ProjectPaths, tasks: TaskSpec, folder: Path, label_columns: list[int] | None = None,
    resume: Resume | None = None, resume_dir: Path | None = None, batches: BatchCache | None = None,
) -> dict[str, dict[str, float]]:
    """Train a model on `tasks` (label columns `label_columns` of the cache) into `folder` inside the
    active MLflow run, then score its best weights on the test split: per-task metrics. `resume_dir`:
    where its checkpoints go (none without), `resume`: the state to continue (training.runs);
    `batches`: the training batches shared with the other baselines (training.batch_cache)."""
    from mtl_core.evaluation.evaluate import make_test_loader, score
    from mtl_core.models.io import load_model
    from mtl_core.runtime import select_device
    from mtl_core.training import checkpoint
    from mtl_core.training.train import ModelFiles, fit

    files = ModelFiles.in_folder(folder, resume_dir / checkpoint.LAST if resume_dir is not None else None)
    fit(cfg, paths, tasks, files, label_columns=label_columns, resume=resume, batches=batches)
    device = select_device(cfg.train.device)
    model, _ = load_model(folder / "model_spec.json", folder / "model.safetensors", device)
    per_task, *_ = score(model, make_test_loader(cfg, paths, label_columns), device, cfg.train.amp)
    return per_task


def training_cost(folder: Path) -> dict[str, float]:
    """Training seconds and parameter count of a model fitted into `folder` (its train_metrics.json)."""
    summary = json.loads((folder / "train_metrics.json").read_text())
    return {"train_seconds": summary["train_seconds"], "parameters": summary["parameters"]}


def single_task_config(cfg: PipelineConfig) -> PipelineConfig:
    """The plain single-task network of `cfg`: same backbone and budget, hard sharing, plain training."""
    model = cfg.model.model_copy(update={"arch": "hard_sharing", "arch_options": {}, "task_groups": None})
    train = cfg.train.model_copy(update={"weighting": "equal", "weighting_options": {}})
    return cfg.model_copy(update={"model": model, "train": train})


def stage_fits(cfg: PipelineConfig, tasks: TaskSpec) -> list[tuple[PipelineConfig, TaskSpec, list[int] | None, bool]]:
    """The `fit` calls `run_baselines` makes, in order (mirrored by the other ranks: training.ddp)."""
    if not cfg.compare.single_task:
        return []
    single = single_task_config(cfg)
    return [(single, TaskSpec({t: tasks.classes[t]}), [k], False) for k, t in enumerate(tasks.names)]


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
        log.info("baselines: compare.single_task is false; no single-task model trained")
        return report

    import mlflow

    from mtl_core.tracking import git_commit, ingested_data_hash, run_name, setup_mlflow
    from mtl_core.training import checkpoint
    from mtl_core.training.batch_cache import BatchCache
    from mtl_core.training.runs import fail_orphan_runs, recorded_run_ids, training_run
    from mtl_core.training.train import log_config_params

    tasks = TaskSpec.load(paths.tasks_file)
    exp_id = setup_mlflow(cfg, root)
    single_cfg = single_task_config(cfg)
    results: dict[str, dict[str, float]] = {}
    runs: dict[str, str] = {}
    cost = {"train_seconds": 0.0, "parameters": 0}
    resume_root = checkpoint.checkpoints_root(root) / "baselines"
    fail_orphan_runs(exp_id, "baselines", keep=recorded_run_ids(resume_root))
    # the tasks' trainings differ only in their label column: the first records its augmented batches,
    # the others replay them (same bytes, so the same weights as separate trainings)
    batches = BatchCache(resume_root.with_name("baselines.batches"), checkpoint.fingerprint(single_cfg, paths, None)) if cfg.compare.shared_input else None
    for k, task in enumerate(tasks.names):
        resume_dir = resume_root / task
        fp = checkpoint.fingerprint(single_cfg, paths, [k])
        with training_run(resume_dir, fp, experiment_id=exp_id, run_name=run_name(cfg, "stl", task), fresh=fresh) as (run, resume):
            if not resume.resumed:
                log_config_params(single_cfg)
                tags = {"mtl.stage": "baselines", "mtl.kind": "single_task_baseline", "mtl.task": task, **ingested_data_hash(root)}
                if commit := git_commit(root):
                    tags["git_commit"] = commit
                mlflow.set_tags(tags)
            single = TaskSpec({task: tasks.classes[task]})
            seen = len(batches.events) if batches is not None else 0
            results[task] = fit_and_score(single_cfg, paths, single, paths.single_task_dir / task, [k], resume, resume_dir, batches)[task]
            if batches is not None:  # how its training got its batches (compare.shared_input)
                mlflow.set_tag("mtl.input_batches", batches.summary(seen))
            mlflow.log_metrics({f"test/{task}/{m}": v for m, v in results[task].items() if m != "support"})
            runs[task] = run.info.run_id
        for key, value in training_cost(paths.single_task_dir / task).items():
            cost[key] += value
        log.info("baseline %s: test accuracy %.3f", task, results[task]["accuracy"])
    report = {"enabled": True, "tasks": results, "runs": runs, "cost": cost}
    paths.single_task_metrics.write_text(json.dumps(report, indent=2) + "\n")
    checkpoint.remove(resume_root / "any")  # all finished: nothing left to resume
    if batches is not None:
        batches.remove()
    return report

