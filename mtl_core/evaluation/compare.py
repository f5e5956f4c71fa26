"""Stage `compare`: per task, multi-task vs single-task metric, their relative difference and Δm.

Reads the test metrics of the multi-task model and of the single-task baselines, writes
`reports/comparison.json` (DVC metrics) and logs the table, Δm and the negative-transfer flags into the
multi-task model's MLflow run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from mtl_core.config import PipelineConfig
from mtl_core.evaluation.comparison import compare_tasks, comparison_rows
from mtl_core.paths import ProjectPaths
from mtl_core.tracking import model_run

log = logging.getLogger(__name__)


def run_compare(cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    paths = ProjectPaths(root)
    baselines = json.loads(paths.single_task_metrics.read_text())
    if not baselines.get("enabled"):
        report: dict[str, Any] = {"enabled": False, "reason": baselines.get("reason", "no single-task baselines")}
        paths.comparison.write_text(json.dumps(report, indent=2) + "\n")
        return report

    mtl = json.loads(paths.test_metrics.read_text())["tasks"]
    table = compare_tasks(
        {t: mtl[t] for t in baselines["tasks"]}, baselines["tasks"], list(cfg.compare.metrics)
    )
    report = {"enabled": True, **table}
    paths.comparison.write_text(json.dumps(report, indent=2) + "\n")
    rows = comparison_rows(table)
    for m, value in table["delta_m_pct"].items():
        log.info("Δm (%s) = %+.2f %%", m, value)
    for t in table["negative_transfer"]:
        log.warning("negative transfer on task %r: multi-task %s below its single-task baseline", t, table["primary_metric"])

    with model_run(cfg, root):
        metrics = {f"compare/delta_m_pct/{m}": v for m, v in table["delta_m_pct"].items()}
        metrics.update(
            {f"compare/{t}/{m}/relative_pct": v[m]["relative_pct"] for t, v in table["tasks"].items() for m in v}
        )
        mlflow.log_metrics(metrics)
        mlflow.log_table(pd.DataFrame(rows), artifact_file="compare/comparison_table.json")
        mlflow.log_artifact(str(paths.comparison), artifact_path="compare")
        mlflow.set_tag("mtl.negative_transfer", ",".join(table["negative_transfer"]) or "none")
    return report
