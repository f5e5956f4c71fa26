"""Choosing a method for your data: a DVC experiments sweep over `train.weighting`, as the README shows it.

The pipeline up to `compare`, committed; one queued experiment per method with a grid override
(`-S train.weighting=a,b`); the queue run; then the sweep read back from `dvc exp show` (the method, Δm
and the means over tasks as columns), from `dvc metrics diff --targets` (the per-task reports, committed
in every revision but not DVC metrics files: forty tasks would make a table no terminal shows) and from
MLflow (one run per experiment, named and tagged by its
method, in the project's store). Kept cheap (the whole suite has a budget): 240 images at 32 px, one
epoch, the sweep stops at `compare`, and the baseline pipeline runs in this process, recorded by
`dvc commit` (the dvc.lock and run cache `dvc repro` would write, without one interpreter start per
stage; test_e2e_dvc.py covers `dvc repro` itself).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import networkx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import copy_working_tree, stage_env, write_params

pytestmark = pytest.mark.e2e
TASKS = ["shape", "color", "size", "position"]
# not the committed `equal`: `dvc commit` puts the train stage in DVC's run cache (`dvc repro` does not,
# for its cache: false output), so a trial with the committed params would be restored, not trained
METHODS = ["famo", "pcgrad"]  # a loss-based method with state, a gradient-surgery one: the README's sweep
METRICS_FILE = "metrics.json"  # the compare stage's flat metrics, tracked by git
# cache: false outputs of `ingest`: git-ignored, so not in the experiment's copy of the project; copied
# in (`-C`), the ingest stage is up to date there instead of running again
COPY_PATHS = ["data/ingested"]
# the README's table of a sweep
SHOW = ["--hide-workspace", "--drop", ".*", "--keep", "Experiment|train.weighting|delta_m.*|mean_mtl_.*|negative_transfer_tasks",
        "--sort-by", "delta_m", "--sort-order", "desc"]  # fmt: skip


def dvc(clone: Path, *args: str, timeout: int = 480) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=clone, env=stage_env(clone),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def git(clone: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=test@example.com", "-c", "user.name=test", *args], cwd=clone, check=True)


def experiments(shown: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The experiment revisions of `dvc exp show --json` (each baseline's `experiments`)."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            yield from exp["revs"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    start = time.monotonic()
    seconds: dict[str, float] = {}
    clone = copy_working_tree(tmp_path_factory.mktemp("exps") / "repo")
    write_params(clone, {
        "data": {"builtin": {"num_images": 240, "image_size": 32}}, "preprocess": {"image_size": 32},
        "train": {"epochs": 1, "task_affinity_every": 0}, "compare": {"single_task": True},
    })  # fmt: skip
    from dvc.repo import Repo

    from mtl_core.pipeline import run_stage

    with contextlib.chdir(clone), Repo(".") as repo:  # what `dvc repro compare` runs, in its order
        graph = repo.index.graph  # an edge from each stage to the stages it depends on
        compare = next(s for s in graph if s.name == "compare")
        needed = graph.subgraph(networkx.descendants(graph, compare) | {compare})
        stages = [s.name for s in reversed(list(networkx.topological_sort(needed)))]
    for stage in stages:
        run_stage(stage, root=clone)
    proc = dvc(clone, "commit", "--force", "--with-deps", "compare")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert json.loads(dvc(clone, "status", "--json", "compare").stdout) == {}
    git(clone, "add", "-A")  # experiments start from the last commit: params.yaml and dvc.lock with it
    git(clone, "commit", "-q", "-m", "baseline")
    seconds["baseline"] = time.monotonic() - start

    grid = "train.weighting=" + ",".join(METHODS)
    queued = dvc(clone, "exp", "run", "--queue", "-S", grid, *[a for p in COPY_PATHS for a in ("-C", p)], "compare")
    assert queued.returncode == 0, queued.stdout + queued.stderr
    ran = dvc(clone, "exp", "run", "--run-all")  # exits 0 even when an experiment failed: see exp show
    assert ran.returncode == 0, ran.stdout[-5000:] + ran.stderr[-5000:]
    seconds["sweep"] = time.monotonic() - start - seconds["baseline"]
    shown = dvc(clone, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    table = dvc(clone, "exp", "show", "--md", *SHOW)
    assert table.returncode == 0, table.stderr
    # each experiment's output (`dvc queue logs`), kept by DVC after the run
    logs = "\n".join(p.read_text() for p in sorted((clone / ".dvc" / "tmp" / "exps" / "run").glob("*/*.out")))
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"\nDVC experiments: {time.monotonic() - start:.0f} s ({phases})")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True).stdout
    names = sorted(r["name"] for r in experiments(json.loads(shown.stdout)))
    diffs = {}  # the committed baseline against an experiment, and one experiment against the other
    for old, new in [(head.strip(), names[0]), (names[0], names[-1])]:
        diff = dvc(clone, "metrics", "diff", old, new, "--all", "--json", "--targets", METRICS_FILE, "reports/test_metrics.json")
        assert diff.returncode == 0, diff.stdout + diff.stderr
        diffs[old, new] = json.loads(diff.stdout)
    plots = dvc(clone, "plots", "diff", "--json", "-o", str(clone.parent / "plots"), head.strip(), names[0])
    assert plots.returncode == 0, plots.stderr
    return {
        "clone": clone, "head": head.strip(), "queued": queued.stdout, "logs": logs or ran.stdout,
        "shown": json.loads(shown.stdout), "table": table.stdout, "diffs": diffs, "plots": json.loads(plots.stdout),
    }  # fmt: skip


def test_grid_override_queues_one_experiment_per_method(sweep: dict[str, Any]):
    assert sweep["queued"].count("Queued experiment") == len(METHODS), sweep["queued"]
    for m in METHODS:
        assert f"train.weighting={m}" in sweep["queued"]


def test_exp_show_lists_each_method_with_delta_m_and_the_means(sweep: dict[str, Any]):
    revs = list(experiments(sweep["shown"]))
    assert len(revs) == len(METHODS), json.dumps(sweep["shown"])[-3000:]
    assert all(r.get("error") is None for r in revs), [r.get("error") for r in revs]
    by_method = {r["data"]["params"]["params.yaml"]["data"]["train"]["weighting"]: r["data"] for r in revs}
    assert set(by_method) == set(METHODS)
    for data in by_method.values():
        assert set(data["metrics"]) == {METRICS_FILE}  # the one DVC metrics file: a row per experiment
        flat = data["metrics"][METRICS_FILE]["data"]
        assert set(flat) == {"delta_m", "delta_m_accuracy", "negative_transfer_tasks", "mean_mtl_balanced_accuracy", "mean_mtl_accuracy"}
        assert isinstance(flat["delta_m"], float) and math.isfinite(flat["delta_m"])
        assert isinstance(flat["delta_m_accuracy"], float) and flat["negative_transfer_tasks"] in range(len(TASKS) + 1)
        assert 0 <= flat["mean_mtl_balanced_accuracy"] <= 1 and 0 <= flat["mean_mtl_accuracy"] <= 1


def test_the_readme_table_shows_method_delta_m_and_accuracies_best_first(sweep: dict[str, Any]):
    lines = [line for line in sweep["table"].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "Experiment", "delta_m", "delta_m_accuracy", "negative_transfer_tasks", "mean_mtl_balanced_accuracy",
        "mean_mtl_accuracy", "train.weighting",
    ], header  # fmt: skip
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    trials = [r for r in rows if "[" in r["Experiment"]]  # "├── 1a2b3c4 [name]"; the other row: the commit
    assert sorted(r["train.weighting"] for r in trials) == sorted(METHODS)
    delta_m = [float(r["delta_m"]) for r in trials]
    assert delta_m == sorted(delta_m, reverse=True)


def test_only_the_stages_from_train_on_rerun(sweep: dict[str, Any]):
    logs = sweep["logs"]
    assert logs.count("Reproducing experiment") == len(METHODS), logs[-3000:]
    assert logs.count("Running stage 'train'") == len(METHODS) and logs.count("Running stage 'compare'") == len(METHODS)
    for stage in ("ingest", "preprocess", "baselines", "register"):  # register: not a target of the sweep
        assert f"Running stage '{stage}'" not in logs, logs[-3000:]

    mlflow.set_tracking_uri(f"sqlite:///{sweep['clone'] / 'mlflow.db'}")
    baselines = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("mtl-pipeline").experiment_id], "tags.`mtl.kind` = 'single_task_baseline'"
    )  # fmt: skip
    assert len(baselines) == len(TASKS)  # trained once, for the committed baseline


def test_each_experiment_has_its_mlflow_run_named_and_tagged_by_method(sweep: dict[str, Any]):
    """The experiments run in DVC's temporary copies of the project; their runs are in its own store."""
    mlflow.set_tracking_uri(f"sqlite:///{sweep['clone'] / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs(
        [mlflow.get_experiment_by_name("mtl-pipeline").experiment_id], "tags.`mtl.kind` = 'multi_task'"
    )  # fmt: skip
    in_sweep = [r for r in runs if "dvc.exp_name" in r.data.tags]
    assert len(runs) == 1 + len(METHODS) and len(in_sweep) == len(METHODS)
    # the README's search for the runs of DVC experiments, in the MLflow UI
    found = client.search_runs([runs[0].info.experiment_id], "tags.`dvc.exp_name` LIKE '%'")
    assert {r.info.run_id for r in found} == {r.info.run_id for r in in_sweep}
    names = {r["name"]: r for r in experiments(sweep["shown"])}
    for run in in_sweep:
        method = run.data.tags["mtl.weighting"]
        assert run.data.params["train.weighting"] == method
        assert run.info.run_name == f"mtl-{method}-small_cnn"  # tracking.run_name
        assert run.data.tags["mtl.arch"] == "hard_sharing" and run.data.tags["mtl.backbone"] == "small_cnn"
        assert run.data.tags["dvc.exp_baseline_rev"] == sweep["head"]
        exp = names[run.data.tags["dvc.exp_name"]]  # the DVC experiment of this run
        assert exp["data"]["params"]["params.yaml"]["data"]["train"]["weighting"] == method
        delta_m = exp["data"]["metrics"][METRICS_FILE]["data"]["delta_m"]
        assert run.data.metrics["compare/delta_m_pct/balanced_accuracy"] == pytest.approx(delta_m)  # compare.metrics[0]
    assert {r.data.tags["mtl.weighting"] for r in in_sweep} == set(METHODS)


