"""Prefect on a real local server (127.0.0.1, one per module): the scheduled deployment served and read
back, its scheduled run retrying a killed stage that resumes its checkpoint; the prefect.yaml deployment run by a worker of a process work pool; a flow run's log, streamed
line by line while a stage runs, and a stage DVC skipped shown as `Skipped`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, copy_working_tree, stage_env, stop_process, write_params

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
            "concurrency": [d.global_concurrency_limit.limit, str(d.concurrency_options.collision_strategy.value)],
        }))
    """
)


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
    assert result["concurrency"] == [1, "CANCEL_NEW"]  # no second run beside a running one


def _post(url: str, endpoint: str, body: dict) -> list[dict]:
    """A filter query of the server's REST API."""
    request = urllib.request.Request(
        f"{url}{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _flow_runs(url: str, deployment: str) -> list[dict]:
    """The flow runs of `deployment`, read from the server's REST API."""
    return _post(url, "/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}})


_ACTIVE = ("PENDING", "RUNNING")


def _write_atomically(path: Path, text: str) -> None:
    """Replace a file in one step: a run that reads it meanwhile sees the old file or the new, whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What a user does: `python -m flows.deployment` against a server, with a schedule of every minute, in a
    checkout with a git remote (a local bare repository) and a DVC remote (a local folder), until the
    server's scheduler has made two runs and the served deployment has run the pipeline with each: a
    month of Mondays, with `train.seed` changed between the two, as new data would change the model.
    In the first run the train stage is killed once in the middle (a real SIGKILL, epoch 2 of 2, step 3
    of 6), so it shows a stage retried by Prefect and resumed from its checkpoint. Then the deployment is
    paused and the server drained of its runs before serve stops, so no run of it is left running in the
    clone, which the worker test reuses (its pipeline then has little to do)."""
    url, env = prefect_server
    tmp_path = tmp_path_factory.mktemp("served")
    fired = tmp_path / "fault-fired"
    env = {**env, "PREFECT_API_URL": url, "MTL_FAULT": "train.after_step:9", "MTL_FAULT_ONCE": str(fired)}
    clone = copy_working_tree(tmp_path / "repo")
    bare, storage = tmp_path / "remote.git", tmp_path / "dvc-storage"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(bare)], cwd=clone, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", str(storage)], cwd=clone, env=stage_env(clone), check=True)
    write_params(clone, {"train": {"epochs": 2, "task_affinity_every": 0, "checkpoint_every_steps": 2},
                         "schedule": {"deployment": "every-minute", "cron": "* * * * *"}})  # fmt: skip
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    serve = subprocess.Popen([sys.executable, "-m", "flows.deployment"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    start, seconds = time.monotonic(), []
    try:
        deadline, runs, done = time.monotonic() + 780, [], []
        while time.monotonic() < deadline and len(done) < 2:
            runs = _flow_runs(url, "every-minute")
            finished = [r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]
            if any(r["state"]["type"] != "COMPLETED" for r in finished):
                break
            if len(finished) > len(done):
                done = sorted(finished, key=lambda r: r["expected_start_time"])
                seconds.append(time.monotonic() - start)
                if len(done) == 1:  # before the next run's train stage reads it (the next minute at the soonest)
                    params = yaml.safe_load((clone / "params.yaml").read_text())
                    params["train"]["seed"] = 1
                    _write_atomically(clone / "params.yaml", yaml.safe_dump(params, sort_keys=False))
            assert serve.poll() is None, log_path.read_text()[-4000:]
            time.sleep(1)
        assert len(done) == 2 and all(r["state"]["type"] == "COMPLETED" for r in done), (
            [(r["name"], r["state"]["type"]) for r in runs] + [log_path.read_text()[-4000:]]
        )
        _patch(url, f"/deployments/{done[0]['deployment_id']}", {"paused": True})
        while any(r["state"]["type"] in _ACTIVE for r in _flow_runs(url, "every-minute")) and time.monotonic() < deadline:
            time.sleep(2)
        # A run is COMPLETED before its process exits (it still sends its last log records), and serve's
        # SIGTERM cancels the run of any flow process it still has, completed or not (seen once: the run
        # ended CANCELLED). So serve is stopped only once its flow processes are gone.
        while _children(serve.pid) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        stop_process(serve)
        log.close()
    print(f"\nserved deployment: scheduled runs completed after {', '.join(f'{s:.0f}' for s in seconds)} s")
    env = {k: v for k, v in env.items() if not k.startswith("MTL_FAULT")}
    return {"clone": clone, "run": done[0], "done": done, "runs": runs, "env": env, "log": log_path, "fired": fired,
            "bare": bare, "storage": storage}  # fmt: skip


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _patch(url: str, endpoint: str, body: dict) -> None:
    request = urllib.request.Request(
        f"{url}{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="PATCH"
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status in (200, 204)


@pytest.mark.timeout(900)  # the fixture's two served runs included
def test_a_served_deployment_runs_its_scheduled_flow_to_completion(served: dict):
    """The scheduled run was made by the server's scheduler and ran the whole pipeline; `prefect
    deployment ls` / `prefect flow-run ls` show both; runs due while one runs are cancelled, not
    started beside it in the same checkout."""
    run, env = served["run"], served["env"]
    assert run["auto_scheduled"] is True  # made by the server's scheduler, not by hand
    assert run["expected_start_time"].split(":")[-1].startswith("00")  # on a minute of the cron
    registry = json.loads((served["clone"] / "reports" / "registry.json").read_text())
    assert registry["version"] == "2"  # each run ran the pipeline to its last stage
    done_ids = {r["id"] for r in served["done"]}
    overlapping = [r for r in served["runs"] if r["state"]["type"] != "SCHEDULED" and r["id"] not in done_ids]
    assert all(r["state"]["type"] == "CANCELLED" for r in overlapping), [(r["name"], r["state"]) for r in overlapping]

    prefect, wide = str(Path(sys.executable).parent / "prefect"), {**env, "COLUMNS": "250"}  # no cut names
    listed = subprocess.run([prefect, "deployment", "ls"], env=wide, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "mtl-pipeline/every-minute" in listed.stdout, listed.stdout + listed.stderr
    flow_runs = subprocess.run(
        [prefect, "flow-run", "ls", "--state-type", "COMPLETED", "-o", "json"], env=wide, capture_output=True, text=True, timeout=120
    )
    assert flow_runs.returncode == 0, flow_runs.stdout + flow_runs.stderr
    completed = _post(env["PREFECT_API_URL"], "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    assert run["id"] in [r["id"] for r in json.loads(flow_runs.stdout)], (flow_runs.stdout, flow_runs.stderr, [(r["id"], r["name"]) for r in completed])


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.timeout(300)
def test_two_scheduled_runs_left_two_revisions_with_their_data_and_models_in_the_remotes(served: dict):
    """Each scheduled run recorded its result as a commit on branch `retrains` (revision: in params.yaml),
    pushed to the git remote (a bare repository) with its dvc.lock, params and metrics, and its data and
    model to the DVC remote (a folder); the MLflow run and the model version of each name that revision and
    the Prefect flow run, whose page links back to the MLflow run."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import MLFLOW_RUN_ARTIFACT_KEY

    bare, storage, clone, url = served["bare"], served["storage"], served["clone"], served["env"]["PREFECT_API_URL"]
    base = _git(clone, "rev-parse", "HEAD")  # the checkout's commit, which the runs leave where it is
    commits = _git(bare, "rev-list", "--first-parent", "refs/heads/retrains").split()
    assert commits[-1] == base and len(commits) == 3, commits  # two retrains on top of the checkout's commit
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mtl-pipeline").experiment_id
    for seed, commit, flow_run in zip((0, 1), reversed(commits[:2]), served["done"], strict=True):
        assert yaml.safe_load(_git(bare, "show", f"{commit}:params.yaml"))["train"]["seed"] == seed
        lock = yaml.safe_load(_git(bare, "show", f"{commit}:dvc.lock"))
        flat = json.loads(_git(bare, "show", f"{commit}:metrics.json"))
        assert 0 <= flat["mean_mtl_balanced_accuracy"] <= 1
        registry = json.loads(_git(bare, "show", f"{commit}:reports/registry.json"))
        assert registry["version"] == str(seed + 1)
        for stage, out in (("train", "models"), ("preprocess", "data/preprocessed")):  # the model and the data
            md5 = next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)
            assert (storage / "files" / "md5" / md5[:2] / md5[2:]).is_file(), (stage, out, md5)
        run = client.get_run(registry["run_id"])
        assert run.data.tags["mtl.stage"] == "train" and run.data.params["train.seed"] == str(seed)
        expected = {"mtl.revision": commit, "mtl.revision_ref": "refs/heads/retrains", "prefect.flow_run_id": flow_run["id"]}
        version = client.get_model_version(registry["model_name"], registry["version"])
        for tags in (run.data.tags, version.tags):
            assert {k: tags.get(k) for k in expected} == expected
            assert tags["prefect.flow_run_url"].endswith(f"/flow-run/{flow_run['id']}")
            assert "DVC remote 'storage'" in tags["mtl.revision_push"] and "git remote 'origin'" in tags["mtl.revision_push"]
        (link,) = _post(url, "/artifacts/filter", {
            "artifacts": {"key": {"any_": [MLFLOW_RUN_ARTIFACT_KEY]}, "flow_run_id": {"any_": [flow_run["id"]]}}, "limit": 5,
        })  # fmt: skip
        assert link["type"] == "markdown" or link["type"] == "link"
        assert f"/#/experiments/{experiment}/runs/{registry['run_id']}" in json.dumps(link["data"])


@pytest.mark.timeout(300)
def test_the_scheduled_run_retries_a_killed_stage_and_leaves_one_record(served: dict):
    """In the scheduled run, the train stage killed in its second epoch was retried by Prefect and
    resumed its checkpoint (one MLflow run, FINISHED, with both epochs); the flow published the per-task
    test metrics as a table artifact; the model is the champion; and DVC has nothing left to do."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import METRICS_ARTIFACT_KEY

    clone, url, run = served["clone"], served["env"]["PREFECT_API_URL"], served["run"]
    assert served["fired"].is_file(), "the train stage was killed once"
    messages = [r["message"] for r in _flow_run_logs_with(url, run["id"], "stages run:")]
    serve_log = served["log"].read_text()
    assert "Task run 'train" in serve_log and "Retry" in serve_log, serve_log[-6000:]
    seen = "\n".join(messages) + serve_log  # the stage's lines, as the server stored them and as serve printed them
    assert "train: resuming MLflow run" in seen and "epoch 2, step 2 of it" in seen, messages[-80:]

    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("mtl-pipeline").experiment_id],
        f"tags.`mtl.stage` = 'train' and tags.`prefect.flow_run_id` = '{run['id']}'",
    )  # fmt: skip
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed attempt's run, resumed and finished
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "by_epoch/val/mean/accuracy")) == [1, 2]
    first = runs[0].data.tags["mtl.revision"]  # what the first run left: its registry report and metrics
    assert json.loads(_git(served["bare"], "show", f"{first}:reports/registry.json"))["champion_version"] == "1"

    (artifact,) = _post(url, "/artifacts/filter", {
        "artifacts": {"key": {"any_": [METRICS_ARTIFACT_KEY]}, "flow_run_id": {"any_": [run["id"]]}}, "limit": 5,
    })  # fmt: skip
    assert artifact["type"] == "table"
    table = json.loads(artifact["data"]) if isinstance(artifact["data"], str) else artifact["data"]
    metrics = json.loads(_git(served["bare"], "show", f"{first}:reports/test_metrics.json"))
    assert [r["task"] for r in table] == [*metrics["tasks"], "mean over tasks"]
    assert table[0]["accuracy"] == pytest.approx(metrics["tasks"]["shape"]["accuracy"], abs=1e-4)

    # one record of what was computed: DVC sees nothing left to do after the flow
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, env=stage_env(clone), capture_output=True, text=True
    )
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr


def _flow_run_logs(url: str, flow_run_id: str) -> list[dict]:
    """Every log record of a flow run (its tasks' included), oldest first, as the server stored them."""
    logs: list[dict] = []
    while True:
        page = _post(url, "/logs/filter", {
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "offset": len(logs), "limit": 200,
        })  # fmt: skip
        logs += page
        if len(page) < 200:
            return logs


def _flow_run_logs_with(url: str, flow_run_id: str, last: str, timeout: float = 60) -> list[dict]:
    """The flow run's log records once the one whose message starts with `last` is stored. A run's state
    is COMPLETED before its process has flushed its last log records to the API (they go in batches, and
    the rest at exit), so records read the moment the state changes may lack the final lines."""
    deadline = time.monotonic() + timeout
    while True:
        logs = _flow_run_logs(url, flow_run_id)
        if any(r["message"].startswith(last) for r in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


def _task_runs(url: str, flow_run_id: str) -> list[dict]:
    return _post(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})


@pytest.mark.timeout(600)  # 50 s, once `served` is set up
def test_a_worker_of_a_process_pool_runs_the_prefect_yaml_deployment(served: dict, tmp_path: Path):
    """The Prefect 3 way, as the README shows it: a process work pool, `prefect deploy --all` from
    prefect.yaml, `prefect worker start` in a checkout (MTL_PROJECT_DIR), `prefect deployment run`. The
    worker runs the flow in that checkout (the served test's, where the pipeline has run: a changed
    `register` param leaves `register` to run and the other stages to DVC's skip) to completion; each
    line of a stage's output is a log record of its own; the skipped stages end in state `Skipped`."""
    clone, url = served["clone"], served["env"]["PREFECT_API_URL"]
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["register"]["min_mean_accuracy"] = 0.01  # a param of `register` only
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**stage_env(clone), "PREFECT_API_URL": url, "COLUMNS": "250"}
    prefect = str(Path(sys.executable).parent / "prefect")

    def cli(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([prefect, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done

    spec = yaml.safe_load((clone / "prefect.yaml").read_text())["deployments"][0]
    pool, name = spec["work_pool"]["name"], f"mtl-pipeline/{spec['name']}"
    cli("work-pool", "create", pool, "--type", "process")
    cli("--no-prompt", "deploy", "--all")
    (deployment,) = _post(url, "/deployments/filter", {"deployments": {"name": {"any_": [spec["name"]]}}})
    assert deployment["work_pool_name"] == pool and deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in deployment["schedules"]] == [("0 3 * * 1", "UTC")]

    log_path = tmp_path / "worker.log"
    log = open(log_path, "w")
    # the worker asks for work every 2 s instead of 10, to keep the test short
    worker_env = {**env, "MTL_PROJECT_DIR": str(clone), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", pool], cwd=clone, env=worker_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        cli("deployment", "run", name)
        deadline, run = time.monotonic() + 300, None
        while time.monotonic() < deadline:  # the run made by hand; the schedule's are next Monday's
            (run,) = [r for r in _flow_runs(url, spec["name"]) if not r["auto_scheduled"]]
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert worker.poll() is None, log_path.read_text()[-4000:]
            time.sleep(2)
        messages = [r["message"] for r in _flow_run_logs_with(url, run["id"], "stages run:")]
        assert run["state"]["type"] == "COMPLETED", (run["state"], messages[-40:], log_path.read_text()[-3000:])
    finally:
        stop_process(worker)
        log.close()
    assert run["work_pool_name"] == pool
    lock = yaml.safe_load((clone / "dvc.lock").read_text())  # it ran in the checkout: register's new param
    assert lock["stages"]["register"]["params"]["params.yaml"]["register"]["min_mean_accuracy"] == 0.01
    # DVC's lines and the stage's own, each its own record (not one block at the end)
    assert "Running stage 'register':" in messages and "> mtl register" in messages, messages[:80]
    assert "Stage 'train' didn't change, skipping" in messages, messages[:80]
    states = {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in _task_runs(url, run["id"])}
    assert states.pop("register") == "Completed" and states.pop("publish-metrics") == "Completed", states
    assert states.pop("record-revision") == "Completed", states
    assert set(states.values()) == {"Skipped"} and len(states) == 8, states
    assert "stages run: register; skipped by DVC (up to date): ingest, preprocess, grouping, train, evaluate, baselines, all_in_one, compare" in messages


# A stage that holds until the test has read its first line back from the server: with output logged
# only when the stage ends, the gate never opens and the stage fails. It prints without flushing, as the
# pipeline's stages do.
GATED_STAGE = textwrap.dedent(
    """
    import pathlib, sys, time
    print("gated stage: first line")
    deadline = time.monotonic() + 40
    while not pathlib.Path("gate").exists():
        if time.monotonic() > deadline:
            sys.exit("gated stage: the gate never opened (first line not on the server while the stage ran)")
        time.sleep(0.2)
    print("gated stage: last line")
    pathlib.Path("out.txt").write_text("done")
    """
)

TWICE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from prefect import flow
    from flows.pipeline import stage_task

    @flow(name="gated-stage-twice")
    def twice(root: str) -> list[str]:
        gated = stage_task("gated")  # the second run: DVC finds the stage up to date
        return [gated("gated", Path(root), return_state=True).name for _ in range(2)]

    print("RESULT", twice(sys.argv[1]))
    """
)


@pytest.mark.timeout(240)
def test_stage_output_is_streamed_to_the_run_log_and_a_skipped_stage_says_so(prefect_server, tmp_path: Path):
    """flows.pipeline's stage task on a real DVC project (git, `dvc init`, one stage) against the server:
    the stage's first line is on the server while the stage still runs; a second run of the same stage,
    which DVC skips, ends in state `Skipped` with a log line that says so."""
    url, _ = prefect_server
    project = tmp_path / "project"
    project.mkdir()
    env = {**stage_env(project), "PREFECT_API_URL": url}
    env.pop("PYTHONUNBUFFERED", None)  # the stage task must make its stages unbuffered itself
    (project / "stage.py").write_text(GATED_STAGE)
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"gated": {"cmd": "python stage.py", "deps": ["stage.py"], "outs": ["out.txt"]}}}))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, env=env, check=True)
    log_path = tmp_path / "flow.log"
    with open(log_path, "w") as log:
        flow = subprocess.Popen([sys.executable, "-c", TWICE, str(project)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline, first = time.monotonic() + 120, None
            while first is None and time.monotonic() < deadline and flow.poll() is None:
                found = _post(url, "/logs/filter", {"logs": {"level": {"ge_": 0}}, "sort": "TIMESTAMP_DESC", "limit": 200})
                first = next((r for r in found if r["message"] == "gated stage: first line"), None)
                time.sleep(0.5)
            assert first is not None, log_path.read_text()[-4000:]
            # read back while the stage still ran
            assert [t["state"]["type"] for t in _task_runs(url, first["flow_run_id"])] == ["RUNNING"], log_path.read_text()[-4000:]
            assert not (project / "out.txt").exists()
            (project / "gate").touch()
            assert flow.wait(timeout=120) == 0, log_path.read_text()[-4000:]
        finally:
            if flow.poll() is None:
                stop_process(flow)
    messages = [r["message"] for r in _flow_run_logs_with(url, first["flow_run_id"], "stage gated skipped: DVC")]
    assert messages.count("gated stage: first line") == 1 and "gated stage: last line" in messages, messages
    ran, again = _task_runs(url, first["flow_run_id"])
    assert (ran["state"]["type"], ran["state"]["name"]) == ("COMPLETED", "Completed"), ran["state"]
    assert (again["state"]["type"], again["state"]["name"]) == ("COMPLETED", "Skipped"), again["state"]
    assert "up to date" in again["state"]["message"]
    assert any(m.startswith("stage gated skipped: DVC") for m in messages), messages
    assert "RESULT ['Completed', 'Skipped']" in log_path.read_text()  # what the pipeline flow reads


STOPPABLE_STAGE = textwrap.dedent(
    """
    import os, pathlib, time
    from mtl_core.stopping import StageStopped, exit_with_launcher, install_stop_handlers

    install_stop_handlers()  # what `mtl` does for a stage
    exit_with_launcher()
    pathlib.Path("started").write_text(str(os.getpid()))
    try:
        while True:
            time.sleep(0.1)
    except StageStopped as stop:
        pathlib.Path("stopped").write_text(stop.reason)
    """
)

ONCE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from prefect import flow
    from flows.pipeline import stage_task

    @flow(name="stoppable-stage")
    def once(root: str) -> None:
        stage_task("long")("long", Path(root))

    once(sys.argv[1])
    """
)


@pytest.mark.timeout(240)
def test_stopping_the_flow_run_stops_dvc_and_its_stage(prefect_server, tmp_path: Path):
    """The process running a flow run SIGTERMed (what cancelling it or stopping its runner ends in): the
    `dvc repro` it started gets its parent-death signal, and the stage under DVC (here a stand-in that
    stops as `mtl` does: mtl_core.stopping) sees DVC gone and stops; the whole group ends in seconds."""
    url, _ = prefect_server
    project = tmp_path / "project"
    project.mkdir()
    env = {**stage_env(project), "PREFECT_API_URL": url, "PYTHONPATH": str(REPO_ROOT)}
    (project / "stage.py").write_text(STOPPABLE_STAGE)
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"long": {"cmd": f"{sys.executable} stage.py", "deps": ["stage.py"], "outs": ["out.txt"]}}}))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, env=env, check=True)
    log_path = tmp_path / "flow.log"
    with open(log_path, "w") as log:
        flow = subprocess.Popen(
            [sys.executable, "-c", ONCE, str(project)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while not (project / "started").exists():
                assert flow.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.2)
            os.kill(flow.pid, signal.SIGTERM)  # the flow run's process only
            start = time.monotonic()
            while _group(flow.pid):
                flow.poll()
                assert time.monotonic() - start < 20, f"still running: {_group(flow.pid)}\n" + log_path.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            for pid in _group(flow.pid):
                os.kill(pid, signal.SIGKILL)
    assert (project / "stopped").read_text() == "stopped by SIGTERM"
    assert not (project / "out.txt").exists()


def _group(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (zombies waiting to be reaped left out)."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            if os.getpgid(int(name)) == pgid and stat.rsplit(b")", 1)[1].split()[0] != b"Z":
                members.append(int(name))
        except OSError:
            pass
    return members
