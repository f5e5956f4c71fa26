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
