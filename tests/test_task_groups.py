"""`model.task_groups`: one network per group, trained, evaluated and compared as one solution.

Reuses the single-task baselines of test_baselines_compare's project (they do not depend on the
grouping): the grouped project is a copy of its data and baselines with a fresh MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from mtl_core.config import load_config
from mtl_core.evaluation.scoring import make_test_loader, score
from mtl_core.models.grouped import TaskGroupedModel, validate_groups
from mtl_core.models.io import load_model
from mtl_core.paths import ProjectPaths
from mtl_core.pipeline import run_stage
from mtl_core.tracking.runs import read_run_info
from mtl_core.tracking.store import tracking_uri
from tests.conftest import write_params

TASKS = ["shape", "color", "size", "position"]
GROUPS = [["shape"], ["color", "size", "position"]]


@pytest.fixture(scope="module")
def grouped(compared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grouped") / "project"
    root.mkdir()
    for rel in ("data", "models_single_task"):
        shutil.copytree(compared / rel, root / rel)
    (root / "reports").mkdir()
    shutil.copy(compared / "reports" / "single_task_metrics.json", root / "reports")
    write_params(root, {
        "compare": {"single_task": True},
        "model": {"arch": "mmoe", "arch_options": {"num_experts": 2}, "task_groups": GROUPS},
        "train": {"epochs": 1, "task_affinity_every": 2},
    })  # fmt: skip  (the baselines' settings, whatever later tests do to that project)
    for stage in ("train", "evaluate", "all_in_one", "compare"):
        run_stage(stage, root=root)
    return root


def test_groups_must_cover_every_task_once():
    assert validate_groups(GROUPS, TASKS) == GROUPS
    with pytest.raises(ValueError, match=r"tasks in no group \['position'\]"):
        validate_groups([["shape"], ["color", "size"]], TASKS)
    with pytest.raises(ValueError, match=r"unknown tasks \['shap'\].*more than one group \['color'\]"):
        validate_groups([["shap", "color"], ["color", "size", "position", "shape"]], TASKS)


def test_one_network_per_group_saved_as_one_model(grouped: Path):
    paths = ProjectPaths(grouped)
    model, spec = load_model(paths.model_spec, paths.weights)
    assert isinstance(model, TaskGroupedModel) and model.groups == GROUPS and spec["task_groups"] == GROUPS
    assert model.task_names == TASKS
    # each member is the group's own network: its weights are those its group's training wrote
    weights = load_file(str(paths.weights))
    assert any(k.startswith("members.0.backbone.") for k in weights) and any(k.startswith("members.1.heads.size") for k in weights)
    assert not any(k.startswith("members.0.heads.color") for k in weights)
    member_spec = json.loads((grouped / "models" / "groups" / "1" / "model_spec.json").read_text())
    assert list(member_spec["tasks"]) == GROUPS[1]
    # the members share nothing: a change in group 0's backbone leaves group 1's logits alone
    x = torch.randn(3, 3, 64, 64)
    before = model(x)
    with torch.no_grad():
        for p in model.members[0].parameters():
            p.add_(1.0)
    after = model(x)
    assert torch.equal(before["color"], after["color"]) and not torch.equal(before["shape"], after["shape"])


def test_evaluate_scores_the_grouped_solution(grouped: Path):
    paths = ProjectPaths(grouped)
    cfg = load_config(grouped / "params.yaml")
    model, spec = load_model(paths.model_spec, paths.weights)
    per_task, *_ = score(model, make_test_loader(cfg, paths, spec=spec), torch.device("cpu"), amp=False)
    test = json.loads(paths.test_metrics.read_text())["tasks"]
    for t in TASKS:
        assert test[t]["accuracy"] == pytest.approx(per_task[t]["accuracy"], abs=1e-9)


def test_reports_merge_the_groups(grouped: Path):
    paths = ProjectPaths(grouped)
    history = pd.read_csv(paths.train_history)
    for t in TASKS:
        assert f"val/{t}/accuracy" in history
    member = pd.read_csv(grouped / "models" / "groups" / "0" / "train_history.csv")
    assert history["val/shape/accuracy"].tolist() == pytest.approx(member["val/shape/accuracy"].tolist())
    assert history["val/mean/accuracy"].tolist() == pytest.approx(history[[f"val/{t}/accuracy" for t in TASKS]].mean(axis=1).tolist())
    summary = json.loads(paths.train_metrics.read_text())
    members = [json.loads((grouped / "models" / "groups" / str(i) / "train_metrics.json").read_text()) for i in range(2)]
    assert summary["parameters"] == sum(m["parameters"] for m in members)
    assert summary["train_seconds"] == pytest.approx(sum(m["train_seconds"] for m in members))
    cosine = json.loads(paths.gradient_cosine.read_text())
    m = np.asarray(cosine["epochs"]["1"], dtype=float)
    assert np.isnan(m[0, 1]) and np.isfinite(m[1, 2]) and m[1, 1] == pytest.approx(1.0)  # across groups: not measured


def test_compare_reports_all_in_one_grouped_and_single_task(grouped: Path, compared: Path):
    paths = ProjectPaths(grouped)
    comparison = json.loads(paths.comparison.read_text())
    stl = json.loads(paths.single_task_metrics.read_text())
    grouped_test = json.loads(paths.test_metrics.read_text())["tasks"]
    all_in_one = json.loads(paths.all_in_one_metrics.read_text())
    assert all_in_one["enabled"] is True
    solutions = comparison["solutions"]
    assert list(solutions) == ["all_in_one", "grouped", "single_task"]
    m = comparison["primary_metric"]
    assert m == "balanced_accuracy"  # the default compare.metrics[0]
    for name, per_task in (("all_in_one", all_in_one["tasks"]), ("grouped", grouped_test)):
        rel = [(per_task[t][m] - stl["tasks"][t][m]) / stl["tasks"][t][m] * 100 for t in TASKS]
        assert solutions[name]["delta_m_pct"] == pytest.approx(np.mean(rel))
        assert solutions[name][m] == pytest.approx({t: per_task[t][m] for t in TASKS})
    assert solutions["single_task"]["delta_m_pct"] == 0.0
    assert solutions["grouped"]["groups"] == GROUPS and solutions["all_in_one"]["groups"] == [TASKS]
    assert solutions["grouped"]["parameters"] == json.loads(paths.train_metrics.read_text())["parameters"]
    assert solutions["single_task"]["parameters"] == stl["cost"]["parameters"]
    assert solutions["all_in_one"]["train_seconds"] == pytest.approx(all_in_one["cost"]["train_seconds"])
    # the headline comparison (Δm of the trained model) is the grouped solution's
    assert comparison["delta_m_pct"][m] == pytest.approx(solutions["grouped"]["delta_m_pct"])


def test_grouped_runs_in_mlflow(grouped: Path):
    paths = ProjectPaths(grouped)
    mlflow.set_tracking_uri(tracking_uri(load_config(grouped / "params.yaml"), grouped))
    client = MlflowClient()
    parent = client.get_run(read_run_info(paths)["run_id"])
    assert json.loads(parent.data.tags["mtl.task_groups"]) == GROUPS
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["mtl.group"] for c in children) == sorted(",".join(g) for g in GROUPS)
    assert "test/shape/accuracy" in parent.data.metrics and "by_epoch/val/color/accuracy" in parent.data.metrics
    reference = client.get_run(json.loads(paths.all_in_one_metrics.read_text())["run"])
    assert reference.data.tags["mtl.kind"] == "all_in_one_reference"
