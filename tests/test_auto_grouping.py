"""`model.task_groups: auto` end to end on the tiny data: the grouping stage's probe measures both affinities
and chooses the groups, the train stage trains them, compare tests every solution against the single-task
models, and register registers the solution `compare.select` picks, saying why; without baselines the
version says the grouping is unverified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mtl_core.config import load_config
from mtl_core.hashing import file_sha256
from mtl_core.models.io import read_spec
from mtl_core.paths import ProjectPaths
from mtl_core.pipeline import run_stage
from mtl_core.tracking.runs import read_run_info
from mtl_core.tracking.store import tracking_uri
from tests.conftest import project_from, write_params

TASKS = ["shape", "color", "size", "position"]
AUTO = {
    "model": {"task_groups": "auto"},
    "train": {"epochs": 2, "task_affinity_every": 2},
    "grouping": {"probe_epochs": 1, "every": 1},
    "compare": {"single_task": False},
}


@pytest.fixture(scope="module")
def auto_project(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Through grouping, train, evaluate and, without baselines, compare and register."""
    root = project_from(tiny_data, tmp_path_factory.mktemp("auto"), AUTO)
    for stage in ("grouping", "train", "evaluate", "baselines", "all_in_one", "compare", "register"):
        run_stage(stage, root=root)
    return root


def client_of(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri(load_config(root / "params.yaml"), root))


def test_the_probe_measures_both_affinities_and_chooses_a_partition(auto_project: Path) -> None:
    paths = ProjectPaths(auto_project)
    decision = json.loads(paths.task_groups.read_text())
    assert decision["enabled"] and decision["measured"] and decision["signal"] == "lookahead"
    assert sorted(t for g in decision["groups"] for t in g) == sorted(TASKS)  # a partition of the tasks
    assert decision["alternative"]["signal"] == "cosine" and decision["verified"] is False
    affinity = json.loads(paths.task_affinity.read_text())
    for signal in ("lookahead", "cosine"):
        mean = np.array(affinity[signal]["mean"], dtype=float)
        assert mean.shape == (4, 4) and np.isfinite(mean).all(), signal
        assert affinity[signal]["epochs"]["1"]  # measured in the probe's one epoch
    assert np.allclose(np.diag(np.array(affinity["cosine"]["mean"])), 1.0)  # a task's gradient with itself
    assert paths.task_affinity.with_suffix(".png").stat().st_size > 1000
    # the probe is a run of its own, with the heatmap and both matrices
    run = client_of(auto_project).get_run(decision["run"])
    assert run.data.tags["mtl.kind"] == "affinity_probe" and run.data.tags["mtl.stage"] == "grouping"
    logged = {a.path for a in client_of(auto_project).list_artifacts(decision["run"], "task_relations")}
    assert {"task_relations/task_affinity.json", "task_relations/task_affinity.png"} <= logged


def test_the_train_stage_trains_the_chosen_groups_and_says_they_are_unverified(auto_project: Path) -> None:
    paths = ProjectPaths(auto_project)
    groups = json.loads(paths.task_groups.read_text())["groups"]
    spec = read_spec(paths.model_spec)
    assert spec.get("task_groups") == (groups if len(groups) > 1 else None)
    run = client_of(auto_project).get_run(read_run_info(paths)["run_id"])
    assert run.data.tags["mtl.task_groups_source"] == "auto"
    registry = json.loads(paths.registry_report.read_text())
    assert registry["solution"] == "trained" and "unverified" in registry["solution_note"]
    version = client_of(auto_project).get_model_version(registry["model_name"], registry["version"])
    assert "unverified: no single-task models were trained" in version.description


def test_with_baselines_the_selected_solution_is_registered_and_explained(auto_project: Path, tmp_path: Path) -> None:
    root = tmp_path / "project"
    shutil.copytree(auto_project, root)
    write_params(root, {**AUTO, "compare": {"single_task": True}})
    for stage in ("baselines", "all_in_one", "compare", "register"):
        run_stage(stage, root=root)
    paths = ProjectPaths(root)
    comparison = json.loads(paths.comparison.read_text())
    selection, solutions = comparison["selection"], comparison["solutions"]
    groups = json.loads(paths.task_groups.read_text())["groups"]
    assert set(solutions) == ({"all_in_one", "grouped", "single_task"} if len(groups) > 1 else {"all_in_one", "single_task"})
    for name, row in solutions.items():
        assert set(row["verdicts"]) == set(TASKS), name
        assert row["worse_tasks"] == [t for t in TASKS if row["verdicts"][t]["verdict"] == "worse"]
    chosen = solutions[selection["solution"]]
    # the policy's promise: fewest networks with no task significantly worse by more than 1 point, or
    # (no candidate meeting it: single-task is always a candidate here) never needed
    assert selection["met"] is True and selection["rule"] == "fewest_networks"
    assert all(-100 * chosen["verdicts"][t]["difference"] <= 1.0 for t in chosen["worse_tasks"])
    fewer = [n for n, r in solutions.items() if len(r["groups"]) < len(chosen["groups"])]
    assert all(solutions[n]["worse_tasks"] for n in fewer)  # every smaller solution loses a task
    registry = json.loads(paths.registry_report.read_text())
    assert registry["solution"] == selection["solution"] and selection["reason"] in registry["solution_note"]
    client = client_of(root)
    version = client.get_model_version(registry["model_name"], registry["version"])
    assert version.tags["mtl.solution"] == selection["solution"] and selection["reason"] in version.description
    # the registered weights are the chosen solution's
    weights = {"all_in_one": paths.all_in_one_dir / "model.safetensors", "grouped": paths.weights}
    if selection["solution"] in weights and selection["solution"] != selection["trained"]:
        assert version.tags["mtl.weights_sha256"] == file_sha256(weights[selection["solution"]])
    elif selection["solution"] == selection["trained"]:
        assert version.tags["mtl.weights_sha256"] == file_sha256(paths.weights)


def test_one_task_or_too_few_labels_keep_one_network_and_say_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The stage's early answers, on hand-made preprocessed files: nothing is trained."""
    root = tmp_path / "project"
    root.mkdir()
    write_params(root, AUTO)
    paths = ProjectPaths(root)
    paths.preprocessed_dir.mkdir(parents=True)
    paths.tasks_file.write_text(json.dumps({"tasks": {"color": ["blue", "red"]}}))
    report = run_stage("grouping", root=root)
    assert report["groups"] == [["color"]] and report["measured"] is False and "one task (color)" in report["reason"]
    paths.tasks_file.write_text(json.dumps({"tasks": {"color": ["blue", "red"], "size": ["large", "small"]}}))
    labels = np.zeros((30, 2), dtype=np.int64)
    labels[5:, 1] = -1  # size: 5 labelled rows, under grouping.min_labelled_rows (20)
    np.save(paths.labels_cache("train"), labels)
    report = run_stage("grouping", root=root)
    assert report["groups"] == [["color", "size"]] and "too few labelled training rows to measure task size (5)" in report["reason"]
    assert json.loads(paths.task_affinity.read_text())["enabled"] is False and paths.task_affinity.with_suffix(".png").is_file()
