"""Exact resume after a real SIGKILL, checkpoints that survive a kill during their own write, a changed
config that is not resumed, the killed run failed rather than left RUNNING, and divergence that stops.

Every training here is a real `mtl train` process on the built-in data (small_cnn, 2 epochs of 6 steps,
a checkpoint every 2 steps); reruns whose output is not compared bit for bit run in this process. A run is killed by its own SIGKILL at a named point (mtl_core/faults.py),
the rerun resumes, and its results are compared bit for bit with an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import project_from, stage_env
from mtl_core.pipeline import run_stage
from mtl_core.training.loop import NonFiniteError

RESUME_PARAMS = {"train": {"epochs": 2, "checkpoint_every_steps": 2, "task_affinity_every": 2}}
STEPS_PER_EPOCH = 6  # 168 training images, batch 32


@pytest.fixture(scope="module")
def prepared(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data with the resume tests' parameters, copied by each test."""
    return project_from(tiny_data, tmp_path_factory.mktemp("resume"), RESUME_PARAMS)


def project(prepared: Path, dest: Path, train: dict | None = None) -> Path:
    root = dest / "project"
    shutil.copytree(prepared, root)
    if train:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["train"].update(train)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def mtl_train(root: Path, fault: str | None = None, *args: str) -> subprocess.CompletedProcess:
    env = stage_env(root)
    env.pop("MTL_FAULT", None)
    if fault:
        env["MTL_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "mtl_core.cli", "train", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )


def train_runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mtl-pipeline")
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`mtl.stage` = 'train'")


def history(root: Path) -> pd.DataFrame:
    frame = pd.read_csv(root / "reports" / "train_history.csv")
    return frame.drop(columns=[c for c in frame.columns if "images_per_second" in c])  # timings differ


def assert_same_training(a: Path, b: Path) -> None:
    """Bitwise: the best weights, the last-epoch state, and every per-epoch metric."""
    assert (a / "models" / "model.safetensors").read_bytes() == (b / "models" / "model.safetensors").read_bytes()
    last_a = torch.load(a / "models" / "checkpoint.pt", weights_only=True)["model"]
    last_b = torch.load(b / "models" / "checkpoint.pt", weights_only=True)["model"]
    assert last_a.keys() == last_b.keys()
    for k in last_a:
        assert torch.equal(last_a[k], last_b[k]), k
    pd.testing.assert_frame_equal(history(a), history(b), check_exact=True)


@pytest.fixture(scope="module")
def uninterrupted(prepared: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted run per method, made on first use."""
    made: dict[str, Path] = {}

    def get(weighting: str) -> Path:
        if weighting not in made:
            root = project(prepared, tmp_path_factory.mktemp(f"ref-{weighting}"), {"weighting": weighting})
            proc = mtl_train(root)
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[weighting] = root
        return made[weighting]

    return get


@pytest.mark.timeout(600)
# the methods with state of their own (FAMO's task logits, PCGrad's random task order); plain equal
# weighting resumes bit for bit in test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint
@pytest.mark.parametrize("weighting", ["famo", "pcgrad"])
def test_a_run_killed_in_epoch_2_resumes_to_the_same_weights(weighting: str, prepared: Path, uninterrupted, tmp_path: Path) -> None:
    root = project(prepared, tmp_path, {"weighting": weighting})
    killed = mtl_train(root, f"train.after_step:{STEPS_PER_EPOCH + 3}")  # epoch 2, after its 3rd step
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (root / "checkpoints" / "train" / "last.pt").is_file()
    client, runs = train_runs(root)
    assert [r.info.status for r in runs] == ["RUNNING"]  # what a kill leaves

    resumed = mtl_train(root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming MLflow run {runs[0].info.run_id}" in resumed.stderr
    assert "epoch 2, step 2 of it" in resumed.stderr  # the checkpoint every 2 steps, not the epoch's start
    assert_same_training(root, uninterrupted(weighting))
    assert not (root / "checkpoints" / "train").exists()  # finished: nothing left to resume

    client, runs = train_runs(root)
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run, the killed attempt's, finished
    for key in ("val/mean/accuracy", "train/mean/loss"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, f"by_epoch/{key}")]
        assert sorted(steps) == [1, 2], (key, steps)  # one value per epoch, none twice


@pytest.mark.timeout(600)
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(prepared: Path, uninterrupted, tmp_path: Path) -> None:
    root = project(prepared, tmp_path)
    # saves in epoch 1: after steps 2 and 4, then at the epoch's end: killed between write and rename of the 3rd
    killed = mtl_train(root, "checkpoint.before_rename:3")
    assert killed.returncode == -9
    folder = root / "checkpoints" / "train"
    assert list(folder.glob(".last.pt.tmp-*")), "the torn write is left behind"
    state = torch.load(folder / "last.pt", weights_only=True)
    assert (state["epoch"], state["progress"]["steps"]) == (1, 4)  # the previous checkpoint, whole

    resumed = mtl_train(root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1, step 4 of it" in resumed.stderr
    assert_same_training(root, uninterrupted("equal"))


@pytest.mark.timeout(600)
def test_a_changed_learning_rate_starts_over_and_fails_the_killed_run(prepared: Path, tmp_path: Path, caplog) -> None:
    root = project(prepared, tmp_path)
    assert mtl_train(root, f"train.after_step:{STEPS_PER_EPOCH + 3}").returncode == -9
    _, (killed_run,) = train_runs(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = 0.004
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    with caplog.at_level(logging.INFO):
        run_stage("train", root=root)
    assert "ignoring the checkpoint" in caplog.text and "train.lr: 0.003 -> 0.004" in caplog.text
    assert "resuming" not in caplog.text
    client, runs = train_runs(root)
    status = {r.info.run_id: r.info.status for r in runs}
    assert status.pop(killed_run.info.run_id) == "FAILED"  # can no longer be resumed: not left RUNNING
    assert list(status.values()) == ["FINISHED"]
    new_run = client.get_run(next(iter(status)))
    assert new_run.data.params["train.lr"] == "0.004"
    assert [m.step for m in client.get_metric_history(new_run.info.run_id, "by_epoch/val/mean/accuracy")] == [1, 2]


@pytest.mark.timeout(600)
def test_fresh_ignores_a_matching_checkpoint(prepared: Path, tmp_path: Path, caplog) -> None:
    root = project(prepared, tmp_path, {"epochs": 1})
    assert mtl_train(root, "train.after_step:3").returncode == -9
    from mtl_core.cli import build_parser

    assert build_parser().parse_args(["train", "--fresh"]).fresh  # what `mtl train --fresh` passes on
    with caplog.at_level(logging.INFO):
        run_stage("train", root=root, fresh=True)
    assert "--fresh: ignoring the checkpoint" in caplog.text and "resuming" not in caplog.text
    _, runs = train_runs(root)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]


@pytest.mark.timeout(600)
def test_a_diverging_run_stops_naming_epoch_step_and_task(prepared: Path, tmp_path: Path) -> None:
    root = project(prepared, tmp_path, {"lr": 1e30, "epochs": 1})
    proc = mtl_train(root)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("mtl train: error: non-finite loss of task(s) ")
    assert "at epoch 1, step 2 " in message and "shape" in message, message  # step 1 sends the weights to ~1e30
    _, runs = train_runs(root)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (root / "models" / "model.safetensors").exists()  # nothing for evaluate or register to take


def test_skip_drops_non_finite_batches_up_to_the_limit(prepared: Path, tmp_path: Path) -> None:
    root = project(prepared, tmp_path, {"lr": 1e30, "epochs": 1, "on_nonfinite": "skip", "max_skipped_steps": 2})
    with pytest.raises(NonFiniteError, match=r"3 batches skipped, more than train.max_skipped_steps \(2\)"):
        run_stage("train", root=root)


@pytest.mark.timeout(600)
def test_the_baselines_stage_resumes_per_task(prepared: Path, tmp_path: Path) -> None:
    """Killed while training the second task's baseline: the rerun restores the first (finished, not
    retrained), resumes the second from its checkpoint, trains the rest; one finished run per task."""
    root = project(prepared, tmp_path, {"epochs": 1})
    env = stage_env(root)
    env["MTL_FAULT"] = f"train.after_step:{STEPS_PER_EPOCH + 3}"  # task 2, step 3 of its one epoch
    cmd = [sys.executable, "-m", "mtl_core.cli", "baselines"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compare"]["single_task"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    killed = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mtl-pipeline").experiment_id
    before = {r.data.tags["mtl.task"]: r for r in client.search_runs([exp], "tags.`mtl.stage` = 'baselines'")}
    assert {t: r.info.status for t, r in before.items()} == {"shape": "FINISHED", "color": "RUNNING"}

    env.pop("MTL_FAULT")
    rerun = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming MLflow run {before['shape'].info.run_id}" in rerun.stderr and "after epoch 1 (finished)" in rerun.stderr
    assert f"resuming MLflow run {before['color'].info.run_id}" in rerun.stderr and "epoch 1, step 2 of it" in rerun.stderr
    after = {r.data.tags["mtl.task"]: r for r in client.search_runs([exp], "tags.`mtl.stage` = 'baselines'")}
    assert sorted(after) == ["color", "position", "shape", "size"]
    assert all(r.info.status == "FINISHED" for r in after.values())
    assert {t: after[t].info.run_id for t in before} == {t: r.info.run_id for t, r in before.items()}
    assert [m.step for m in client.get_metric_history(after["shape"].info.run_id, "by_epoch/val/mean/accuracy")] == [1]
    report = __import__("json").loads((root / "reports" / "single_task_metrics.json").read_text())
    assert sorted(report["tasks"]) == ["color", "position", "shape", "size"]
    assert not (root / "checkpoints" / "baselines").exists()


@pytest.mark.timeout(600)
def test_an_unreadable_checkpoint_starts_a_new_run_and_fails_the_old_one(prepared: Path, tmp_path: Path, caplog) -> None:
    """Killed in epoch 2 (epoch 1 logged), then the checkpoint is garbage: training again from epoch 1 in
    the killed run would give its history two values for epoch 1. A new run trains; the old one is
    FAILED with the reason; each run's history holds each epoch once."""
    root = project(prepared, tmp_path)
    assert mtl_train(root, f"train.after_step:{STEPS_PER_EPOCH + 3}").returncode == -9
    _, (killed,) = train_runs(root)
    last = root / "checkpoints" / "train" / "last.pt"
    last.write_bytes(b"not a checkpoint" * 100)

    with caplog.at_level(logging.INFO):
        run_stage("train", root=root)
    assert "ignoring the unreadable checkpoint" in caplog.text
    assert f"MLflow run {killed.info.run_id} marked FAILED (unreadable checkpoint); training from epoch 1 in a new run" in caplog.text
    assert "killed before its first checkpoint" not in caplog.text
    client, runs = train_runs(root)
    by_id = {r.info.run_id: r for r in runs}
    old = by_id.pop(killed.info.run_id)
    (new,) = by_id.values()
    assert (old.info.status, old.data.tags["mtl.failed_reason"]) == ("FAILED", "unreadable checkpoint")
    assert new.info.status == "FINISHED"
    for key in ("by_epoch/val/mean/accuracy", "by_epoch/train/mean/loss"):  # training.sink.curve_metric
        assert [m.step for m in client.get_metric_history(old.info.run_id, key)] == [1], key
        assert sorted(m.step for m in client.get_metric_history(new.info.run_id, key)) == [1, 2], key
    assert json.loads((root / "models" / "mlflow_run.json").read_text())["run_id"] == new.info.run_id


@pytest.mark.timeout(600)
def test_a_run_that_draws_from_the_global_generators_resumes_exactly(prepared: Path, tmp_path: Path) -> None:
    """Dropout before the heads draws from torch's global generator at every step: the resumed run equals
    the uninterrupted one only because the checkpoint's saved generator states are restored (without
    training.state.restore_rng the masks after the resume differ, and so do the weights)."""
    runs = {}
    for name, fault in (("uninterrupted", None), ("killed", f"train.after_step:{STEPS_PER_EPOCH + 3}")):
        root = project(prepared, tmp_path / name)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["model"]["arch_options"] = {"dropout": 0.5}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        first = mtl_train(root, fault)
        assert first.returncode == (-9 if fault else 0), first.stderr[-3000:]
        if fault:
            resumed = mtl_train(root)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert "epoch 2, step 2 of it" in resumed.stderr
        runs[name] = root
    assert_same_training(runs["killed"], runs["uninterrupted"])
