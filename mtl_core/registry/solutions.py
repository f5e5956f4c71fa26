"""The solution the register stage registers: the model files and test metrics of what `compare.select`
chose (the train stage's model, the all-in-one reference, or the single-task models served as one),
and what the model version's description says about how it was chosen.

The single-task solution is served as one model: the K single-task networks side by side
(models.grouped.TaskGroupedModel, one group per task), written as one safetensors file and spec like
any grouped model, so the registry, `mtl predict` and `mlflow models serve` treat it as they treat the
others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mtl_core.config import PipelineConfig
from mtl_core.evaluation.metrics import mean_over_tasks
from mtl_core.evaluation.task_grouping import format_groups
from mtl_core.models.grouped import TaskGroupedModel
from mtl_core.models.io import load_model, read_spec, write_spec
from mtl_core.paths import SPEC_FILE, WEIGHTS_FILE, ProjectPaths
from mtl_core.training.groups import merged_calibration


@dataclass(frozen=True)
class Solution:
    name: str  # trained, all_in_one, grouped, single_task
    spec: Path
    weights: Path
    metrics: dict[str, Any]  # {"tasks": {task: {metric: value}}, "mean": {metric: value}}
    note: str  # how it was chosen, for the model version's description ("" for the train stage's model as before)


def _grouped_note(paths: ProjectPaths, cfg: PipelineConfig) -> str:
    """The grouping of `model.task_groups: auto`, said to be unverified where no comparison tested it."""
    if not cfg.model.auto_groups or not paths.task_groups.is_file():
        return ""
    report = json.loads(paths.task_groups.read_text())
    if not report.get("enabled"):
        return ""
    how = (
        f"chosen by the grouping stage from the {report['signal']} affinity of a probe training"
        if report.get("measured") else f"kept as one network ({report.get('reason', '')})"
    )  # fmt: skip
    return (
        f"Task groups {format_groups(report['groups'])}, {how}; unverified: no single-task models were trained "
        "to compare with (compare.single_task: false)."
    )


def single_task_solution(paths: ProjectPaths, tasks: list[str], out: Path) -> tuple[Path, Path]:
    """The single-task models of models_single_task/ as one grouped model in `out` (spec, weights)."""
    members, specs = [], []
    for t in tasks:
        model, spec = load_model(paths.single_task_dir / t / SPEC_FILE, paths.single_task_dir / t / WEIGHTS_FILE)
        members.append(model)
        specs.append(spec)
    grouped = TaskGroupedModel(members, tasks)
    out.mkdir(parents=True, exist_ok=True)
    spec = {**specs[0], "tasks": {t: s["tasks"][t] for t, s in zip(tasks, specs)}, "task_groups": [[t] for t in tasks]}
    if (calibration := merged_calibration(specs)) is not None:
        spec["temperatures"] = calibration.pop("temperatures")
        spec["calibration"] = calibration
    write_spec(out / SPEC_FILE, spec)
    save_file({k: v.detach().contiguous().cpu() for k, v in grouped.state_dict().items()}, str(out / WEIGHTS_FILE))
    return out / SPEC_FILE, out / WEIGHTS_FILE


def _metrics(per_task: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, Any]:
    ordered = {t: per_task[t] for t in tasks}
    return {"tasks": ordered, "mean": mean_over_tasks(ordered)}


def registered_solution(cfg: PipelineConfig, paths: ProjectPaths, scratch: Path) -> Solution:
    """What to register: the solution compare selected (reports/comparison.json), else the train stage's
    model; `scratch`: a folder for the single-task solution's assembled files."""
    trained_metrics = json.loads(paths.test_metrics.read_text())
    comparison = json.loads(paths.comparison.read_text()) if paths.comparison.is_file() else {}
    selection = comparison.get("selection") if comparison.get("enabled") else None
    if selection is None:
        return Solution("trained", paths.model_spec, paths.weights, trained_metrics, _grouped_note(paths, cfg))
    tasks = list(read_spec(paths.model_spec)["tasks"])
    name = selection["solution"]
    note = f"Solution **{name.replace('_', '-')}** ({len(selection['groups'])} network(s)) chosen by compare.select: {selection['reason']}."
    if name == selection["trained"]:
        return Solution(name, paths.model_spec, paths.weights, trained_metrics, note)
    if name == "all_in_one":
        reference = json.loads(paths.all_in_one_metrics.read_text())
        folder = paths.all_in_one_dir
        return Solution(name, folder / SPEC_FILE, folder / WEIGHTS_FILE, _metrics(reference["tasks"], tasks), note)
    if name == "single_task":
        spec, weights = single_task_solution(paths, tasks, scratch)
        baselines = json.loads(paths.single_task_metrics.read_text())
        return Solution(name, spec, weights, _metrics(baselines["tasks"], tasks), note)
    raise ValueError(f"{paths.comparison}: selection names solution {name!r}, which this project cannot register")
