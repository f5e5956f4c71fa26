"""Leak-free splits: duplicates found and merged or rejected, the manifest's own split column, groups
kept whole, splits that would be empty refused; the leakage statement checked against the files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl_core.config import ConfigError, config_from_dict
from mtl_core.data.manifest import IngestError
from mtl_core.stages.ingest import run_ingest
from mtl_core.data.split import grouped_split, shared_keys
from mtl_core.paths import SPLITS
from tests.test_ingest import make_faces

TASKS = ["gender", "age_group", "glasses"]


def cfg_for(csv: Path, **data):
    return config_from_dict({"data": {"source": str(csv), **data}})


def read(result) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    manifest, rejected = (
        pd.read_csv(p, dtype=str, keep_default_na=False).astype({"row": int}) for p in (result.manifest, result.rejected)
    )
    return manifest, rejected, json.loads(result.report.read_text())


def splits_of_each_file(manifest: pd.DataFrame, root: Path) -> dict[str, set[str]]:
    """sha256 of each file's bytes -> the splits it is in (computed here, not by the code under test)."""
    where: dict[str, set[str]] = {}
    for path, split in zip(manifest["path"], manifest["split"]):
        where.setdefault(hashlib.sha256((root / path).read_bytes()).hexdigest(), set()).add(split)
    return where


# --- duplicates -------------------------------------------------------------------------------------------


def test_duplicated_rows_are_merged_and_never_cross_splits(tmp_path: Path):
    """The issue's case: 60 duplicated rows of 200; before, 14 of those images landed in train and test."""
    csv = make_faces(tmp_path, n=200)
    folder = csv.parent
    df = pd.read_csv(csv, dtype=str)
    for i in range(30, 60):  # the same bytes under another name (an export that copied files)
        shutil.copy(folder / "images" / f"{i}.png", folder / "images" / f"copy{i}.png")
    again = df.iloc[:30].copy()  # the same path twice
    copies = df.iloc[30:60].copy()
    copies["path"] = [f"images/copy{i}.png" for i in range(30, 60)]
    pd.concat([df, again, copies]).to_csv(csv, index=False)  # lines 2-201, 202-231, 232-261

    manifest, rejected, report = read(run_ingest(cfg_for(csv), tmp_path))
    assert len(manifest) == 200 and rejected.empty
    assert manifest["row"].tolist() == list(range(2, 202))  # the first row of each image is the one kept
    where = splits_of_each_file(manifest, tmp_path)
    assert len(where) == 200 and all(len(s) == 1 for s in where.values())
    dup = report["duplicates"]
    assert dup["rows_merged"] == 60 and dup["rows_rejected_conflicting"] == 0
    merged = {m["kept_row"]: m for m in dup["merged"]}
    assert merged[2] == {"kept_row": 2, "merged_rows": [202], "why": "same path", "paths": ["images/0.png"]}
    assert merged[32] == {
        "kept_row": 32, "merged_rows": [232], "why": "same file content", "paths": ["images/30.png", "images/copy30.png"],
    }  # fmt: skip
    assert report["leakage"] == {"statement": "no image and no group appears in two splits", "checked": True, "images": 200, "groups": None}


def test_duplicates_with_conflicting_labels_are_all_rejected_with_the_reason(tmp_path: Path):
    csv = make_faces(tmp_path, n=60)
    df = pd.read_csv(csv, dtype=str)
    shutil.copy(csv.parent / "images" / "4.png", csv.parent / "images" / "again.png")
    extra = pd.DataFrame([
        {"path": "images/3.png", "gender": "f", "age_group": "young", "glasses": "no"},  # line 62: row 5 says m
        {"path": "images/again.png", "gender": "f", "age_group": "adult", "glasses": "no"},  # line 63: row 6 says yes
    ])  # fmt: skip
    pd.concat([df, extra]).to_csv(csv, index=False)
    manifest, rejected, report = read(run_ingest(cfg_for(csv, max_rejected_fraction=0.1), tmp_path))
    reasons = rejected.set_index("row")["reason"].to_dict()
    assert reasons == {
        5: "conflicting duplicate: same path as line(s) 62, with gender 'm' here, 'f' on line 62",
        62: "conflicting duplicate: same path as line(s) 5, with gender 'f' here, 'm' on line 5",
        6: "conflicting duplicate: same file content as line(s) 63, with glasses 'yes' here, 'no' on line 63",
        63: "conflicting duplicate: same file content as line(s) 6, with glasses 'no' here, 'yes' on line 6",
    }
    assert rejected.set_index("row")["path"][63] == "images/again.png"
    assert len(manifest) == 58 and not set(manifest["row"]) & {5, 6, 62, 63}
    assert report["duplicates"]["rows_rejected_conflicting"] == 4 and report["duplicates"]["rows_merged"] == 0
    assert report["rejected_reasons"] == {"conflicting duplicate": 4}


