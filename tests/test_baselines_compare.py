"""Stages `baselines` and `compare`, and the task-relation reports of `train` and `evaluate`, on a tiny
built-in project: files and MLflow records read back and checked against their formulas."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtl_core.config import load_config
from mtl_core.evaluation.scoring import make_test_loader, score
from mtl_core.models.io import load_model
from mtl_core.paths import ProjectPaths
from mtl_core.pipeline import run_stage
from mtl_core.tracking.runs import read_run_info
from mtl_core.tracking.store import tracking_uri
from tests.conftest import write_params

TASKS = ["shape", "color", "size", "position"]


@pytest.fixture
def client(compared: Path) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri(load_config(compared / "params.yaml"), compared))
    return MlflowClient()


def test_one_single_task_model_per_task_scored_on_the_test_split(compared: Path):
    paths = ProjectPaths(compared)
    report = json.loads(paths.single_task_metrics.read_text())
    assert report["enabled"] is True and list(report["tasks"]) == TASKS
    cfg = load_config(compared / "params.yaml")
    for k, task in enumerate(TASKS):
        folder = paths.single_task_dir / task
        spec = json.loads((folder / "model_spec.json").read_text())
        assert list(spec["tasks"]) == [task]  # one head: a single-task network
        assert spec["arch"] == "hard_sharing" and spec["arch_options"] == {}  # plain, whatever the MTL arch
        model, _ = load_model(folder / "model_spec.json", folder / "model.safetensors")
        assert list(model.heads) == [task]
        per_task, *_ = score(model, make_test_loader(cfg, paths, [k], spec), torch.device("cpu"), amp=False)
        assert per_task[task]["accuracy"] == pytest.approx(report["tasks"][task]["accuracy"], abs=1e-9)
        # same budget as the multi-task model
        history = pd.read_csv(folder / "train_history.csv")
        assert list(history["epoch"]) == [1]


def test_comparison_is_delta_m_of_the_two_metric_files(compared: Path):
    paths = ProjectPaths(compared)
    mtl = json.loads(paths.test_metrics.read_text())["tasks"]
    stl = json.loads(paths.single_task_metrics.read_text())["tasks"]
    comparison = json.loads(paths.comparison.read_text())
    # the default compare.metrics: balanced accuracy decides, accuracy is listed too
    assert comparison["enabled"] is True and comparison["primary_metric"] == "balanced_accuracy"
    assert list(comparison["delta_m_pct"]) == ["balanced_accuracy", "accuracy"]
    for m in ("balanced_accuracy", "accuracy"):
        rel = {t: (mtl[t][m] - stl[t][m]) / stl[t][m] * 100 for t in TASKS}
        assert comparison["delta_m_pct"][m] == pytest.approx(sum(rel.values()) / len(TASKS))
        for t in TASKS:
            assert comparison["tasks"][t][m]["relative_pct"] == pytest.approx(rel[t])
    lower = [t for t in TASKS if mtl[t]["balanced_accuracy"] < stl[t]["balanced_accuracy"]]
    assert comparison["lower_than_single_task"] == lower
    # negative transfer: a task significantly worse than its single-task model (its interval below 0), not
    # any task whose difference is below 0 on 36 test images
    verdicts = comparison["verdicts"]
    assert comparison["negative_transfer"] == [t for t in TASKS if verdicts[t]["verdict"] == "worse"]
    for t in TASKS:
        v = verdicts[t]
        assert v["metric"] == "balanced_accuracy" and v["low"] <= v["difference"] <= v["high"]
        assert v["difference"] == pytest.approx(mtl[t]["balanced_accuracy"] - stl[t]["balanced_accuracy"])
        assert (v["verdict"] == "worse") == (v["high"] < 0) and (v["verdict"] == "better") == (v["low"] > 0)
    assert set(comparison["negative_transfer"]) <= set(lower)
    flat = json.loads((compared / "metrics.json").read_text())  # the DVC metrics file: means only
    assert flat == {
        "delta_m": pytest.approx(comparison["delta_m_pct"]["balanced_accuracy"]),
        "delta_m_accuracy": pytest.approx(comparison["delta_m_pct"]["accuracy"]),
        "negative_transfer_tasks": len(comparison["negative_transfer"]),
        "mean_mtl_balanced_accuracy": pytest.approx(sum(mtl[t]["balanced_accuracy"] for t in TASKS) / len(TASKS)),
        "mean_mtl_accuracy": pytest.approx(sum(mtl[t]["accuracy"] for t in TASKS) / len(TASKS)),
    }


def test_comparison_and_baselines_are_in_mlflow(compared: Path, client: MlflowClient):
    paths = ProjectPaths(compared)
    comparison = json.loads(paths.comparison.read_text())
    run = client.get_run(read_run_info(paths)["run_id"])
    for m in ("balanced_accuracy", "accuracy"):
        assert run.data.metrics[f"compare/delta_m_pct/{m}"] == pytest.approx(comparison["delta_m_pct"][m])
    assert run.data.metrics["compare/color/accuracy/relative_pct"] == pytest.approx(
        comparison["tasks"]["color"]["accuracy"]["relative_pct"]
    )
    assert run.data.tags["mtl.negative_transfer"] == (",".join(comparison["negative_transfer"]) or "none")
    # Δm where people look: the Results view's rounded column, and the run's description, which keeps
    # evaluate's per-task test table and adds the comparison table per task
    assert run.data.metrics["delta_m"] == round(comparison["delta_m_pct"]["balanced_accuracy"], 2)
    assert run.data.metrics["mean_bal_acc"] == round(json.loads(paths.test_metrics.read_text())["mean"]["balanced_accuracy"], 3)
    note = run.data.tags["mlflow.note.content"]
    assert note.index("Test split, per task:") < note.index("### Multi-task against single-task")
    assert f"**Δm = {comparison['delta_m_pct']['balanced_accuracy']:+.2f} %**" in note
    for task, values in comparison["tasks"].items():
        v = values["balanced_accuracy"]
        flag = "yes" if task in comparison["negative_transfer"] else ""
        assert f"| {task} | {v['mtl']:.3f} | {v['stl']:.3f} | {v['relative_pct']:+.2f} % |{f' {flag} ' if flag else ' '}|" in note
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="compare/comparison_table.json")).read_text())
    assert [row[0] for row in table["data"]] == TASKS

    stl = json.loads(paths.single_task_metrics.read_text())
    for task, run_id in stl["runs"].items():
        baseline = client.get_run(run_id)
        assert baseline.data.tags["mtl.kind"] == "single_task_baseline" and baseline.data.tags["mtl.task"] == task
        assert baseline.data.metrics[f"test/{task}/accuracy"] == pytest.approx(stl["tasks"][task]["accuracy"])
        # its params are those it was trained with: the plain network, plain training
        assert baseline.data.params["model.arch"] == "hard_sharing" and baseline.data.params["train.weighting"] == "equal"
        assert baseline.info.run_id != run.info.run_id


def test_gradient_cosine_matrices_per_epoch_written_and_logged(compared: Path, client: MlflowClient):
    paths = ProjectPaths(compared)
    report = json.loads(paths.gradient_cosine.read_text())
    assert report["tasks"] == TASKS and report["measured_every_steps"] == 2
    assert list(report["epochs"]) == ["1"]
    m = np.asarray(report["epochs"]["1"])
    assert m.shape == (4, 4)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-5)
    np.testing.assert_allclose(m, m.T, atol=1e-6)
    assert np.all(np.abs(m) <= 1 + 1e-6)
    assert paths.gradient_cosine.with_suffix(".png").stat().st_size > 0
    run_id = read_run_info(paths)["run_id"]
    logged = {a.path for a in client.list_artifacts(run_id, "task_relations")}
    assert {
        "task_relations/task_gradient_cosine.json", "task_relations/task_gradient_cosine.png",
        "task_relations/gradient_cosine_epoch_001.json", "task_relations/task_error_correlation.json",
        "task_relations/task_error_correlation.png",
    } <= logged  # fmt: skip


def test_error_correlation_recomputed_from_the_written_predictions(compared: Path):
    paths = ProjectPaths(compared)
    report = json.loads(paths.error_correlation.read_text())
    errors = pd.DataFrame(
        {t: (p["actual"] != p["predicted"]).astype(float) for t in TASKS for p in [pd.read_csv(paths.predictions_dir / f"{t}.csv")]}
    )
    expected = errors.corr().to_numpy()  # Pearson; NaN where a task's errors do not vary
    got = np.array([[np.nan if v is None else v for v in row] for row in report["correlation"]])
    np.testing.assert_allclose(got, expected, atol=1e-9, equal_nan=True)


def test_disabled_comparison_trains_nothing(tmp_path: Path, compared: Path):
    """compare.single_task: false (the default): both stages record that they are off."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(compared / "reports", root / "reports")
    write_params(root, {"compare": {"single_task": False}})
    baselines = run_stage("baselines", root=root)
    assert baselines["enabled"] is False
    paths = ProjectPaths(root)
    # no model, and a file that says why (an empty output folder: DVC warns on every repro)
    assert [f.name for f in paths.single_task_dir.iterdir()] == ["NOT_TRAINED.txt"]
    assert "compare.single_task is false" in (paths.single_task_dir / "NOT_TRAINED.txt").read_text()
    assert json.loads(paths.single_task_metrics.read_text())["enabled"] is False
    assert run_stage("compare", root=root)["enabled"] is False
    assert json.loads(paths.comparison.read_text()) == {"enabled": False, "reason": "compare.single_task is false"}


