"""Forty yes/no tasks (issue #15): the reports stay readable. `dvc metrics show` fits a 120-column
terminal (the project's dvc.yaml declares only the means), and a pipeline run on 40 derived attributes of
the built-in shapes (`builtin:shape_attributes`) writes figures of a bounded size and the new metrics for every task."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl_core.config import CompareConfig
from mtl_core.figures import task_matrix
from mtl_core.evaluation.comparison import compare_tasks, flat_metrics
from mtl_core.evaluation.metrics import mean_over_tasks
from tests.conftest import REPO_ROOT, write_params

WIDTH = 120
drawn: dict[str, tuple] = {}  # title -> (matrix, task names, x tick labels) of each heatmap the stages drew
def fake_reports(tasks: list[str]) -> tuple[dict, dict, dict]:
    """A 40-task test report, single-task report and comparison table, with every metric."""
    rng = np.random.default_rng(0)
    per_task = lambda: {t: {m: float(rng.uniform(0.4, 0.95)) for m in (  # noqa: E731
        "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc", "average_precision")}
        | {"support": 40} for t in tasks}  # fmt: skip
    mtl, stl = per_task(), per_task()
    table = compare_tasks(mtl, stl, CompareConfig().metrics)
    return {"tasks": mtl, "mean": mean_over_tasks(mtl)}, {"enabled": True, "tasks": stl}, table


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, timeout=300)


def dvc_project(root: Path) -> None:
    """`root` as a DVC project (no git) with the repository's dvc.yaml: its declared metrics files."""
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    proc = dvc(root, "init", "--no-scm", "--force")
    assert proc.returncode == 0, proc.stderr


def test_dvc_metrics_show_of_forty_tasks_fits_a_120_column_terminal(tmp_path: Path):
    """Every report the stages write, at 40 tasks with Δm: the default `dvc metrics show` is one row of
    means, Δm and the negative-transfer count; the per-task report, named, is what would not fit."""
    tasks = [f"attribute_{i:02d}" for i in range(40)]
    test, stl, table = fake_reports(tasks)
    reports = tmp_path / "reports"
    reports.mkdir()
    files = {
        "test_metrics.json": test, "single_task_metrics.json": stl, "all_in_one_metrics.json": stl,
        "comparison.json": {"enabled": True, **table},
        "train_metrics.json": {"best_epoch": 1, "train_seconds": 3.0, "val": {t: 0.5 for t in tasks}},
    }  # fmt: skip
    for name, data in files.items():
        (reports / name).write_text(json.dumps(data))
    (tmp_path / "metrics.json").write_text(json.dumps(flat_metrics(test, CompareConfig().metrics, table)))
    dvc_project(tmp_path)

    shown = dvc(tmp_path, "metrics", "show")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("metrics.json"), shown.stdout  # header + one row
    assert max(map(len, lines)) <= WIDTH, shown.stdout
    assert lines[0].split() == [
        "Path", "delta_m", "delta_m_accuracy", "mean_mtl_accuracy", "mean_mtl_balanced_accuracy", "negative_transfer_tasks",
    ]  # fmt: skip
    named = dvc(tmp_path, "metrics", "show", "reports/test_metrics.json")  # what a metrics: declaration would add
    assert named.returncode == 0 and max(map(len, named.stdout.splitlines())) > 10 * WIDTH


