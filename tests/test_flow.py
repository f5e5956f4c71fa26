"""The Prefect flow: same outputs as `dvc repro`, one record (dvc status clean), a metrics artifact; a
train task killed in the middle (a real SIGKILL) is retried, and the retry resumes its checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import copy_working_tree, stage_env, write_params

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from flows.pipeline import METRICS_ARTIFACT_KEY, mtl_pipeline
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    rows = mtl_pipeline(project_dir=sys.argv[1])
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[METRICS_ARTIFACT_KEY])),
            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), sort=ArtifactSort.UPDATED_DESC,
            offset=0, limit=1,
        )
    print("RESULT " + json.dumps({"rows": rows, "artifact_type": artifact.type, "artifact": artifact.data}))
    """
)


def test_flow_runs_the_stages_through_dvc(tmp_path: Path):
    clone = copy_working_tree(tmp_path / "repo")
    write_params(clone, {"train": {"checkpoint_every_steps": 2}})
    env = stage_env(clone)
    fired = tmp_path / "fault-fired"
    env.update(MTL_FAULT="train.after_step:9", MTL_FAULT_ONCE=str(fired))  # epoch 2 of 2, step 3 of 6
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(clone)], cwd=clone, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert fired.is_file(), "the train stage was killed once"
    log = proc.stdout + proc.stderr
    assert "Task run 'train" in log and "Retry" in log, log[-6000:]
    assert "train: resuming MLflow run" in log and "epoch 2, step 2 of it" in log, log[-6000:]
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))

    metrics = json.loads((clone / "reports" / "test_metrics.json").read_text())
    assert [r["task"] for r in result["rows"]] == [*metrics["tasks"], "mean over tasks"]
    assert result["rows"][0]["accuracy"] == pytest.approx(metrics["tasks"]["shape"]["accuracy"], abs=1e-4)
    assert result["artifact_type"] == "table"
    table = json.loads(result["artifact"]) if isinstance(result["artifact"], str) else result["artifact"]
    assert [r["task"] for r in table] == [r["task"] for r in result["rows"]]
    assert json.loads((clone / "reports" / "registry.json").read_text())["champion_version"] == "1"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mtl-pipeline").experiment_id], "tags.`mtl.stage` = 'train'")
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed attempt's run, resumed and finished
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val/mean/accuracy")) == [1, 2]

    # one record of what was computed: DVC sees nothing left to do after the flow
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