def _metrics(rev: dict[str, Any]) -> dict[str, Any]:
    """{file: metrics} of one row of `dvc exp show --json`; a file DVC could not read fails here."""
    files = rev["data"]["metrics"]
    assert all("error" not in f for f in files.values()), {k: f.get("error") for k, f in files.items()}
    return {name: f["data"] for name, f in files.items()}


def test_every_revision_has_its_means_and_delta_m(sweep: dict[str, Any]):
    """The committed baseline and each experiment hold their metrics file (committed with git, not `!`
    as with a git-ignored file): the means and Δm, and nothing per task."""
    (baseline,) = [b for b in sweep["shown"] if b.get("rev") == sweep["head"] or b.get("data", {}).get("rev") == sweep["head"]]
    rows = [baseline, *experiments(sweep["shown"])]
    assert len(rows) == 1 + len(METHODS)
    for rev in rows:
        metrics = _metrics(rev)
        assert set(metrics) == {METRICS_FILE}, sorted(metrics)
        assert math.isfinite(metrics[METRICS_FILE]["delta_m"]) and not any(t in k for k in metrics[METRICS_FILE] for t in TASKS)
    written = json.loads((sweep["clone"] / METRICS_FILE).read_text())
    assert _metrics(baseline)[METRICS_FILE] == pytest.approx(written)  # the commit holds what the workspace wrote


