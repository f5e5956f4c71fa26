"""The Prefect files a user runs commands with: prefect.yaml (the work-pool deployment) agrees with
params.yaml and the flow, and prefect.toml turns analytics and telemetry off for every `prefect ...`
command started in the project, `prefect server start` included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "False",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "False",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "False",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "False",
}


def test_prefect_yaml_deploys_the_flow_on_the_params_schedule():
    """One schedule in two files (serve reads params.yaml, `prefect deploy` prefect.yaml): they must not drift."""
    project = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (deployment,) = project["deployments"]
    schedule = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["schedule"]
    assert [(s["cron"], s["timezone"]) for s in deployment["schedules"]] == [(schedule["cron"], schedule["timezone"])]
    assert deployment["name"] != schedule["deployment"]  # registering one must not replace the other
    path, func = deployment["entrypoint"].split(":")
    from flows import pipeline

    assert Path(pipeline.__file__).resolve() == (REPO_ROOT / path).resolve() and getattr(pipeline, func) is pipeline.mtl_pipeline
    assert project["pull"] == [{"flows.steps.enter_project": {"directory": "{{ $MTL_PROJECT_DIR }}"}}]
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


def test_the_pull_step_enters_a_checkout_and_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from flows.steps import enter_project

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"MTL_PROJECT_DIR is not set.*prefect worker start"):
        enter_project("")  # what `{{ $MTL_PROJECT_DIR }}` becomes when the variable is not set
    with pytest.raises(ValueError, match="not an mtl-pipeline checkout"):
        enter_project(str(tmp_path))
    assert enter_project(str(REPO_ROOT)) == {"directory": str(REPO_ROOT)}
    assert Path.cwd() == REPO_ROOT


def test_prefect_toml_turns_telemetry_off_for_prefect_commands_in_the_project(tmp_path: Path):
    """`prefect config view` as a user's shell runs it in the project (no PREFECT_* variables, no
    DO_NOT_TRACK): each setting off, from prefect.toml; flows/__init__.py sets the same defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no user profile in the way
    prefect = str(Path(sys.executable).parent / "prefect")
    shown = subprocess.run([prefect, "config", "view", "--show-sources"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for key, value in TELEMETRY_OFF.items():
        assert re.search(rf"^{key}='{value}' \(from prefect.toml\)$", shown.stdout, re.M), shown.stdout
    source = (REPO_ROOT / "flows" / "__init__.py").read_text()
    for key, value in TELEMETRY_OFF.items():
        assert f'"{key}": "{value.lower()}"' in source, key
