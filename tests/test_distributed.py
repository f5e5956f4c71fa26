"""Distributed training on CPU with gloo and real processes started by torchrun.

Two processes, each with half of every global batch, must train what one process with the whole batch
trains: the same weights (within float reduction-order noise), the same task-gradient measurements. The
backbone is `small_cnn_gn` (GroupNorm: per-sample normalisation, so splitting a batch changes nothing;
BatchNorm statistics on CPU are per process, PyTorch's SyncBatchNorm being CUDA-only). The training
split (171 images, global batch 32) ends with a batch of 11 that the two ranks split 6 / 5, and the
class weights (inverse_frequency) differ per shard: the losses are right only with the global
denominators.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, project_from, write_params
from distributed_fit import fit_methods

METHODS = ["equal", "famo", "pcgrad"]  # plain, loss-based (with its after-step forward), gradient surgery
TOLERANCE = 1e-3
"""|w_2proc - w_1proc| / |w_1proc - w_init| after one epoch (6 AdamW steps): float reduction order
alone gives about 1e-5 (equal, famo) to 5e-5 (pcgrad); a rank training on its half without the
reduction, or with its own denominators, gives about 0.1 and more."""

DDP_PARAMS = {
    "model": {"backbone": "small_cnn_gn"},
    "train": {"epochs": 1, "task_affinity_every": 2, "class_weights": "inverse_frequency"},
}


@pytest.fixture(scope="module")
def prepared(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return project_from(tiny_data, tmp_path_factory.mktemp("ddp"), DDP_PARAMS)


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def initial_weights(folder: Path) -> dict[str, torch.Tensor]:
    from mtl_core.models import build_model
    from mtl_core.runtime import seed_everything

    spec = json.loads((folder / "model_spec.json").read_text())
    seed_everything(0)  # what fit does before building the model
    model = build_model(spec["arch"], {t: len(c) for t, c in spec["tasks"].items()}, spec["backbone"], None, spec["arch_options"], stem=spec["stem"])
    return model.state_dict()


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[k].double().flatten() for k in sorted(weights)])


@pytest.fixture(scope="module")
def one_and_two(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("ddp-runs")
    two = torchrun(2, "tests/distributed_fit.py", str(prepared), str(out / "two"), *METHODS)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    fit_methods(prepared, out / "one", METHODS)
    return out / "one", out / "two"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_the_weights_one_process_trains(method: str, one_and_two: tuple[Path, Path]) -> None:
    one, two = (d / method for d in one_and_two)
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    start = flat(initial_weights(one))
    moved = (flat(w1) - start).norm()
    assert moved > 0.5  # it trained
    assert float((flat(w2) - flat(w1)).norm() / moved) < TOLERANCE


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_report_the_global_batch(method: str, one_and_two: tuple[Path, Path]) -> None:
    """Training and validation metrics, the images counted, and the task-gradient cosines (taken on the
    reduced per-task gradients) are the global batch's, not rank 0's half."""
    import pandas as pd

    one, two = (d / method for d in one_and_two)
    h1, h2 = pd.read_csv(one / "train_history.csv"), pd.read_csv(two / "train_history.csv")
    for col in ("train/mean/loss", "train/shape/accuracy", "val/mean/loss", "val/mean/accuracy", "val/size/accuracy"):
        assert h2[col].to_numpy() == pytest.approx(h1[col].to_numpy(), rel=1e-4, abs=1e-6), col
    c1 = np.asarray(json.loads((one / "task_gradient_cosine.json").read_text())["epochs"]["1"])
    c2 = np.asarray(json.loads((two / "task_gradient_cosine.json").read_text())["epochs"]["1"])
    assert np.allclose(c1, c2, atol=1e-3)
    s1, s2 = (json.loads((d / "train_metrics.json").read_text()) for d in (one, two))
    assert s2["device"] == "cpu x 2 processes"
    assert s2["best_val_mean_accuracy"] == pytest.approx(s1["best_val_mean_accuracy"])


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_dvc_repro_with_two_processes_resumes_a_kill_into_one_run_and_registers(tmp_path: Path) -> None:
    """`train.distributed.nproc_per_node: 2`: `dvc repro register` trains through torchrun. A SIGKILL of the
    ranks in epoch 2 fails the first repro; the second resumes the checkpoint rank 0 wrote, into the
    same MLflow run, and the pipeline ends with one finished training run and a registered model."""
    from mlflow.tracking import MlflowClient

    from conftest import copy_working_tree, stage_env

    clone = copy_working_tree(tmp_path / "repo")
    write_params(clone, {"train": {"epochs": 2, "checkpoint_every_steps": 2, "distributed": {"nproc_per_node": 2}}})
    env = {**stage_env(clone), "MTL_FAULT": "train.after_step:8", "MTL_FAULT_ONCE": str(tmp_path / "killed-once")}

    def repro() -> subprocess.CompletedProcess:
        # up to `register`: the stages after it (baselines, all_in_one, compare) train nothing by default
        return subprocess.run([sys.executable, "-m", "dvc", "repro", "register"], cwd=clone, env=env, capture_output=True, text=True, timeout=900)

    first = repro()
    assert first.returncode != 0 and (tmp_path / "killed-once").is_file(), first.stdout[-3000:] + first.stderr[-3000:]
    second = repro()
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    assert "starting 2 processes" in out and "resuming MLflow run" in out

    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mtl-pipeline")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mtl.stage` = 'train'")
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run, resumed; none left RUNNING or FAILED
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "by_epoch/val/mean/accuracy")]
    assert sorted(steps) == [1, 2]
    summary = json.loads((clone / "reports" / "train_metrics.json").read_text())
    assert summary["device"] == "cpu x 2 processes"
    versions = client.search_model_versions("name = 'mtl-shapes'")
    assert [v.run_id for v in versions] == [runs[0].info.run_id]