# --- the manifest's own split -------------------------------------------------------------------------------


def test_split_column_is_the_split_and_is_reported(tmp_path: Path):
    csv = make_faces(tmp_path, n=40)
    df = pd.read_csv(csv, dtype=str)
    given = ["Train", "validation ", "test", "train", "VAL"] * 8
    df["split"] = given
    df.loc[7, "split"] = "training"  # line 9: not a split name
    df.loc[8, "split"] = ""  # line 10
    df.to_csv(csv, index=False)
    # fractions and seed that a ratio split would use differently: they are not used
    cfg = cfg_for(csv, max_rejected_fraction=0.1, split={"train": 0.2, "val": 0.4, "test": 0.4, "seed": 3})
    manifest, rejected, report = read(run_ingest(cfg, tmp_path))
    expected = {"train": "train", "validation": "val", "test": "test", "val": "val"}
    for row, split in zip(manifest["row"], manifest["split"]):
        assert split == expected[given[row - 2].strip().lower()]
    assert rejected.set_index("row")["reason"].to_dict() == {
        9: "split column: 'training' is not one of train, val, valid, validation, test",
        10: "split column: empty (give train, val or test)",
    }
    assert "split" not in report["tasks"] and list(manifest.columns) == ["row", "path", *TASKS, "split"]
    assert report["split"]["method"] == "column" and "data.split fractions not used" in report["split"]["source"]
    assert report["split_sizes"] == {"train": 15, "val": 16, "test": 7}  # 16 16 8, less lines 9 (test) and 10 (train)


def test_duplicates_in_two_given_splits_are_rejected(tmp_path: Path):
    csv = make_faces(tmp_path, n=40)
    df = pd.read_csv(csv, dtype=str)
    df["split"] = ["train", "val", "test", "train"] * 10
    extra = df.iloc[[0]].assign(split="test")  # line 42: the image of line 2, in test this time
    pd.concat([df, extra]).to_csv(csv, index=False)
    manifest, rejected, _ = read(run_ingest(cfg_for(csv, max_rejected_fraction=0.1), tmp_path))
    assert sorted(rejected["row"]) == [2, 42]
    assert rejected.set_index("row")["reason"][2].endswith("split 'train' here, 'test' on line 42")
    assert all(len(s) == 1 for s in splits_of_each_file(manifest, tmp_path).values())


# --- groups -------------------------------------------------------------------------------------------------


def grouped_faces(root: Path, n_groups: int = 40, seed: int = 0) -> Path:
    """Groups of 1 to 6 rows (a person photographed several times); labels mostly follow the person."""
    csv = make_faces(root, n=200)
    df = pd.read_csv(csv, dtype=str)
    rng = np.random.default_rng(seed)
    df["person"] = [f"p{g:03d}" for g in rng.integers(0, n_groups, len(df))]
    df.to_csv(csv, index=False)
    return csv


def test_groups_stay_whole_and_classes_stay_balanced(tmp_path: Path):
    csv = grouped_faces(tmp_path)
    manifest, _, report = read(run_ingest(cfg_for(csv, split={"group_column": "person"}), tmp_path))
    person = pd.read_csv(csv, dtype=str)["person"]
    manifest["person"] = [person[r - 2] for r in manifest["row"]]
    assert (manifest.groupby("person")["split"].nunique() == 1).all()  # no person in two splits
    assert "person" not in manifest.columns[:-1].tolist() and "person" not in report["tasks"]
    # the largest deviation, recomputed here: |share of a class in a split - its share overall|
    worst = 0.0
    for t in TASKS:
        overall = manifest[t].value_counts(normalize=True)
        for s in SPLITS:
            part = manifest.loc[manifest["split"] == s, t].value_counts(normalize=True)
            worst = max(worst, float((part.reindex(overall.index, fill_value=0) - overall).abs().max()))
    dev = report["split"]["largest_class_share_deviation"]
    assert dev["deviation"] == pytest.approx(worst, abs=1e-4) and worst < 0.1
    sizes = manifest["split"].value_counts(normalize=True)
    assert abs(sizes["train"] - 0.7) < 0.05 and abs(sizes["val"] - 0.15) < 0.05
    assert report["split"]["method"] == "grouped" and sum(report["split"]["groups"].values()) == manifest["person"].nunique()
    assert report["leakage"]["groups"] == manifest["person"].nunique()
    # per-split class counts, in the report, match the manifest
    for t in TASKS:
        for s in SPLITS:
            assert report["class_counts"][t][s] == manifest.loc[manifest["split"] == s, t].value_counts().sort_index().to_dict()


