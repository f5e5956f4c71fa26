"""A training stage's plan: the list of `fit`s it makes (`FitJob`), described once.

Each training stage (train, the task groups, baselines, all_in_one) builds its plan with a `plan(cfg,
paths)` function next to the stage function; the stage function executes that list on rank 0 (opening
an MLflow run per job, reporting after it), and every other rank of a distributed run executes the same
list (training.workers), so the order of collective calls has one source and a rank cannot fall out of
step with the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtl_core.config import PipelineConfig
from mtl_core.tasks import TaskSpec
from mtl_core.training.model_files import ModelFiles


@dataclass(frozen=True)
class FitJob:
    """One `fit` of a training stage: train `cfg`'s model on `tasks` (label columns `label_columns` of
    the cache; None: all) into `files`. `name`: what it trains, for the log and its MLflow run."""

    name: str
    cfg: PipelineConfig
    tasks: TaskSpec
    label_columns: list[int] | None
    files: ModelFiles