DISABLED_STAGES = """
import sys
from mtl_core.pipeline import run_stage
for stage in ("grouping", "baselines", "all_in_one"):
    assert run_stage(stage, root=sys.argv[1])["enabled"] is False
print(sorted(m for m in ("mlflow", "torchmetrics", "torch._dynamo", "mtl_core.training.engine") if m in sys.modules))
"""


def test_disabled_stages_start_without_the_trainer_or_mlflow(tmp_path: Path):
    """The default `dvc repro` runs baselines and all_in_one disabled: they must not pay the ~7 s of
    importing the trainer, torchmetrics and MLflow that a training stage does."""
    import subprocess
    import sys

    root = tmp_path / "project"
    root.mkdir()
    write_params(root, {"compare": {"single_task": False}})
    proc = subprocess.run([sys.executable, "-c", DISABLED_STAGES, str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_negative_transfer_names_the_suggested_grouping(compared: Path, client: MlflowClient):
    """The grouping is the one task_grouping proposes from the train stage's mean task-gradient cosines,
    in comparison.json and as a tag of the model's run; the all-in-one row of the solutions table is
    the trained model itself."""
    from mtl_core.evaluation.task_grouping import format_groups, mean_gradient_cosine, propose_grouping

    paths = ProjectPaths(compared)
    comparison = json.loads(paths.comparison.read_text())
    assert comparison["negative_transfer"], "precondition: the tiny project has negative transfer"
    tasks, affinity = mean_gradient_cosine(paths.gradient_cosine)
    expected = propose_grouping(affinity, tasks)
    assert comparison["suggested_task_groups"]["groups"] == expected.groups
    assert comparison["suggested_task_groups"]["score"] == pytest.approx(expected.score)
    run = client.get_run(read_run_info(paths)["run_id"])
    assert run.data.tags["mtl.suggested_task_groups"] == format_groups(expected.groups)
    solutions = comparison["solutions"]
    assert list(solutions) == ["all_in_one", "single_task"]
    assert solutions["all_in_one"]["delta_m_pct"] == pytest.approx(comparison["delta_m_pct"]["balanced_accuracy"])
    assert solutions["all_in_one"]["parameters"] == json.loads(paths.train_metrics.read_text())["parameters"]


# ------------------------------------------------------------------ compare.shared_input: batches paid once


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_baselines_replaying_the_first_tasks_batches_equal_separate_trainings(compared: Path, tmp_path: Path):
    """The stage's baselines (compare.shared_input, the default): the first task's training recorded
    its batches and the others replayed them (their runs say so), and each has, bit for bit, the weights
    of a training of its own that decodes and augments the data itself."""
    from safetensors.torch import load_file

    from mtl_core.tasks import TaskSpec
    from mtl_core.stages.baselines import single_task_config
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import ModelFiles

    paths = ProjectPaths(compared)
    cfg = single_task_config(load_config(compared / "params.yaml"))
    assert load_config(compared / "params.yaml").compare.shared_input is True
    mlflow.set_tracking_uri(tracking_uri(load_config(compared / "params.yaml"), compared))
    runs = {r.data.tags["mtl.task"]: r.data.tags for r in MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id], "tags.`mtl.stage` = 'baselines'")}  # fmt: skip
    assert {t: tags["mtl.input_batches"] for t, tags in runs.items()} == {
        "shape": "recorded", "color": "replayed", "size": "replayed", "position": "replayed"}
    assert not (paths.root / ".mtl").exists() or not list((paths.root / ".mtl").rglob("epoch-*.npy"))  # removed

    tasks = TaskSpec.load(paths.tasks_file)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("separate")
    for k in (1, 3):  # color and position, each trained alone, reading its own batches
        task = tasks.names[k]
        with mlflow.start_run():
            fit(cfg, paths, TaskSpec({task: tasks.classes[task]}), ModelFiles.in_folder(tmp_path / task), [k])
        alone, stage = load_file(str(tmp_path / task / "model.safetensors")), _weights(paths.single_task_dir / task)
        assert alone.keys() == stage.keys()
        for name in alone:
            assert torch.equal(alone[name], stage[name]), (task, name)


