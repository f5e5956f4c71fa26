"""The pipeline as a Prefect flow: one task per DVC stage (the single-task comparison included).

Each task runs its stage through DVC (`dvc repro --single-item <stage>`), so a flow run and `dvc repro`
share one record of what has been computed (dvc.lock and the DVC cache): an unchanged stage is skipped
by either (here: task state `Skipped`), and `dvc status` is clean after either. The stage's output goes
to the run log line by line while it runs.
"""

from __future__ import annotations

import flows  # noqa: F401  (offline Prefect settings, before Prefect is imported)

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from mtl_core.config import load_config
from mtl_core.pipeline import STAGES
from mtl_core.stopping import parent_death_signal
from mtl_core.tracking.store import check_store, tracking_uri

PROJECT_ROOT = Path(__file__).resolve().parents[1]
METRICS_ARTIFACT_KEY = "per-task-test-metrics"


def _stage_env() -> dict[str, str]:
    """The stage commands (`mtl ...`) live next to this interpreter: put them first on PATH. Unbuffered,
    so that each line a stage prints reaches the pipe, and the run log, when it is printed."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


# What `dvc repro` prints for a stage it does not run: up to date (dvc.lock matches), or restored from
# DVC's run cache (this same code, params and data ran before).
_UP_TO_DATE = "didn't change, skipping"
_RESTORED = "is cached - skipping run"
SKIPPED = "Skipped"
"""The state name of a stage task that DVC did not run (state type COMPLETED, like Prefect's Cached)."""


def run_dvc_stage(stage: str, project_dir: Path) -> State:
    """`dvc repro --single-item <stage>`, each output line logged as the stage prints it (a long training
    shows its epochs live in the Prefect UI); a stage DVC skipped ends in state `Skipped`."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    logger.info("running %s in %s", " ".join(cmd[2:]), project_dir)
    # SIGTERM to `dvc repro` when this flow run's process ends (cancelled, stopped): DVC does not forward
    # it, and the stage it runs stops with DVC (mtl_core.stopping), its workers with it
    proc = subprocess.Popen(
        cmd, cwd=project_dir, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", bufsize=1, preexec_fn=parent_death_signal if sys.platform == "linux" else None,
    )  # fmt: skip
    skipped = None
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            line = line.rstrip()
            if not line.strip():
                continue
            logger.info(line)
            if _UP_TO_DATE in line:
                skipped = "DVC: the stage is up to date (dvc.lock), not run"
            elif _RESTORED in line:
                skipped = "DVC: the stage ran before with these deps and params; outputs restored from the run cache"
    returncode = proc.wait()
    if returncode != 0:
        raise RuntimeError(f"stage {stage!r} failed (dvc exit code {returncode}); see the log above")
    if skipped:
        logger.info("stage %s skipped: %s", stage, skipped)
        return Completed(name=SKIPPED, message=skipped)
    return Completed(message=f"stage {stage} ran")


# Retries where a failure can be transient: reading the data source (network storage) and talking to the
# MLflow tracking server; and the training stages once, for a crash or a preemption: the retry resumes
# from the last checkpoint (training/checkpoint.py), so it costs only the work since then. A failed
# preprocess is a bug or bad data, and is not retried.
_RETRIES = {"ingest": 2, "train": 1, "baselines": 1, "all_in_one": 1, "evaluate": 2, "register": 3, "compare": 2}


def stage_task(name: str) -> Task[[str, Path], State]:
    """The Prefect task of one stage. No Prefect cache: DVC alone decides whether a stage runs."""
    return task(
        name=name, retries=_RETRIES.get(name, 0), retry_delay_seconds=10, log_prints=True, cache_policy=NO_CACHE
    )(run_dvc_stage)


stage_tasks = {name: stage_task(name) for name in STAGES}


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
            vs = comparison["tasks"][row["task"]].get(m)
            if vs is None:  # auroc / average_precision: a task with more than two classes has none
                continue
            row[f"single_task_{m}"] = round(vs["stl"], 4)
            row["relative_pct"] = round(vs["relative_pct"], 2)
            if "verdicts" in comparison:  # significant or not: a paired bootstrap over the test images
                row["verdict"] = comparison["verdicts"][row["task"]]["verdict"]
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
    # the MLflow store answers and can be written, or the flow fails now with one line (not after ingest,
    # preprocess and a training have run, at the first stage that logs)
    check_store(tracking_uri(load_config(root / "params.yaml"), root))
    skipped = []
    for name in STAGES:
        state = stage_tasks[name](name, root, return_state=True)
        state.result()  # a failed stage (after its retries) fails the flow here
        if state.name == SKIPPED:
            skipped.append(name)
    get_run_logger().info(
        "stages run: %s; skipped by DVC (up to date): %s",
        ", ".join(n for n in STAGES if n not in skipped) or "none", ", ".join(skipped) or "none",
    )
    return publish_metrics(root)


if __name__ == "__main__":
    mtl_pipeline()
