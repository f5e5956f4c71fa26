"""The scheduled deployment, registered with a real local Prefect server and read back."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, stage_env

pytestmark = pytest.mark.e2e

APPLY_AND_READ = textwrap.dedent(
    """
    import json
    from flows.deployment import build_deployment
    from prefect.client.orchestration import get_client

    deployment_id = build_deployment().apply()
    with get_client(sync_client=True) as client:
        d = client.read_deployment(deployment_id)
        flow = client.read_flow(d.flow_id)
        print("RESULT " + json.dumps({
            "name": f"{flow.name}/{d.name}",
            "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active} for s in d.schedules],
            "parameters": d.parameters,
        }))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path: Path):
    port = _free_port()
    env = stage_env(tmp_path)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Prefect server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield url, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_deployment_schedule_round_trips_through_the_server(prefect_server):
    url, env = prefect_server
    env = {**env, "PREFECT_API_URL": url}
    proc = subprocess.run(
        [sys.executable, "-c", APPLY_AND_READ], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    schedule = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["schedule"]
    assert result["name"] == f"mtl-pipeline/{schedule['deployment']}"
    assert result["schedules"] == [{"cron": schedule["cron"], "timezone": schedule["timezone"], "active": True}]
    assert result["parameters"] == {"project_dir": str(REPO_ROOT)}


def _flow_runs(url: str, deployment: str) -> list[dict]:
    """The flow runs of `deployment`, read from the server's REST API."""
    body = json.dumps({"deployments": {"name": {"any_": [deployment]}}}).encode()
    request = urllib.request.Request(f"{url}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.timeout(600)
def test_a_served_deployment_runs_its_scheduled_flow_to_completion(prefect_server, tmp_path: Path):
    """What a user does: `python -m flows.deployment` against a server, with a schedule due within a
    minute; the server's scheduler creates the run, the served deployment picks it up and runs the
    pipeline, and `prefect deployment ls` / `prefect flow-run ls` show both."""
    from tests.conftest import copy_working_tree, write_params

    url, env = prefect_server
    env = {**env, "PREFECT_API_URL": url}
    clone = copy_working_tree(tmp_path / "repo")
    write_params(clone, {"train": {"epochs": 1, "task_affinity_every": 0},
                         "schedule": {"deployment": "every-minute", "cron": "* * * * *"}})  # fmt: skip
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "flows.deployment"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, runs = time.monotonic() + 480, []
        while time.monotonic() < deadline:
            runs = _flow_runs(url, "every-minute")
            if any(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs):
                break
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            time.sleep(5)
        done = [r for r in runs if r["state"]["type"] == "COMPLETED"]
        assert done, [(r["name"], r["state"]["type"]) for r in runs] + [(tmp_path / "serve.log").read_text()[-4000:]]
        run = done[0]
        assert run["auto_scheduled"] is True  # made by the server's scheduler, not by hand
        assert run["expected_start_time"].split(":")[-1].startswith("00")  # on a minute of the cron
        registry = json.loads((clone / "reports" / "registry.json").read_text())
        assert registry["version"] == "1"  # the pipeline ran to its last stage

        prefect, wide = str(Path(sys.executable).parent / "prefect"), {**env, "COLUMNS": "250"}  # no cut names
        listed = subprocess.run([prefect, "deployment", "ls"], env=wide, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0 and "mtl-pipeline/every-minute" in listed.stdout, listed.stdout + listed.stderr
        flow_runs = subprocess.run(
            [prefect, "flow-run", "ls", "--state-type", "COMPLETED", "-o", "json"], env=wide, capture_output=True, text=True, timeout=120
        )
        assert flow_runs.returncode == 0, flow_runs.stdout + flow_runs.stderr
        assert run["id"] in [r["id"] for r in json.loads(flow_runs.stdout)]
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()
