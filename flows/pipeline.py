"""The pipeline as a Prefect flow: one task per DVC stage (the single-task comparison included).

Each task runs its stage through DVC (`dvc repro --single-item <stage>`), so a flow run and `dvc repro`
share one record of what has been computed (dvc.lock and the DVC cache): an unchanged stage is skipped
by either (here: task state `Skipped`), and `dvc status` is clean after either. The stage's output goes
to the run log line by line while it runs, its warnings and errors at their own level.

After the stages, the run records its result as a revision (`revision:` in params.yaml; a git commit on
a branch, or a DVC experiment), pushed with its data and models where remotes are configured
(mtl_core/revisions.py); the model's MLflow run and registered version get the revision and this flow
run's id and URL as tags, and the flow run links to them (link artifacts) beside its table of results.
"""

from __future__ import annotations

import flows  # noqa: F401  (offline Prefect settings, before Prefect is imported)

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, State

from mtl_core.config import load_config
from mtl_core.pipeline import STAGES
from mtl_core.stopping import parent_death_signal
from mtl_core.tracking.store import check_store, tracking_uri

PROJECT_ROOT = Path(__file__).resolve().parents[1]
METRICS_ARTIFACT_KEY = "per-task-test-metrics"
MLFLOW_RUN_ARTIFACT_KEY = "mlflow-run"
MLFLOW_VERSION_ARTIFACT_KEY = "mlflow-model-version"


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


# A stage's log line (`<date> <time> WARNING <logger>: ...`, mtl_core/cli.py when not on a terminal) and
# DVC's own (`WARNING: ...`, `ERROR: ...`) at their level in the run log, so that the Prefect UI's level
# filter ("warning and above") shows the pipeline's warnings.
_LEVELS = {"WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
_LEVEL_WORD = re.compile(r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ )?(WARNING|ERROR|CRITICAL)\b:?")


def line_level(line: str) -> int:
    """The logging level of one line of a stage's output: its own for a warning or an error, else INFO."""
    match = _LEVEL_WORD.match(line.strip())
    return _LEVELS[match.group(1)] if match else logging.INFO


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
            logger.log(line_level(line), line)
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


DELTA_M_ROW = "Δm: mean difference over tasks"


def metrics_table(test_metrics: dict, comparison: dict) -> list[dict[str, object]]:
    """The rows of the flow run's table artifact: per task its test metrics and, when the model was compared
    with single-task models, the single-task value of the primary metric, the difference in % and negative
    transfer (and the significance verdict, once the comparison report has one per task); then the mean
    over tasks; then, labelled, Δm."""
    from mtl_core.tracking.views import task_verdict

    rows: list[dict[str, object]] = [
        {"task": t, **{m: round(v, 4) for m, v in vs.items()}} for t, vs in test_metrics["tasks"].items()
    ]
    mean = {"task": "mean over tasks", **{m: round(v, 4) for m, v in test_metrics["mean"].items()}}
    if not comparison.get("enabled"):
        return [*rows, mean]
    m = comparison["primary_metric"]
    for row in rows:
        task = str(row["task"])
        vs = comparison["tasks"][task].get(m)
        if not isinstance(vs, dict):  # auroc / average_precision: a task with more than two classes has none
            continue
        row[f"single_task_{m}"] = round(vs["stl"], 4)
        row["difference_pct"] = round(vs["relative_pct"], 2)
        row["negative_transfer"] = task in comparison["negative_transfer"]
        if (verdict := task_verdict(comparison, task)) is not None:
            row["significance"] = verdict
    delta = {"task": f"{DELTA_M_ROW} ({m}, %)", "difference_pct": round(comparison["delta_m_pct"][m], 2)}
    return [*rows, mean, delta]


@task(name="publish-metrics")
def publish_metrics(project_dir: Path) -> list[dict[str, object]]:
    """A table artifact of per-task test metrics (and Δm), shown on the flow run's page in the Prefect UI."""
    test_metrics = json.loads((project_dir / "reports" / "test_metrics.json").read_text())
    comparison = json.loads((project_dir / "reports" / "comparison.json").read_text())
    rows = metrics_table(test_metrics, comparison)
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


@task(name="record-revision", cache_policy=NO_CACHE)
def record_result(project_dir: Path) -> dict[str, str]:
    """The run's result as a revision (commit or DVC experiment), pushed with its data and models; the
    model's MLflow run and version tagged with it and with this flow run; links from this flow run to them.
    A failure here (no git, a remote that refuses) is a warning: the model is trained and registered."""
    from mtl_core.config import load_config
    from mtl_core.revisions import record_revision
    from mtl_core.tracking.runs import tag_run_and_version
    from mtl_core.tracking.store import tracking_uri
    from mtl_core.tracking.views import run_url, ui_base_url, version_url

    logger = get_run_logger()
    cfg = load_config(project_dir / "params.yaml")
    registry = json.loads((project_dir / "reports" / "registry.json").read_text())
    run_info = json.loads((project_dir / "models" / "mlflow_run.json").read_text())
    flow_run_id, flow_run_name, flow_run_url = flow_run.id, flow_run.name, flow_run.ui_url
    message = (
        f"retrain: {registry['model_name']} version {registry['version']} (MLflow run {registry['run_id']})\n\n"
        f"{registry['reason']}.\nPrefect flow run {flow_run_name} ({flow_run_id})" + (f": {flow_run_url}" if flow_run_url else "")
    )
    r = cfg.revision
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    revision = record_revision(
        project_dir, r.record, r.branch, message, r.push, r.git_remote, r.dvc_remote, experiment_name=f"retrain-{stamp}"
    )
    for problem in revision.problems:
        logger.warning("revision: %s", problem)
    if revision.commit:
        logger.info("revision: %s %s (%s); pushed: %s", revision.kind, revision.commit, revision.ref, ", ".join(revision.pushed) or "nothing")
    tags = revision.as_tags()
    tags.update({"prefect.flow_run_id": str(flow_run_id or ""), "prefect.flow_run_name": str(flow_run_name or "")})
    if flow_run_url:
        tags["prefect.flow_run_url"] = flow_run_url
    uri = tracking_uri(cfg, project_dir)
    tag_run_and_version(uri, registry["run_id"], tags, registry["model_name"], registry["version"])
    base = ui_base_url(uri, cfg.mlflow.ui_url)
    create_link_artifact(
        key=MLFLOW_RUN_ARTIFACT_KEY, link=run_url(base, run_info["experiment_id"], registry["run_id"]),
        link_text=f"MLflow run {registry['run_id']}", description="The MLflow run of the model this flow run trained (or kept).",
    )  # fmt: skip
    create_link_artifact(
        key=MLFLOW_VERSION_ARTIFACT_KEY, link=version_url(base, registry["model_name"], registry["version"]),
        link_text=f"{registry['model_name']} version {registry['version']}", description="Its registered model version.",
    )  # fmt: skip
    return tags


@flow(name="mtl-pipeline", log_prints=True)
def mtl_pipeline(project_dir: str = str(PROJECT_ROOT)) -> list[dict[str, object]]:
    """Every stage of dvc.yaml in order, each through DVC; the result recorded as a revision; then the
    per-task metrics published."""
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
    record_result(root)
    return publish_metrics(root)


if __name__ == "__main__":
    mtl_pipeline()
