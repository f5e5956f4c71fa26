"""A retrain's result as a revision (mtl_core/revisions.py), on a real git repository and DVC project with a
local bare git remote and a local-folder DVC remote: the commit on its branch with dvc.lock and metrics,
the checkout left as it was, the data in the DVC remote, a failed push reported and not raised, a DVC
experiment. One tiny stage instead of the pipeline (tests/test_deployment.py runs the pipeline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtl_core.revisions import record_revision
from tests.conftest import stage_env

MAKE = """
import json, pathlib, yaml
seed = yaml.safe_load(open("params.yaml"))["seed"]
pathlib.Path("model.bin").write_bytes(bytes([seed]) * 1000)
pathlib.Path("metrics.json").write_text(json.dumps({"score": seed / 10}))
"""


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _dvc(root: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(root), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def project(tmp_path: Path) -> dict[str, Path]:
    root, bare, storage = tmp_path / "project", tmp_path / "remote.git", tmp_path / "dvc-storage"
    root.mkdir()
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "me@example.com")
    _git(root, "config", "user.name", "me")
    _git(root, "remote", "add", "origin", str(bare))
    _dvc(root, "init", "-q")
    _dvc(root, "remote", "add", "-d", "storage", str(storage))
    (root / "make.py").write_text(MAKE)
    (root / "params.yaml").write_text("seed: 1\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": f"{sys.executable} make.py", "deps": ["make.py"], "params": ["seed"],
        "outs": ["model.bin"], "metrics": [{"metrics.json": {"cache": False}}],
    }}}))  # fmt: skip
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "the project")
    return {"root": root, "bare": bare, "storage": storage}


def _retrain(root: Path, seed: int) -> None:
    (root / "params.yaml").write_text(f"seed: {seed}\n")
    _dvc(root, "repro")


def _model_md5(lock: dict) -> str:
    return next(o["md5"] for o in lock["stages"]["make"]["outs"] if o["path"] == "model.bin")


def _in_storage(storage: Path, md5: str) -> bool:
    return (storage / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def test_each_retrain_is_a_commit_on_the_branch_pushed_with_its_data(project):
    root, bare, storage = project["root"], project["bare"], project["storage"]
    head, revisions = _git(root, "rev-parse", "HEAD"), []
    for seed in (2, 3):
        _retrain(root, seed)
        status = _git(root, "status", "--porcelain")
        revision = record_revision(root, "commit", "retrains", f"retrain seed {seed}")
        assert revision.problems == [], revision.problems
        assert (revision.kind, revision.ref) == ("commit", "refs/heads/retrains")
        # the checkout is as it was: same branch, same commit, same changes
        assert _git(root, "rev-parse", "HEAD") == head and _git(root, "branch", "--show-current") == "main"
        assert _git(root, "status", "--porcelain") == status
        # the revision holds this retrain's params, dvc.lock and metrics
        assert _git(root, "show", f"{revision.commit}:params.yaml") == f"seed: {seed}"
        assert json.loads(_git(root, "show", f"{revision.commit}:metrics.json")) == {"score": seed / 10}
        lock = yaml.safe_load(_git(root, "show", f"{revision.commit}:dvc.lock"))
        md5 = _model_md5(lock)
        assert _in_storage(storage, md5), "the model is in the DVC remote"
        assert _git(bare, "rev-parse", "refs/heads/retrains") == revision.commit  # pushed
        revisions.append(revision.commit)
    # one after the other on the branch, the first one's parent the commit the checkout is on
    assert _git(root, "rev-list", "--first-parent", "retrains").split() == [*reversed(revisions), head]
    tags = record_revision(root, "none", "retrains", "x").as_tags()
    assert tags == {"mtl.revision_kind": "none", "mtl.revision_push": "not pushed (no remote)"}


def test_a_push_that_fails_is_reported_and_the_revision_kept(project, tmp_path: Path):
    root = project["root"]
    _git(root, "remote", "set-url", "origin", str(tmp_path / "no-such-remote.git"))
    _dvc(root, "remote", "modify", "storage", "url", "/proc/no-writing-here")
    _retrain(root, 4)
    revision = record_revision(root, "commit", "retrains", "retrain")
    assert revision.commit == _git(root, "rev-parse", "refs/heads/retrains")
    assert len(revision.problems) == 2 and revision.pushed == []
    assert revision.problems[0].startswith("dvc push to 'storage'") and "git remote 'origin'" in revision.problems[1]
    assert "dvc push" in revision.as_tags()["mtl.revision_push"]


def test_a_retrain_as_a_dvc_experiment_is_pushed_to_the_git_remote(project):
    root, bare, storage = project["root"], project["bare"], project["storage"]
    _retrain(root, 5)
    revision = record_revision(root, "experiment", "retrains", "retrain", experiment_name="retrain-5")
    assert revision.problems == [] and revision.kind == "experiment" and revision.ref.startswith("refs/exps/")
    assert "retrain-5" in _dvc(root, "exp", "list", "--name-only")
    assert _git(bare, "rev-parse", revision.ref) == revision.commit  # `dvc exp push`: the ref and the outputs
    lock = yaml.safe_load(_git(root, "show", f"{revision.commit}:dvc.lock"))
    assert _in_storage(storage, _model_md5(lock))


def test_outside_a_git_repository_nothing_is_recorded_and_it_says_why(tmp_path: Path):
    revision = record_revision(tmp_path, "commit", "retrains", "retrain")
    assert revision.kind == "none" and "not a git repository" in revision.problems[0]