def test_metrics_diff_compares_two_revisions(sweep: dict[str, Any]):
    """`dvc metrics diff <baseline> <experiment> --targets ... reports/test_metrics.json` and between two
    experiments: both sides of every per-task balanced accuracy (from the per-task report each revision
    holds, named as a target) and of Δm; their mean over tasks is the mean `dvc exp show` lists."""
    by_rev = {sweep["head"]: None, **{r["name"]: r for r in experiments(sweep["shown"])}}
    (baseline,) = [b for b in sweep["shown"] if b.get("rev") == sweep["head"] or b.get("data", {}).get("rev") == sweep["head"]]
    by_rev[sweep["head"]] = baseline
    for (old, new), diff in sweep["diffs"].items():
        before, after = _metrics(by_rev[old]), _metrics(by_rev[new])
        for side, listed in (("old", before), ("new", after)):
            per_task = [diff["reports/test_metrics.json"][f"tasks.{t}.balanced_accuracy"][side] for t in TASKS]
            assert all(0 <= v <= 1 for v in per_task)
            assert sum(per_task) / len(TASKS) == pytest.approx(listed[METRICS_FILE]["mean_mtl_balanced_accuracy"])
            mean = diff["reports/test_metrics.json"]["mean.balanced_accuracy"][side]
            assert mean == pytest.approx(listed[METRICS_FILE]["mean_mtl_balanced_accuracy"])
        delta_m = diff[METRICS_FILE]["delta_m"]
        assert (delta_m["old"], delta_m["new"]) == (pytest.approx(before[METRICS_FILE]["delta_m"]), pytest.approx(after[METRICS_FILE]["delta_m"]))
    # the methods trained different models: at least one metric moved between the two experiments
    (between,) = [d for (old, _), d in sweep["diffs"].items() if old != sweep["head"]]
    assert any(e.get("diff") for e in between["reports/test_metrics.json"].values()), between


def test_plots_diff_draws_the_training_curves_of_both_revisions(sweep: dict[str, Any]):
    """train_history.csv is in every revision too: `dvc plots diff` draws the committed baseline's and
    the experiment's curves in one chart; the confusion matrices are one image (all tasks), not a chart
    per task."""
    panels = sweep["plots"]["data"]
    (accuracy,) = panels["Mean accuracy per epoch"]
    revs = {r["rev"] for r in accuracy["content"]["data"]["values"]}
    assert len(revs) == 2 and set(accuracy["revisions"]) == revs, accuracy["revisions"]
    assert "reports/confusion_grid.png" in panels
    assert not any(name.startswith("reports/predictions/") for name in panels)
    # each image of both revisions (cached outputs: read from the DVC cache for the committed baseline)
    for name in ("reports/confusion_grid.png", "reports/training_curves.png", "reports/task_gradient_cosine.png", "reports/task_error_correlation.png"):
        images = panels[name]
        assert sorted(r for image in images for r in image["revisions"]) == sorted(revs), (name, images)
        for image in images:
            assert Path(image["url"]).read_bytes()[:4] == b"\x89PNG", image
