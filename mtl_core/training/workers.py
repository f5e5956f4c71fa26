"""What the ranks other than 0 of a distributed training stage run: the stage's plan (training.plan).

Rank 0 runs the stage function, which executes the plan with MLflow runs, checkpoints, reports and
files; every other rank executes the same `FitJob`s with `fit` and writes nothing, taking part in every
collective in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mtl_core import runtime
from mtl_core.config import PipelineConfig
from mtl_core.paths import ProjectPaths
from mtl_core.training.engine import fit
from mtl_core.training.plan import FitJob
from mtl_core.training.checkpoint import Resume

Plan = Callable[[PipelineConfig, ProjectPaths], list[FitJob]]
"""A training stage's `plan(cfg, paths)`."""


def run_worker_jobs(jobs: Sequence[FitJob], paths: ProjectPaths) -> None:
    """A rank other than 0: take part in every `fit` of the plan, in order (`fit` writes and reports on
    rank 0 only; rank 0's resume state is broadcast, so an empty one here is filled in)."""
    for job in jobs:
        fit(job.cfg, paths, job.tasks, job.files, label_columns=job.label_columns, resume=Resume({}))


def run_distributed_stage(cfg: PipelineConfig, root: Path, fresh: bool, stage: Callable[..., Any], plan: Plan) -> Any:
    """One torchrun worker: join the process group; rank 0 runs the stage function, the others its plan."""
    dist = runtime.init_distributed(cfg.train.device, cfg.train.distributed.backend)
    try:
        if dist.is_main:
            return stage(cfg, root, fresh=True) if fresh else stage(cfg, root)
        paths = ProjectPaths(root)
        return run_worker_jobs(plan(cfg, paths), paths)
    finally:
        runtime.shutdown_distributed()
