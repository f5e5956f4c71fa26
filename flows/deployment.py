"""The scheduled retraining deployment of the pipeline flow.

Schedule and name come from params.yaml (`schedule:`). Serve it with

    uv run python -m flows.deployment

which registers the deployment with the Prefect API (PREFECT_API_URL, e.g. a `prefect server start`)
and runs the flow on its cron schedule until stopped. prefect.yaml registers the same flow for a worker
of a process work pool instead (README, "Prefect: scheduled retraining").
"""

from __future__ import annotations

import flows  # noqa: F401  (offline Prefect settings, before Prefect is imported)

from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment

from flows.pipeline import PROJECT_ROOT, mtl_pipeline
from mtl_core.config import load_config


def build_deployment(project_dir: Path = PROJECT_ROOT) -> RunnerDeployment:
    cfg = load_config(project_dir / "params.yaml").schedule
    return mtl_pipeline.to_deployment(
        name=cfg.deployment,
        schedule=CronSchedule(cron=cfg.cron, timezone=cfg.timezone),
        parameters={"project_dir": str(project_dir)},
        tags=["mtl-pipeline", "retrain"],
        # one run at a time: a run due while the last one still runs is cancelled, not started beside it
        # (two `dvc repro` in one checkout fight over its lock and outputs)
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description="Retrain, evaluate and register the multi-task model on a timetable.",
    )


if __name__ == "__main__":
    serve(build_deployment())