def test_a_recording_replays_every_epoch_and_a_partial_one_is_never_replayed(compared: Path, tmp_path: Path):
    """Two epochs of three batches (`train.max_steps_per_epoch`): task `size` trained on `shape`'s
    recording equals `size` trained alone; a recording cut off by a kill is not in place, so the next
    training reads (and records) the epoch itself."""
    from mtl_core.tasks import TaskSpec
    from mtl_core.stages.baselines import single_task_config
    from mtl_core.training.batch_cache import BatchCache
    from mtl_core.training.engine import fit
    from mtl_core.training.model_files import ModelFiles

    paths = ProjectPaths(compared)
    base = load_config(compared / "params.yaml")
    cfg = single_task_config(base.model_copy(update={"train": base.train.model_copy(update={"epochs": 2, "max_steps_per_epoch": 3})}))
    tasks = TaskSpec.load(paths.tasks_file)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("separate")

    def train(k: int, folder: str, batches: BatchCache | None) -> dict[str, torch.Tensor]:
        task = tasks.names[k]
        with mlflow.start_run():
            fit(cfg, paths, TaskSpec({task: tasks.classes[task]}), ModelFiles.in_folder(tmp_path / folder), [k], batches=batches)
        return _weights(tmp_path / folder)

    cache = BatchCache(tmp_path / "batches", {"config": "two short epochs"})
    train(0, "shape", cache)
    assert cache.events == [(1, "recorded"), (2, "recorded")]
    assert np.load(tmp_path / "batches" / "epoch-2.npy", mmap_mode="r").shape[0] == 3 * cfg.train.batch_size
    replayed = train(2, "size-replayed", cache)
    assert cache.events[2:] == [(1, "replayed"), (2, "replayed")] and cache.summary(2) == "replayed"
    alone = train(2, "size-alone", None)
    assert all(torch.equal(replayed[n], alone[n]) for n in alone)

    # a recording of another configuration, or one whose rename never happened, is not replayed
    other = BatchCache(tmp_path / "batches", {"config": "something else"})
    (tmp_path / "batches" / "epoch-1.json").unlink()  # as after a kill between the two writes
    train(2, "size-again", other)
    assert other.events == [(1, "recorded"), (2, "recorded")]
    assert all(torch.equal(_weights(tmp_path / "size-again")[n], alone[n]) for n in alone)


