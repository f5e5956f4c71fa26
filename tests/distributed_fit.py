"""Fit one model per weighting method on a prepared project, as a torchrun worker or in one process.

`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_fit.py ROOT OUT
METHOD...` (tests/test_distributed.py): every rank calls the train stage's `fit` for each method; rank 0
writes OUT/<method>/ (weights, history, task-gradient cosines) inside an MLflow run of its own store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from mtl_core import runtime
from mtl_core.config import load_config
from mtl_core.paths import ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.training.checkpoint import Resume
from mtl_core.training.engine import fit
from mtl_core.training.model_files import ModelFiles


def fit_methods(root: Path, out: Path, methods: list[str]) -> None:
    dist = runtime.distributed()
    base = load_config(root / "params.yaml")
    paths = ProjectPaths(root)
    tasks = TaskSpec.load(paths.tasks_file)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
        # artifacts beside the store (the default, ./mlruns, would be the current folder)
        experiment = mlflow.create_experiment("distributed-fit", artifact_location=(out / "artifacts").as_uri())
    for method in methods:
        cfg = base.model_copy(update={"train": base.train.model_copy(update={"weighting": method})})
        folder = out / method
        files = ModelFiles(**{**ModelFiles.in_folder(folder).__dict__, "gradient_cosine": folder / "task_gradient_cosine.json"})
        if dist.is_main:
            with mlflow.start_run(experiment_id=experiment, run_name=method):
                fit(cfg, paths, tasks, files, resume=Resume({}))
        else:
            fit(cfg, paths, tasks, files, resume=Resume({}))


if __name__ == "__main__":
    runtime.init_distributed("cpu")
    try:
        fit_methods(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
    finally:
        runtime.shutdown_distributed()
