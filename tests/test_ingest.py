"""Stage `ingest`: user manifests and every kind of bad input, with clear errors and no silent drops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtl_core.config import config_from_dict
from mtl_core.data.manifest import IngestError
from mtl_core.stages.ingest import run_ingest
from mtl_core.paths import ProjectPaths


def make_faces(root: Path, n: int = 40, seed: int = 0) -> Path:
    """A small user dataset: images/ + labels.csv with path,gender,age_group,glasses."""
    rng = np.random.default_rng(seed)
    folder = root / "data" / "datasets" / "faces"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        rows.append({
            "path": f"images/{i}.png", "gender": ["f", "m"][i % 2],
            "age_group": ["young", "adult", "senior"][i % 3], "glasses": ["yes", "no"][(i // 2) % 2],
        })  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def cfg_for(csv: Path, **data):
    return config_from_dict({"data": {"source": str(csv), **data}})


def test_user_manifest_is_normalised_split_and_reported(tmp_path: Path):
    csv = make_faces(tmp_path, n=60)
    result = run_ingest(cfg_for(csv, tasks=["gender", "glasses"]), tmp_path)
    manifest = pd.read_csv(result.manifest)
    assert list(manifest.columns) == ["row", "path", "gender", "glasses", "split"]
    assert len(manifest) == 60 and result.rows_rejected == 0
    # paths are relative to the project, so the output is valid in another clone
    assert manifest["path"].iloc[0] == "data/datasets/faces/images/0.png"
    assert set(manifest["split"]) == {"train", "val", "test"}
    report = json.loads(result.report.read_text())
    assert report["rows_kept"] == 60 and report["rows_rejected"] == 0
    assert report["tasks"] == {"gender": ["f", "m"], "glasses": ["no", "yes"]}
    counts = report["class_counts"]["gender"]
    assert sum(sum(c.values()) for c in counts.values()) == 60
    assert sum(counts["train"].values()) == report["split_sizes"]["train"]


def test_all_label_columns_are_tasks_by_default(tmp_path: Path):
    result = run_ingest(cfg_for(make_faces(tmp_path)), tmp_path)
    assert list(json.loads(result.report.read_text())["tasks"]) == ["gender", "age_group", "glasses"]


def test_missing_csv_names_the_file(tmp_path: Path):
    with pytest.raises(IngestError, match=r"manifest not found: .*nowhere\.csv"):
        run_ingest(cfg_for(tmp_path / "nowhere.csv"), tmp_path)


def test_missing_path_column(tmp_path: Path):
    csv = make_faces(tmp_path)
    pd.read_csv(csv).rename(columns={"path": "file"}).to_csv(csv, index=False)
    with pytest.raises(IngestError, match=r"labels\.csv: no 'path' column; columns found: file, gender"):
        run_ingest(cfg_for(csv), tmp_path)


def test_unknown_task_column(tmp_path: Path):
    csv = make_faces(tmp_path)
    with pytest.raises(IngestError, match=r"task column\(s\) 'hair' not in the manifest; label columns found: gender, age_group, glasses"):
        run_ingest(cfg_for(csv, tasks=["gender", "hair"]), tmp_path)


def test_task_with_one_class(tmp_path: Path):
    csv = make_faces(tmp_path)
    df = pd.read_csv(csv)
    df["glasses"] = "no"
    df.to_csv(csv, index=False)
    with pytest.raises(IngestError, match=r"task 'glasses' has a single class \('no'\)"):
        run_ingest(cfg_for(csv), tmp_path)


def test_bad_rows_are_reported_with_reasons_never_dropped_silently(tmp_path: Path):
    csv = make_faces(tmp_path, n=40)
    folder = csv.parent
    (folder / "images" / "3.png").write_bytes(b"this is not a png")  # unreadable image
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    df = pd.read_csv(csv, dtype=str)
    df.loc[5, "path"] = "../../../secret.png"  # escapes the dataset folder (the file exists)
    df.loc[6, "path"] = str(outside)  # absolute path outside the folder
    df.loc[7, "path"] = "images/missing.png"
    df.loc[8, "age_group"] = ""  # missing label
    df.to_csv(csv, index=False)

    result = run_ingest(cfg_for(csv, max_rejected_fraction=0.5), tmp_path)
    rejected = pd.read_csv(result.rejected).set_index("row")
    # CSV line numbers: data row i is on line i + 2
    assert rejected.loc[5, "reason"].startswith("image does not decode")
    assert "escapes the dataset folder" in rejected.loc[7, "reason"]
    assert "escapes the dataset folder" in rejected.loc[8, "reason"]
    assert rejected.loc[9, "reason"] == "file not found"
    assert rejected.loc[10, "reason"] == "missing label for task(s) 'age_group'"
    assert len(rejected) == 5 and result.rows_kept == 35
    manifest = pd.read_csv(result.manifest)
    assert not manifest["path"].str.contains("secret").any()
    assert set(manifest["row"]).isdisjoint(rejected.index)
    report = json.loads(result.report.read_text())
    assert report["rows_rejected"] == 5 and report["rows_total"] == 40


def test_too_many_rejections_fail_and_name_the_first_bad_rows(tmp_path: Path):
    csv = make_faces(tmp_path, n=20)
    df = pd.read_csv(csv, dtype=str)
    df.loc[[2, 4, 6], "path"] = "images/gone.png"
    df.to_csv(csv, index=False)
    with pytest.raises(IngestError) as err:
        run_ingest(cfg_for(csv, max_rejected_fraction=0.1), tmp_path)
    msg = str(err.value)
    assert "3 of 20 rows rejected (15.0%)" in msg
    assert "row 4 (images/gone.png): file not found" in msg
    # the rejection report is written even when the stage fails
    assert len(pd.read_csv(ProjectPaths(tmp_path).rejected)) == 3


def test_builtin_source_goes_through_the_same_path(tiny_project: Path):
    cfg = config_from_dict({"data": {"builtin": {"num_images": 120}}})
    result = run_ingest(cfg, tiny_project)
    manifest = pd.read_csv(result.manifest)
    assert len(manifest) == 120
    assert list(manifest.columns) == ["row", "path", "shape", "color", "size", "position", "split"]
    assert (tiny_project / manifest["path"].iloc[0]).is_file()