def test_grouped_split_beats_a_random_group_assignment():
    """On data where groups carry their labels, the greedy's class balance is far closer than chance."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(300), rng.integers(1, 8, 300))
    codes = np.stack([rng.integers(0, 4, 300)[groups], rng.integers(0, 3, 300)[groups]], axis=1)
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}

    def worst(which: np.ndarray) -> float:
        out = 0.0
        for t, k in enumerate((4, 3)):
            overall = np.bincount(codes[:, t], minlength=k) / len(codes)
            for s in range(3):
                share = np.bincount(codes[which == s, t], minlength=k) / max((which == s).sum(), 1)
                out = max(out, float(np.abs(share - overall).max()))
        return out

    which = grouped_split(codes, [4, 3], groups, fractions, seed=1)
    assert len(shared_keys(groups, which)) == 0
    assert np.array_equal(which, grouped_split(codes, [4, 3], groups, fractions, seed=1))
    assert not np.array_equal(which, grouped_split(codes, [4, 3], groups, fractions, seed=2))
    chance = np.median([worst(rng.choice(3, 300, p=[0.7, 0.15, 0.15])[groups]) for _ in range(20)])
    assert worst(which) < chance / 3
    assert np.abs(np.bincount(which) / len(which) - [0.7, 0.15, 0.15]).max() < 0.01


def test_shared_keys_finds_what_crosses_splits():
    keys = np.array([b"a", b"b", b"a", b"c", b"b", b"d"], dtype="S1")
    which = np.array([0, 1, 0, 2, 2, 1], dtype=np.int8)
    # a: train twice (fine); b: val and test (leak); c, d: once
    assert shared_keys(keys, which).tolist() == [1]


def test_given_split_that_breaks_a_group_is_refused(tmp_path: Path):
    csv = grouped_faces(tmp_path, n_groups=20)
    df = pd.read_csv(csv, dtype=str)
    df["split"] = ["train", "train", "val", "test"] * 50  # ignores who is who
    df.to_csv(csv, index=False)
    with pytest.raises(IngestError, match=r"'split' column puts \d+ group\(s\) of 'person' in more than one split \(e\.g\. 'p0"):
        run_ingest(cfg_for(csv, split={"group_column": "person"}), tmp_path)


def test_group_column_problems_are_named(tmp_path: Path):
    csv = grouped_faces(tmp_path)
    with pytest.raises(IngestError, match=r"group column 'patient' \(data.split.group_column\) not in the manifest"):
        run_ingest(cfg_for(csv, split={"group_column": "patient"}), tmp_path)
    with pytest.raises(ConfigError, match=r"group_column 'gender' is also in tasks"):
        cfg_for(csv, tasks=["gender"], split={"group_column": "gender"})
    df = pd.read_csv(csv, dtype=str)
    df.loc[3, "person"] = " "
    df.to_csv(csv, index=False)
    _, rejected, _ = read(run_ingest(cfg_for(csv, split={"group_column": "person"}), tmp_path))
    assert rejected[["row", "reason"]].values.tolist() == [[5, "group column 'person': empty"]]


# --- splits that cannot work ----------------------------------------------------------------------------------


def test_an_empty_validation_split_is_refused_with_the_reason(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"key 'data.split.val': must be above 0, or the val split is empty: training keeps"):
        config_from_dict({"data": {"split": {"train": 0.85, "val": 0, "test": 0.15}}})
    csv = make_faces(tmp_path, n=12)  # 12 rows, 6 strata of 2: val at 2% gets none
    with pytest.raises(IngestError, match=r"data.split leaves the 'val' split empty \(12 rows: train \d+, val 0, test \d+\); raise data.split.val \(0.02\)"):
        run_ingest(cfg_for(csv, tasks=["gender"], split={"train": 0.49, "val": 0.02, "test": 0.49}), tmp_path)
    df = pd.read_csv(csv, dtype=str)
    df["split"] = ["train", "test"] * 6
    df.to_csv(csv, index=False)
    with pytest.raises(IngestError, match=r"the manifest's 'split' column leaves the 'val' split empty .*put rows in 'val'"):
        run_ingest(cfg_for(csv), tmp_path)


def test_a_task_without_a_labelled_validation_row_is_refused(tmp_path: Path):
    csv = make_faces(tmp_path, n=40)
    df = pd.read_csv(csv, dtype=str)
    df["split"] = ["train", "val", "test", "train"] * 10
    df.loc[df["split"] == "val", "glasses"] = ""  # glasses: never labelled in val
    df.to_csv(csv, index=False)
    with pytest.raises(IngestError, match=r"task 'glasses' has no labelled row in the 'val' split \(the manifest's 'split' column, 10 rows there\)"):
        run_ingest(cfg_for(csv, missing_labels="allow"), tmp_path)
