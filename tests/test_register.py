"""Stage `register`: pyfunc model without pickles, registry versions, the champion alias and its gate."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from mtl_core.config import PipelineConfig, load_config
from mtl_core.paths import ProjectPaths
from mtl_core.pipeline import run_stage
from mtl_core.registry.versions import (
    CHAMPION, DECISION_TAG, GATE_FAILURES_TAG, GATE_REASON_TAG, GATE_TAG, PENDING, SCORE_TAG, TEST_DATA_TAG,
)  # fmt: skip
from mtl_core.stages.register import run_register
from mtl_core.tasks import MISSING_LABEL, TaskSpec
from mtl_core.tracking.runs import read_run_info, write_run_info
from mtl_core.tracking.store import setup_mlflow, tracking_uri
from tests.conftest import stage_env

FAULT = "register.after_create_version"


def _copy_project(src: Path, dest: Path) -> tuple[Path, PipelineConfig, ProjectPaths]:
    """A copy of a project whose MLflow store keeps its artifacts in the copy: the store's experiment and
    runs name the original folder's `mlartifacts/`, which registering (or re-evaluating) in the copy would
    otherwise write into, under the shared project's run."""
    shutil.copytree(src, dest)
    old, new = src.resolve().as_uri() + "/", dest.resolve().as_uri() + "/"
    db = sqlite3.connect(dest / "mlflow.db")
    with db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
        db.execute("UPDATE logged_models SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
    db.close()
    cfg = load_config(dest / "params.yaml")
    mlflow.set_tracking_uri(tracking_uri(cfg, dest))
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._artifact_repos_cache.clear()  # see _no_artifact_repo_of_another_copy
    return dest, cfg, ProjectPaths(dest)


@pytest.fixture(autouse=True)
def _no_artifact_repo_of_another_copy():
    """MLflow caches each run's artifact repository by run id for the whole process, and a copied project's
    run has the original's id: without this, a stage rerun in a copy (evaluate, register) wrote into the
    shared project's mlartifacts/ (its confusion plots, its per-task table), and later reads of the shared
    run read the copy's. Cleared around every test here."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._artifact_repos_cache.clear()
    yield
    tracking_utils._artifact_repos_cache.clear()


def _majority(paths: ProjectPaths) -> dict[str, tuple[int, int]]:
    """Per task: (test images of the most frequent test class, labelled test images)."""
    labels = np.load(paths.labels_cache("test"))
    out = {}
    for k, task in enumerate(TaskSpec.load(paths.tasks_file).names):
        y = labels[:, k][labels[:, k] != MISSING_LABEL]
        out[task] = (int(np.bincount(y).max()), len(y))
    return out


def _above_chance_metrics(paths: ProjectPaths) -> None:
    """On its 32 test images the tiny model is at or under the majority rate on the hard tasks (`shape`,
    `position`): tests of the alias rule give every task at least one test image more than its majority
    class (the mean recomputed), so that the gate lets the model through."""
    metrics = json.loads(paths.test_metrics.read_text())
    for task, (majority, n) in _majority(paths).items():
        metrics["tasks"][task]["accuracy"] = max(metrics["tasks"][task]["accuracy"], (majority + 1) / n)
    metrics["mean"]["accuracy"] = float(np.mean([v["accuracy"] for v in metrics["tasks"].values()]))
    paths.test_metrics.write_text(json.dumps(metrics))


def _set_mean_accuracy(paths: ProjectPaths, value: float) -> None:
    metrics = json.loads(paths.test_metrics.read_text())
    metrics["mean"]["accuracy"] = value
    paths.test_metrics.write_text(json.dumps(metrics))


def _retrained(cfg: PipelineConfig, root: Path) -> str:
    """What retraining leaves for register: the model in models/ with a run of its own (train opens one
    MLflow run per trained model). Returns the new run's id."""
    exp_id = setup_mlflow(cfg, root)
    with mlflow.start_run(experiment_id=exp_id) as run:
        pass
    write_run_info(ProjectPaths(root), run.info.run_id, exp_id)
    return run.info.run_id


def _no_champion(client: MlflowClient, name: str) -> bool:
    try:
        client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True
    return False


def _logged_models(client: MlflowClient, run_id: str) -> list:
    run = client.get_run(run_id)
    return mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
    )