@pytest.fixture(scope="module")
def forty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ingest -> compare on 200 images of the built-in 40-attribute dataset (`builtin:shape_attributes`,
    32 px), small_cnn, one short epoch; about half a minute on two cores."""
    from mtl_core.pipeline import run_stage

    root = tmp_path_factory.mktemp("forty") / "project"
    (root / "data" / "datasets").mkdir(parents=True)
    write_params(root, {
        "data": {"source": "builtin:shape_attributes", "builtin": {"num_images": 200, "image_size": 32}},
        "preprocess": {"image_size": 32},
        "train": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 3, "task_affinity_every": 3},  # one measured step
    })  # fmt: skip
    drawn.clear()
    original = task_matrix.task_matrix_figure

    def recording(matrix, task_names, title, *args, **kwargs):  # the heatmaps the stages draw, read back
        fig = original(matrix, task_names, title, *args, **kwargs)
        drawn[title] = (np.array(matrix), list(task_names), [t.get_text() for t in fig.axes[0].get_xticklabels()])
        return fig

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(task_matrix, "task_matrix_figure", recording)
        for stage in ("ingest", "preprocess", "train", "evaluate", "baselines", "compare"):  # baselines: off
            start = time.monotonic()
            run_stage(stage, root=root)
            print(f"{stage}: {time.monotonic() - start:.1f} s")
    return root


def test_forty_task_heatmaps_are_in_cluster_order(forty: Path):
    """Both relation heatmaps (train: gradient cosine; evaluate: error correlation) list the 40 tasks
    in the clustering's order of the matrix they draw, not the manifest's column order."""
    assert len(drawn) == 2, list(drawn)
    for title, (matrix, names, shown) in drawn.items():
        assert len(names) == 40 and sorted(shown) == sorted(names), title
        assert shown == [names[i] for i in task_matrix.cluster_order(matrix)], title
        assert shown != names, title  # reordered


def test_forty_tasks_have_the_new_metrics_and_readable_figures(forty: Path):
    from mtl_core.figures.task_matrix import MAX_MATRIX_INCHES

    reports = forty / "reports"
    test = json.loads((reports / "test_metrics.json").read_text())
    assert len(test["tasks"]) == 40
    assert all("balanced_accuracy" in v for v in test["tasks"].values())
    with_auroc = [t for t, v in test["tasks"].items() if "auroc" in v]
    assert with_auroc and test["mean"]["auroc"] == pytest.approx(np.mean([test["tasks"][t]["auroc"] for t in with_auroc]))
    # figures of a bounded size (pixels at the saved dpi), one panel / cell per task
    limits = {
        "training_curves.png": (1400, 1700),  # 6 x 7 panels of 2.3 x 1.9 in
        "task_gradient_cosine.png": (100 * (MAX_MATRIX_INCHES + 4), 100 * (MAX_MATRIX_INCHES + 4)),
        "task_error_correlation.png": (100 * (MAX_MATRIX_INCHES + 4), 100 * (MAX_MATRIX_INCHES + 4)),
        "confusion_grid.png": (1400, 1300),  # 8 x 5 panels of 1.55 in at 110 dpi (figures.confusion)
    }
    for name, (width, height) in limits.items():
        w, h = Image.open(reports / name).size
        assert w <= width and h <= height, (name, w, h)
    assert len(list((reports / "predictions").glob("*.csv"))) == 40


def test_forty_tasks_dvc_metrics_show_and_the_mlflow_table(forty: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from mtl_core.config import load_config
    from mtl_core.tracking.runs import read_run_info
    from mtl_core.tracking.store import tracking_uri
    from mtl_core.tracking.views import TABLE_FILE
    from mtl_core.paths import ProjectPaths

    flat = json.loads((forty / "metrics.json").read_text())
    assert set(flat) == {"mean_mtl_balanced_accuracy", "mean_mtl_accuracy"}  # no baselines: no Δm
    dvc_project(forty)
    shown = dvc(forty, "metrics", "show")
    assert shown.returncode == 0 and max(map(len, shown.stdout.splitlines())) <= WIDTH, shown.stdout

    mlflow.set_tracking_uri(tracking_uri(load_config(forty / "params.yaml"), forty))
    run = MlflowClient().get_run(read_run_info(ProjectPaths(forty))["run_id"])
    table = MlflowClient().load_table(run.info.experiment_id, TABLE_FILE, run_ids=[run.info.run_id])
    assert len(table) == 40
    assert {"balanced_accuracy", "auroc", "average_precision", "majority_rate"} <= set(table.columns)
