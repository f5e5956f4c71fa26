"""Bad input a user can act on: one `mtl <stage>: error:` line and exit status 2, refused at params load
where it can be known then (cron and time zone as Prefect parses them, augmentations applied to an
image of the configured size, pretrained weights a backbone does not have), at ingest where it is a
property of the data (numbers written two ways, an unterminated quote, test classes absent from
training: a warning), and for every OSError (a full disk names the file and the space left, and leaves
no temporary file behind; a download without network says that a local weights file works)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO_ROOT, free_port, project_from, stage_env, write_params
from mtl_core.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """`mtl <argv>` in this process: its exit status and its stderr lines."""
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def set_params(root: Path, overrides: dict) -> None:
    write_params(root, overrides)


# --- params.yaml, refused at load ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"schedule": {"cron": "99 3 * * 1"}},
         "key 'schedule.cron': not a valid cron expression for Prefect's scheduler: '99 3 * * 1'"),
        ({"schedule": {"timezone": "Europe/Pari"}},
         "key 'schedule.timezone': unknown time zone 'Europe/Pari' (did you mean 'Europe/Paris'"),
        ({"model": {"backbone": "small_cnn", "pretrained": True}},
         "key 'model.pretrained': model.backbone 'small_cnn' has no pretrained weights"),
        ({"preprocess": {"augment": [{"name": "Resize", "height": 32, "width": 32}]}},
         "key 'preprocess.augment': preprocess.augment changes the image size from 64x64 to 32x32"),
        ({"preprocess": {"augment": [{"name": "RandomCrop", "height": 96, "width": 96, "p": 0.5}]}},
         "key 'preprocess.augment': preprocess.augment[0] (RandomCrop) fails on a 64x64 image (preprocess.image_size 64): CropSizeError"),
        ({"preprocess": {"augment": [{"name": "Affine", "p": 0.5}, {"name": "RandomFlop"}]}},
         "key 'preprocess.augment': preprocess.augment[1]: unknown Albumentations transform 'RandomFlop'"),
    ],
    ids=["cron", "timezone", "pretrained-small_cnn", "resize", "random-crop", "unknown-transform"],
)  # fmt: skip
def test_params_refused_at_load_before_any_stage_runs(overrides, message, tmp_path: Path, capsys) -> None:
    root = tmp_path / "project"
    (root / "data" / "datasets").mkdir(parents=True)
    set_params(root, overrides)
    code, err = run_cli(capsys, "ingest", "--root", str(root))
    assert code == 2
    assert err[0] == f"mtl ingest: error: {root / 'params.yaml'}: invalid parameters"
    assert message in err[1], err
    assert not any("Traceback" in line for line in err)
    assert not (root / "data" / "ingested").exists()  # refused before ingest wrote anything


def test_params_the_scheduler_accepts_load(tmp_path: Path) -> None:
    """The other side: what Prefect takes loads, and a size-keeping chain (pad, then crop back) too."""
    from mtl_core.config import config_from_dict

    cfg = config_from_dict({
        "schedule": {"cron": "*/15 2-4 * 1,6 mon-fri", "timezone": "Europe/Paris"},
        "preprocess": {"augment": [{"name": "PadIfNeeded", "min_height": 80, "min_width": 80},
                                   {"name": "RandomCrop", "height": 64, "width": 64}]},
    })  # fmt: skip
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=cfg.schedule.cron, timezone=cfg.schedule.timezone)  # what flows/deployment.py builds


# --- ingest: properties of the data -----------------------------------------------------------------


def csv_project(tmp_path: Path, rows: list[str], header: str, overrides: dict | None = None) -> Path:
    root = tmp_path / "project"
    folder = root / "data" / "datasets" / "d"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(len(rows)):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "labels.csv").write_text(header + "\n" + "".join(f"{r}\n" for r in rows))
    set_params(root, {"data": {"source": "data/datasets/d/labels.csv", **(overrides or {})}})
    return root


def test_labels_that_are_one_number_written_two_ways_are_refused(tmp_path: Path, capsys) -> None:
    # a spreadsheet wrote some cells of `size` as floats: '1' and '1.0' would be two classes
    rows = [f"{i}.png,{['a', 'b'][i % 2]},{['1', '2', '1.0', '2.0'][i % 4] if i >= 6 else ['1', '2'][i % 2]}" for i in range(40)]
    root = csv_project(tmp_path, rows, "path,shape,size")
    code, err = run_cli(capsys, "ingest", "--root", str(root))
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("mtl ingest: error: ")
    # line 1 is the header: row i is on line i + 2; '1.0' first at i = 6, '2.0' at i = 7
    assert "task 'size': labels '1' (first on line 2) and '1.0' (first on line 8) are the same number written 2 ways" in err[0]
    assert "'2' (first on line 3) and '2.0' (first on line 9)" in err[0]
    assert "Write each class one way in the CSV" in err[0]
    assert not (root / "data" / "ingested" / "manifest.csv").exists()


def test_test_classes_absent_from_training_are_warned_at_ingest(tmp_path: Path, caplog) -> None:
    # `id` has one class per image: no test (or val) class is ever seen in training
    rows = [f"{i}.png,{['a', 'b'][i % 2]},id{i}" for i in range(60)]
    root = csv_project(tmp_path, rows, "path,shape,id")
    with caplog.at_level(logging.WARNING):
        assert main(["ingest", "--root", str(root)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "no training image" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("ingest: task 'id': ")
    report = json.loads((root / "data" / "ingested" / "data_report.json").read_text())
    sizes = report["split_sizes"]
    assert sorted(report["classes_not_in_train"]) == ["id"]  # `shape` has both classes in every split
    assert len(report["classes_not_in_train"]["id"]["test"]) == sizes["test"]
    assert len(report["classes_not_in_train"]["id"]["val"]) == sizes["val"]
    assert f"{sizes['test']} test class(es)" in warnings[0]


def test_an_unterminated_quote_is_reported_at_its_own_line(tmp_path: Path, capsys) -> None:
    rows = [f"{i}.png,{['a', 'b'][i % 2]}" for i in range(150)]
    rows[60] = '60.png,"a'  # line 62 of the file (the header is line 1)
    root = csv_project(tmp_path, rows, "path,shape")
    code, err = run_cli(capsys, "ingest", "--root", str(root))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"mtl ingest: error: {root / 'data/datasets/d/labels.csv'} line 62: not a readable CSV: a quoted cell opened on line 62 is never closed")


# --- OSError: one line, the file, no temporary file left ------------------------------------------


def test_a_disk_too_small_for_the_dataset_is_one_line_not_a_traceback(tmp_path: Path, capsys) -> None:
    """ingest's DiskSpaceError (an OSError) on the real disk: 10^9 generated images need terabytes."""
    root = tmp_path / "project"
    (root / "data" / "datasets").mkdir(parents=True)
    set_params(root, {"data": {"builtin": {"num_images": 10**9}}})
    code, err = run_cli(capsys, "ingest", "--root", str(root))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mtl ingest: error: {root / 'data' / 'builtin'}: the built-in dataset (1000000000 images) needs ")
    assert "is free on that disk" in err[0]


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@pytest.mark.timeout(300)
def test_a_full_disk_during_a_checkpoint_names_the_file_and_leaves_no_temporary_file(tiny_data: Path, tmp_path: Path) -> None:
    """A real full disk: checkpoints/ on a 512 KB tmpfs (root only; skipped elsewhere). The run file fits,
    the first checkpoint (several MB) does not."""
    root = project_from(tiny_data, tmp_path, {"train": {"epochs": 1, "checkpoint_every_steps": 2}})
    checkpoints = root / "checkpoints"
    if not _mount_tmpfs(checkpoints, "512k"):
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mtl_core.cli", "train"], cwd=root, env=stage_env(root), capture_output=True, text=True, timeout=280
        )  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert lines[-1].startswith(f"mtl train: error: {checkpoints / 'train'}/.last.pt.tmp-"), lines[-1]
        assert ": No space left on device (" in lines[-1] and " free on that disk now)" in lines[-1]
        assert sorted(p.name for p in (checkpoints / "train").iterdir()) == ["run.json"]  # no torn temporary file
    finally:
        subprocess.run(["umount", str(checkpoints)], check=False)


@pytest.mark.timeout(300)
def test_pretrained_weights_without_network_say_a_local_file_works(tiny_data: Path, tmp_path: Path) -> None:
    """No network: every request goes to a proxy on a closed port of 127.0.0.1, and the weights cache
    (TORCH_HOME) is empty, so torchvision must download; nothing is downloaded."""
    root = project_from(tiny_data, tmp_path, {"model": {"backbone": "resnet18", "pretrained": True}, "train": {"epochs": 1}})
    env = stage_env(root)
    proxy = f"http://127.0.0.1:{free_port()}"
    env.update({"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy, "TORCH_HOME": str(tmp_path / "torch-home")})
    for var in ("NO_PROXY", "no_proxy"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "mtl_core.cli", "train"], cwd=root, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mtl train: error: model.pretrained: true: the pretrained weights could not be downloaded (URLError: ")
    assert "give a local weights file instead (model.pretrained: weights/<file>.safetensors" in last