def _strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def project(trained_project: Path, tmp_path_factory: pytest.TempPathFactory):
    # a copy, so that registering versions here leaves the shared project's registry alone
    root, cfg, paths = _copy_project(trained_project, tmp_path_factory.mktemp("register") / "project")
    _above_chance_metrics(paths)
    return root, cfg, paths


@pytest.fixture
def fresh(trained_project: Path, tmp_path: Path):
    """A copy of the trained project for one test, with the store of its own."""
    return _copy_project(trained_project, tmp_path / "project")


def test_register_then_champion_moves_only_on_improvement(project, monkeypatch: pytest.MonkeyPatch):
    root, cfg, paths = project
    name = cfg.mlflow.model_name
    client = MlflowClient()

    first = run_register(cfg, root)
    assert (first.version, first.champion_moved, first.previous_champion_version) == ("1", True, None)
    assert first.gate_failures == []
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert client.get_model_version(name, "1").tags[GATE_TAG] == "passed"
    assert json.loads(paths.registry_report.read_text())["champion_version"] == "1"

    # the registered model loads without unpickling anything and predicts every task
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    images = np.load(paths.images_cache("test"))[:5]
    out = model.predict(images)
    spec = json.loads(paths.model_spec.read_text())
    for task, classes in spec["tasks"].items():
        # same predictions as the evaluate stage wrote for these test images
        expected = pd.read_csv(paths.predictions_dir / f"{task}.csv")["predicted"][:5]
        assert list(out[task]) == list(expected)
        probs = out[[f"{task}_prob_{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(out[f"{task}_probability"], probs.max(1), atol=1e-7)
    # any image size is accepted and resized like in preprocessing
    big = np.repeat(np.repeat(images[:1], 2, axis=1), 2, axis=2)
    assert len(model.predict(big)) == 1
    # integers 0-255 (a JSON request's int64) are images too; a float image in [0, 1] is refused, briefly
    assert list(model.predict(images.astype(np.int64))["shape"]) == list(out["shape"])
    with pytest.raises(MlflowException) as refused:
        model.predict(images.astype(np.float32) / 255)
    assert "uint8" in refused.value.message and len(refused.value.message) < 200

    # the version's description: its run, the gate's verdict and every task's test accuracy
    description = client.get_model_version(name, "1").description
    run = client.get_run(first.run_id)
    assert f"**{run.info.run_name}**" in description and "Champion gate: passed" in description
    metrics = json.loads(paths.test_metrics.read_text())
    for task, values in metrics["tasks"].items():
        assert f"| {task} | {values['accuracy']:.3f}" in description
    assert f"| **mean** | **{metrics['mean']['accuracy']:.3f}** |" in description

    _retrained(cfg, root)
    _set_mean_accuracy(paths, first.mean_test_accuracy - 0.1)
    worse = run_register(cfg, root)
    assert (worse.version, worse.champion_moved, worse.champion_version) == ("2", False, "1")
    assert "does not beat champion version 1" in worse.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    report = json.loads(paths.registry_report.read_text())
    assert report["champion_moved"] is False and report["version"] == "2"

    _retrained(cfg, root)
    _set_mean_accuracy(paths, first.mean_test_accuracy + 0.1)
    better = run_register(cfg, root)
    assert (better.version, better.champion_moved, better.previous_champion_version) == ("3", True, "1")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert float(client.get_model_version(name, "3").tags[SCORE_TAG]) == first.mean_test_accuracy + 0.1


def test_an_identical_model_registered_again_does_not_displace_the_champion(fresh):
    """The same model retrained (same weights, same score, a run of its own) gets a version of its own,
    and the alias stays on the first: "beats" is strictly better. The score is chosen so that rounding it
    to 6 digits would make it look lower."""
    root, cfg, paths = fresh
    _above_chance_metrics(paths)
    _set_mean_accuracy(paths, 0.1234564)
    first = run_register(cfg, root)
    _retrained(cfg, root)
    again = run_register(cfg, root)
    assert (first.version, again.version) == ("1", "2")
    assert (first.champion_moved, again.champion_moved, again.champion_version) == (True, False, "1")
    assert again.previous_champion_accuracy == 0.1234564 and again.gate_failures == []
    assert "does not beat" in again.reason
    assert str(MlflowClient().get_model_version_by_alias(cfg.mlflow.model_name, CHAMPION).version) == "1"


def test_a_model_at_chance_is_registered_but_not_champion(fresh):
    """All heads zeroed: every task answers one constant class, so no task beats its majority rate. The
    first model of a registry, which would otherwise become champion for want of a rival."""
    root, cfg, paths = fresh
    name = cfg.mlflow.model_name
    weights = load_file(paths.weights)
    for key in [k for k in weights if k.startswith("heads.")]:
        weights[key] = weights[key].zero_()
    save_file(weights, paths.weights)
    run_stage("evaluate", root=root)
    metrics = json.loads(paths.test_metrics.read_text())
    for task, (majority, n) in _majority(paths).items():  # the model is at (or under) chance on every task
        assert metrics["tasks"][task]["accuracy"] <= majority / n + 1e-6

    report = run_register(cfg, root)
    client = MlflowClient()
    assert (report.version, report.champion_moved, report.champion_version) == ("1", False, None)
    assert report.gate_failures == ["above_chance"]
    assert "chance" in report.reason
    assert sorted(t.split(" ")[0] for t in report.tasks_at_chance) == sorted(_majority(paths))  # each named
    assert _no_champion(client, name)
    saved = _strict_json(paths.registry_report)
    assert saved["gate_failures"] == ["above_chance"] and "chance" in saved["reason"]
    tags = client.get_model_version(name, "1").tags
    assert (tags[GATE_TAG], tags[GATE_FAILURES_TAG]) == ("refused", "above_chance")
    assert "chance" in tags[GATE_REASON_TAG]
    description = client.get_model_version(name, "1").description
    assert "Champion gate: refused (not better than chance" in description
    assert description.count("(chance)") == len(_majority(paths))  # every task's row marked


def test_a_task_at_chance_is_named_but_does_not_refuse_a_model_above_chance(fresh):
    """Three tasks perfect, `shape` exactly at its majority rate: the model beats chance over the tasks
    and becomes champion, and the report, the log and a version tag name `shape`, and only it."""
    root, cfg, paths = fresh
    majority = _majority(paths)
    metrics = json.loads(paths.test_metrics.read_text())
    for task in metrics["tasks"]:
        metrics["tasks"][task]["accuracy"] = 1.0
    m, n = majority["shape"]
    metrics["tasks"]["shape"]["accuracy"] = float(np.float32(m / n))  # as torchmetrics writes it
    metrics["mean"]["accuracy"] = float(np.mean([v["accuracy"] for v in metrics["tasks"].values()]))
    paths.test_metrics.write_text(json.dumps(metrics))

    report = run_register(cfg, root)
    assert (report.champion_moved, report.gate_failures) == (True, [])
    assert [t.split(" ")[0] for t in report.tasks_at_chance] == ["shape"]
    assert f"{m}/{n}" in report.tasks_at_chance[0]
    tags = MlflowClient().get_model_version(cfg.mlflow.model_name, report.version).tags
    assert tags["mtl.tasks_at_chance"].startswith("shape (")


def test_a_model_no_better_than_chance_over_the_tasks_is_refused(fresh):
    """Each task one correct answer above its majority count but one far below it: summed, the model
    is under the majority-class predictor, and refused."""
    root, cfg, paths = fresh
    majority = _majority(paths)
    metrics = json.loads(paths.test_metrics.read_text())
    tasks = list(metrics["tasks"])
    for task in tasks:
        m, n = majority[task]
        metrics["tasks"][task]["accuracy"] = (m + 1) / n
    m, n = majority[tasks[0]]
    metrics["tasks"][tasks[0]]["accuracy"] = 0.0
    paths.test_metrics.write_text(json.dumps(metrics))
    correct = sum(round(metrics["tasks"][t]["accuracy"] * majority[t][1]) for t in tasks)
    assert correct <= sum(m for m, _ in majority.values())  # the case is what it says

    report = run_register(cfg, root)
    assert (report.champion_moved, report.gate_failures) == (False, ["above_chance"])
    assert _no_champion(MlflowClient(), cfg.mlflow.model_name)


def test_min_mean_accuracy_refuses_then_a_rerun_regates_the_same_version(fresh):
    root, cfg, paths = fresh
    name = cfg.mlflow.model_name
    _above_chance_metrics(paths)
    score = json.loads(paths.test_metrics.read_text())["mean"]["accuracy"]
    strict = cfg.model_copy(update={"register": cfg.register.model_copy(update={"min_mean_accuracy": score + 0.01})})

    refused = run_register(strict, root)
    assert (refused.version, refused.champion_moved, refused.gate_failures) == ("1", False, ["min_mean_accuracy"])
    assert "min_mean_accuracy" in refused.reason
    client = MlflowClient()
    assert _no_champion(client, name)
    assert client.get_model_version(name, "1").tags[GATE_TAG] == "refused"

    # "at least": a threshold equal to the score passes; the rerun for the same run finishes version 1
    # again (no version 2, no second logged model) and now moves the alias to it
    equal = cfg.model_copy(update={"register": cfg.register.model_copy(update={"min_mean_accuracy": score})})
    passed = run_register(equal, root)
    assert (passed.version, passed.champion_moved, passed.gate_failures) == ("1", True, [])
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert client.get_model_version(name, "1").tags[GATE_TAG] == "passed"
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    run_id = read_run_info(paths)["run_id"]
    assert len(_logged_models(client, run_id)) == 1

    # a third time: the version is already champion, and says so
    again = run_register(cfg, root)
    assert (again.version, again.champion_moved, again.champion_version) == ("1", False, "1")
    assert "already champion" in again.reason

    # a run whose version was deleted registers its already logged model again, without logging another
    client.delete_model_version(name, "1")
    after_delete = run_register(cfg, root)
    assert (after_delete.version, after_delete.champion_moved) == ("2", True)
    assert len(_logged_models(client, run_id)) == 1


def test_non_finite_weights_are_refused(fresh):
    """A NaN in one tensor, behind test metrics that look fine (they are the good model's)."""
    root, cfg, paths = fresh
    _above_chance_metrics(paths)
    weights = load_file(paths.weights)
    weights["heads.color.weight"][0, 0] = float("nan")
    save_file(weights, paths.weights)

    report = run_register(cfg, root)
    assert (report.version, report.champion_moved, report.gate_failures) == ("1", False, ["finite_weights"])
    assert "heads.color.weight" in report.reason and "non-finite weights" in report.reason
    client = MlflowClient()
    assert _no_champion(client, cfg.mlflow.model_name)
    assert client.get_model_version(cfg.mlflow.model_name, "1").tags[GATE_FAILURES_TAG] == "finite_weights"


def test_non_finite_metrics_are_refused(fresh):
    root, cfg, paths = fresh
    _above_chance_metrics(paths)
    metrics = json.loads(paths.test_metrics.read_text())
    metrics["tasks"]["size"]["f1_macro"] = float("nan")
    metrics["mean"]["accuracy"] = float("inf")
    paths.test_metrics.write_text(json.dumps(metrics))  # Python writes NaN / Infinity, and reads them back

    report = run_register(cfg, root)
    assert report.champion_moved is False
    assert report.gate_failures == ["finite_metrics"]
    assert "tasks.size.f1_macro" in report.reason and "mean.accuracy" in report.reason
    saved = _strict_json(paths.registry_report)  # registry.json stays valid JSON
    assert saved["mean_test_accuracy"] is None and saved["gate_failures"] == report.gate_failures
    assert _no_champion(MlflowClient(), cfg.mlflow.model_name)
    assert not math.isfinite(float(MlflowClient().get_model_version(cfg.mlflow.model_name, "1").tags[SCORE_TAG]))


def test_register_killed_after_creating_the_version_finishes_it_on_rerun(fresh):
    """`mtl register` SIGKILLed right after `register_model` (version 1 exists with its gate verdict and
    its decision pending, no alias, the run left RUNNING); the rerun finds version 1 by the run's id and
    finishes it: no version 2."""
    root, cfg, paths = fresh
    name = cfg.mlflow.model_name
    _above_chance_metrics(paths)
    run_id = read_run_info(paths)["run_id"]
    env = stage_env(root)

    killed = subprocess.run(
        ["mtl", "register"], cwd=root, env={**env, "MTL_FAULT": FAULT}, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    client = MlflowClient()
    (version,) = client.search_model_versions(f"name='{name}'")
    assert (str(version.version), version.run_id) == ("1", run_id)
    assert version.tags[GATE_TAG] == "passed" and version.tags[DECISION_TAG] == PENDING  # recorded at creation
    assert _no_champion(client, name) and not paths.registry_report.exists()
    assert client.get_run(run_id).info.status == "RUNNING"

    rerun = subprocess.run(["mtl", "register"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    tags = client.get_model_version(name, "1").tags
    assert tags[GATE_TAG] == "passed" and float(tags[SCORE_TAG]) == json.loads(paths.test_metrics.read_text())["mean"]["accuracy"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert tags[DECISION_TAG] == "no previous champion; version 1 is champion"
    report = json.loads(paths.registry_report.read_text())
    assert (report["version"], report["champion_moved"], report["run_id"]) == ("1", True, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(_logged_models(client, run_id)) == 1  # the pyfunc model was not logged a second time


def _set_params(root: Path, update: dict) -> PipelineConfig:
    import yaml

    from tests.conftest import deep_update

    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(deep_update(yaml.safe_load(path.read_text()), update), sort_keys=False))
    return load_config(path)


@pytest.mark.timeout(900)
def test_a_champion_is_only_compared_with_the_same_tasks_on_the_same_test_split(fresh, tiny_data: Path, tmp_path: Path):
    """The registry holds the four-task model as champion. A model of other tasks (color, size only) is
    registered but never moves the alias, whether its mean accuracy would have won
    or lost; the reason names the mlflow.model_name to set, under which it becomes champion. The same
    four tasks scored on another test split do not move it either."""
    from tests.conftest import project_from

    root, cfg, paths = fresh
    name = cfg.mlflow.model_name
    _above_chance_metrics(paths)
    assert run_register(cfg, root).champion_moved  # version 1, four tasks: champion
    client = MlflowClient()

    # a model of other tasks, logging into the same store
    other = project_from(tiny_data, tmp_path / "other", {
        "data": {"tasks": ["color", "size"]}, "train": {"epochs": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
    })  # fmt: skip
    for stage in ("ingest", "preprocess", "train", "evaluate"):
        run_stage(stage, root=other)
    other_cfg, other_paths = load_config(other / "params.yaml"), ProjectPaths(other)
    _above_chance_metrics(other_paths)
    suggested = f"{name}-color-size"
    for would_win, version in ((True, "2"), (False, "3")):
        if version == "3":
            _retrained(other_cfg, other)  # another run: a version of its own
        _set_mean_accuracy(other_paths, 0.999 if would_win else 0.001)
        report = run_register(other_cfg, other)
        assert (report.version, report.champion_moved, report.champion_version) == (version, False, "1")
        assert report.reason.startswith(
            f"version {version} predicts tasks color, size, champion version 1 predicts color, position, shape, size: "
            "their accuracies are not comparable"
        ), report.reason
        assert f"set mlflow.model_name (e.g. '{suggested}') in params.yaml" in report.reason
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
        assert client.get_model_version(name, version).tags[DECISION_TAG] == report.reason
    # under the name it suggests, the model is registered and champion of its own
    own = run_register(_set_params(other, {"mlflow": {"model_name": suggested}}), other)
    assert (own.model_name, own.version, own.champion_moved) == (suggested, "1", True)

    # the same four tasks, scored on another test split: not compared either
    cfg = _set_params(root, {"data": {"split": {"seed": 7}}})
    for stage in ("ingest", "preprocess", "evaluate"):
        run_stage(stage, root=root)
    _retrained(cfg, root)
    _above_chance_metrics(paths)
    _set_mean_accuracy(paths, 0.999)
    report = run_register(cfg, root)
    assert (report.version, report.champion_moved, report.champion_version) == ("4", False, "1")
    assert report.reason.startswith("version 4 was evaluated on another test split than champion version 1"), report.reason
    assert client.get_model_version(name, "4").tags[TEST_DATA_TAG] != client.get_model_version(name, "1").tags[TEST_DATA_TAG]


@pytest.mark.timeout(900)
def test_a_register_killed_after_creating_its_version_is_finished_by_the_next_pipeline(fresh):
    """`mtl register` SIGKILLed after `Created version`, then train.lr changes and the pipeline reruns:
    the earlier run, whose training had finished, is marked FINISHED (not FAILED), and the next register
    takes the earlier version's champion decision before its own. The train stage's orphan sweep leaves
    a run held by a live process RUNNING, and fails one whose process is gone."""
    root, cfg, paths = fresh
    name = cfg.mlflow.model_name
    _above_chance_metrics(paths)
    first_run = read_run_info(paths)["run_id"]
    killed = subprocess.run(
        ["mtl", "register"], cwd=root, env={**stage_env(root), "MTL_FAULT": FAULT}, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    client = MlflowClient()
    run = client.get_run(first_run)
    assert (run.info.status, run.data.tags["mtl.open_by"], run.data.tags["mtl.trained"]) == ("RUNNING", "register", "true")
    assert run.data.tags["mtl.pid"] != str(__import__("os").getpid())

    # two more RUNNING runs of the train stage on this host: one held by a live process, one by a dead one
    from mtl_core.tracking.runs import process_tags

    live = subprocess.Popen(["sleep", "600"])
    done = subprocess.Popen(["true"])
    done.wait()
    try:
        held = {}
        for label, pid in (("live", live.pid), ("dead", done.pid)):
            tags = {**process_tags("train"), "mtl.stage": "train", "mtl.pid": str(pid)}
            tags.pop("mtl.pid_start")
            if label == "live":
                from mtl_core.tracking.runs import _process_start

                tags["mtl.pid_start"] = _process_start(pid)
            held[label] = client.create_run(run.info.experiment_id, tags=tags).info.run_id

        cfg = _set_params(root, {"train": {"lr": 0.004, "epochs": 1}})
        run_stage("train", root=root)
        statuses = {k: client.get_run(v).info.status for k, v in held.items()}
        assert statuses == {"live": "RUNNING", "dead": "FAILED"}
    finally:
        live.kill()
        live.wait()
    old = client.get_run(first_run)
    assert old.info.status == "FINISHED"  # its training finished: a killed register does not make it FAILED
    assert old.data.tags["mtl.interrupted_stage"] == "register (its process died)"
    assert "mtl.failed_reason" not in old.data.tags

    run_stage("evaluate", root=root)
    _above_chance_metrics(paths)
    report = run_register(cfg, root)
    first = client.get_model_version(name, "1")
    assert first.tags[DECISION_TAG] == "no previous champion; version 1 is champion"  # decided by this register
    assert report.version == "2" and report.previous_champion_version == "1"
    assert report.champion_version == ("2" if report.champion_moved else "1")
    assert client.get_model_version(name, "2").tags[DECISION_TAG] == report.reason
    running = client.search_runs([old.info.experiment_id], "attributes.status = 'RUNNING'")
    assert [r.info.run_id for r in running] == [held["live"]]


def _hand_made_comparison(tasks: list[str], verdicts: bool) -> dict:
    """A comparison report as the compare stage writes it, with round numbers to check the tables by hand:
    task k: multi-task 0.5 + 0.1 k against single-task 0.5, so the differences are 0, 20, 40, 60 % and
    Δm their mean, 30 %."""
    per_task = {}
    for k, task in enumerate(tasks):
        entry = {"balanced_accuracy": {"mtl": 0.5 + 0.1 * k, "stl": 0.5, "relative_pct": 20.0 * k}}
        if verdicts:
            entry["verdict"] = "better" if k else "no significant difference"
        per_task[task] = entry
    return {"enabled": True, "primary_metric": "balanced_accuracy", "tasks": per_task,
            "delta_m_pct": {"balanced_accuracy": 10.0 * (len(tasks) - 1)}, "negative_transfer": []}  # fmt: skip


def test_the_registered_model_has_a_signature_an_example_and_its_card(fresh, tmp_path: Path):
    """What someone who only sees the registry reads: the model's inputs (a uint8 image tensor) and outputs
    in its signature, an input example, the card as the registered model's description and as
    model_card.md in the model's folder (the same text), naming every task and class, the data, how to
    call it, each task's test accuracy and Δm; the version's description has Δm per task."""
    from mlflow.models import get_model_info

    root, cfg, paths = fresh
    _above_chance_metrics(paths)
    tasks = json.loads(paths.model_spec.read_text())["tasks"]
    paths.comparison.write_text(json.dumps(_hand_made_comparison(list(tasks), verdicts=False)))
    report = run_register(cfg, root)
    name, client = cfg.mlflow.model_name, MlflowClient()

    info = get_model_info(f"models:/{name}/{report.version}")
    (spec,) = info.signature.inputs.inputs
    assert (spec.type, spec.shape) == (np.dtype(np.uint8), (-1, -1, -1, 3))
    assert {f"{t}_probability" for t in tasks} <= set(info.signature.outputs.input_names())
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{report.version}", dst_path=str(tmp_path / "m")))
    example = json.loads((folder / "serving_input_example.json").read_text())["inputs"]
    assert np.asarray(example).shape[1:] == (paths and np.load(paths.images_cache("test"), mmap_mode="r").shape[1:])

    card = (folder / "model_card.md").read_text()
    assert card == paths.model_card.read_text() == client.get_registered_model(name).description
    assert card.startswith(f"# {name} version {report.version}")
    for task, classes in tasks.items():
        assert f"| {task} | {len(classes)} | " + ", ".join(f"`{c}`" for c in classes) + " |" in card
    metrics = json.loads(paths.test_metrics.read_text())
    for task, values in metrics["tasks"].items():
        assert f"| {task} | {values['accuracy']:.3f}" in card
    run = client.get_run(report.run_id)
    assert run.data.tags["dvc.data_md5"] in card if "dvc.data_md5" in run.data.tags else "source: `builtin:shapes`" in card
    assert run.data.tags["data.manifest_sha256"] in card and "uint8" in card and f"models:/{name}/{report.version}" in card
    assert "**Δm = +30.00 %**" in card and "| size | 0.700 | 0.500 | +40.00 % |" in card
    assert "significance" not in card  # no verdicts in the report: no column for them

    description = client.get_model_version(name, report.version).description
    assert "### Multi-task against single-task" in description and "| **Δm** | | | **+30.00 %** | |" in description
    for k, task in enumerate(tasks):
        assert f"| {task} | {0.5 + 0.1 * k:.3f} | 0.500 | {20.0 * k:+.2f} % | |" in description

    # once the comparison has verdicts (issue "never worse"), a significance column shows them
    paths.comparison.write_text(json.dumps(_hand_made_comparison(list(tasks), verdicts=True)))
    run_register(cfg, root)
    description = client.get_model_version(name, report.version).description
    assert "| negative transfer | significance |" in description
    first = next(iter(tasks))
    assert f"| {first} | 0.500 | 0.500 | +0.00 % | | no significant difference |" in description
    assert client.get_registered_model(name).description.count("| better |") == len(tasks) - 1