def test_another_weighting_is_compared_with_the_same_baselines(compared: Path, client: MlflowClient):
    """Runs last (it retrains the module's multi-task model): FAMO through train, evaluate and compare;
    the baselines' file is what compare reads, unchanged."""
    paths = ProjectPaths(compared)
    baselines_before = paths.single_task_metrics.read_text()
    write_params(compared, {
        "compare": {"single_task": True},
        "model": {"arch": "mmoe", "arch_options": {"num_experts": 2}},
        "train": {"epochs": 2, "task_affinity_every": 2, "weighting": "famo"},
    })  # fmt: skip
    for stage in ("train", "evaluate", "compare"):
        run_stage(stage, root=compared)
    run = client.get_run(read_run_info(paths)["run_id"])
    assert run.data.params["train.weighting"] == "famo"
    history = pd.read_csv(paths.train_history)
    weights = history[[f"weight/{t}" for t in TASKS]].to_numpy()
    assert np.isfinite(weights).all() and not np.allclose(weights, weights[0, 0])  # FAMO moved the weights
    assert paths.single_task_metrics.read_text() == baselines_before
    mtl = json.loads(paths.test_metrics.read_text())["tasks"]
    stl = json.loads(baselines_before)["tasks"]
    comparison = json.loads(paths.comparison.read_text())
    expected = sum((mtl[t]["accuracy"] - stl[t]["accuracy"]) / stl[t]["accuracy"] * 100 for t in TASKS) / len(TASKS)
    assert comparison["delta_m_pct"]["accuracy"] == pytest.approx(expected)
    assert run.data.metrics["compare/delta_m_pct/accuracy"] == pytest.approx(expected)
