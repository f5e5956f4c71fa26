"""The pipeline as a Prefect flow: one task per DVC stage (the single-task comparison included).

Each task runs its stage through DVC (`dvc repro --single-item <stage>`), so a flow run and `dvc repro`
share one record of what has been computed (dvc.lock and the DVC cache): an unchanged stage is skipped
by either, and `dvc status` is clean after either.
"""

from __future__ import annotations

import flows  # noqa: F401  (offline Prefect settings, before Prefect is imported)

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from mtl_core.pipeline import STAGES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
METRICS_ARTIFACT_KEY = "per-task-test-metrics"


def _stage_env() -> dict[str, str]:
    """The stage commands (`mtl ...`) live next to this interpreter: put them first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_dvc_stage(stage: str, project_dir: Path) -> str:
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    logger.info("running %s in %s", " ".join(cmd[2:]), project_dir)
    proc = subprocess.run(cmd, cwd=project_dir, env=_stage_env(), capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage!r} failed (dvc exit code {proc.returncode}); see the log above")
    return proc.stdout


# Retries where a failure can be transient: reading the data source (network storage) and talking to the
# MLflow tracking server; and the training stages once, for a crash or a preemption: the retry resumes
# from the last checkpoint (training/checkpoint.py), so it costs only the work since then. A failed
# preprocess is a bug or bad data, and is not retried.
_RETRIES = {"ingest": 2, "train": 1, "baselines": 1, "all_in_one": 1, "evaluate": 2, "register": 3, "compare": 2}

stage_tasks = {
    name: task(name=name, retries=_RETRIES.get(name, 0), retry_delay_seconds=10, log_prints=True)(run_dvc_stage)
    for name in STAGES
}


@task(name="publish-metrics")
def publish_metrics(project_dir: Path) -> list[dict[str, object]]:
    """A table artifact of per-task test metrics, shown on the flow run's page in the Prefect UI."""
    metrics = json.loads((project_dir / "reports" / "test_metrics.json").read_text())
    rows = [{"task": t, **{m: round(v, 4) for m, v in vs.items()}} for t, vs in metrics["tasks"].items()]
    rows.append({"task": "mean over tasks", **{m: round(v, 4) for m, v in metrics["mean"].items()}})
    comparison = json.loads((project_dir / "reports" / "comparison.json").read_text())
    if comparison.get("enabled"):
        m = comparison["primary_metric"]
        for row in rows[:-1]:
            vs = comparison["tasks"][row["task"]][m]
            row[f"single_task_{m}"] = round(vs["stl"], 4)
            row["relative_pct"] = round(vs["relative_pct"], 2)
            row["negative_transfer"] = row["task"] in comparison["negative_transfer"]
        rows[-1]["relative_pct"] = round(comparison["delta_m_pct"][m], 2)  # Δm
    registry = json.loads((project_dir / "reports" / "registry.json").read_text())
    champion = f"version {registry['champion_version']}" if registry.get("champion_version") else "none yet"
    create_table_artifact(
        key=METRICS_ARTIFACT_KEY,
        table=rows,
        description=(
            f"Test metrics of {registry['model_name']} version {registry['version']} "
            f"(champion: {champion}). {registry['reason']}."
        ),
    )
    return rows


@flow(name="mtl-pipeline", log_prints=True)
def mtl_pipeline(project_dir: str = str(PROJECT_ROOT)) -> list[dict[str, object]]:
    """Every stage of dvc.yaml in order, each through DVC, then publish the per-task metrics."""
    root = Path(project_dir).resolve()
    for name in STAGES:
        stage_tasks[name](name, root)
    return publish_metrics(root)


if __name__ == "__main__":
    mtl_pipeline()
