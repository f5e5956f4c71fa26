"""Stopping a stage from outside: the whole process group ends within seconds, with one line and no
traceback, nothing is written after the stop, and the MLflow run open at that moment is marked KILLED
with the signal as its reason. Real signals to real processes: Ctrl-C's SIGINT to `mtl train` (with a
DataLoader worker), and SIGTERM to `dvc repro` (which does not forward it) while `mtl ingest` generates
images with its process pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import copy_working_tree, project_from, stage_env, write_params


def group_members(pgid: int) -> list[int]:
    """The processes of process group `pgid` that are still there (zombies included until reaped)."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getpgid(int(name)) == pgid:
                    members.append(int(name))
            except OSError:
                pass
    return members


def wait_group_gone(pgid: int, leader: subprocess.Popen, timeout: float) -> float:
    """Seconds until no process of the group is left (the leader reaped by us); fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        leader.poll()
        if not group_members(pgid):
            return time.monotonic() - start
        time.sleep(0.1)
    left = group_members(pgid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"processes of the group still running after {timeout} s: {left}")


@pytest.mark.timeout(300)
def test_ctrl_c_stops_training_and_its_workers_with_one_line(tiny_data: Path, tmp_path: Path) -> None:
    root = project_from(tiny_data, tmp_path, {"train": {"epochs": 3, "num_workers": 1}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtl_core.cli", "train"], cwd=root, env=stage_env(root), stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "epoch 1/3:" in line:
            break
    workers = [pid for pid in group_members(proc.pid) if pid != proc.pid]
    assert workers, "a DataLoader worker is running"
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends (to the foreground group; here to the stage)
    lines += proc.stderr.readlines()
    seconds = wait_group_gone(proc.pid, proc, timeout=30)
    assert proc.wait() == 128 + signal.SIGINT
    text = "".join(lines)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert lines[-1].startswith("mtl train: stopped by SIGINT: the stage and its worker processes ended, nothing is written after the stop")
    assert seconds < 15, seconds
    written = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    time.sleep(1)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == written  # nothing after the stop

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mtl-pipeline").experiment_id], "tags.`mtl.stage` = 'train'")
    assert (run.info.status, run.data.tags["mtl.failed_reason"]) == ("KILLED", "stopped by SIGINT")
    assert (root / "checkpoints" / "train" / "last.pt").is_file()  # the next `mtl train` resumes from it


@pytest.mark.timeout(600)
def test_sigterm_to_dvc_repro_ends_the_stage_and_its_pool(tmp_path: Path) -> None:
    """DVC dies of SIGTERM at once and does not forward it: the stage it started sees it gone and stops,
    with its process pool (ingest generating the built-in images), before writing its outputs."""
    clone = copy_working_tree(tmp_path / "repo")
    write_params(clone, {"data": {"builtin": {"num_images": 4000}}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "ingest"], cwd=clone, env=stage_env(clone), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while len(list((clone / "data" / "builtin").rglob("*.png"))) < 100:  # the pool is generating images
        assert proc.poll() is None and time.monotonic() < deadline, "".join(out)
        time.sleep(0.2)
    members = group_members(proc.pid)
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80] for pid in members}
    assert len(members) >= 3, commands  # dvc, mtl ingest, its pool
    os.kill(proc.pid, signal.SIGTERM)  # to DVC only
    seconds = wait_group_gone(proc.pid, proc, timeout=30)
    reader.join(timeout=30)
    text = "".join(out)
    assert seconds < 15, seconds
    assert "Traceback" not in text, text[-3000:]
    assert "mtl ingest: stopped by SIGTERM: the stage and its worker processes ended" in text, text[-3000:]
    assert not (clone / "data" / "ingested" / "manifest.csv").exists()
    assert not list(clone.rglob("*.tmp")), list(clone.rglob("*.tmp"))  # no half-written temporary file
    pngs = {p: p.stat().st_mtime_ns for p in (clone / "data" / "builtin").rglob("*.png")}
    time.sleep(1)
    assert {p: p.stat().st_mtime_ns for p in (clone / "data" / "builtin").rglob("*.png")} == pngs  # nothing after
