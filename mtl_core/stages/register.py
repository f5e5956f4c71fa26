"""Stage `register`: log the model to its MLflow run, register a version, maybe move `champion`.

Every model that reaches this stage is registered (a version is the record that it was trained and
evaluated); the alias `champion` moves to it only when it passes the champion gate and beats the
current champion, of the same task set on the same test split (registry.champion). Aliases, not the
deprecated registry stages.

The champion gate (registry.gate) refuses a version whose weights or test metrics are not finite, which is
no better than chance over its tasks, or below `register.min_mean_accuracy`; the tasks at chance are named
anyway. A version that passes beats the champion only on a strictly higher, unrounded mean test accuracy (a tie,
such as the same model registered again, leaves the alias). The decision and its reason go to the log,
`reports/registry.json` (`reason`, `gate_failures`) and the version's tags (`mtl.champion_gate`,
`mtl.gate_failures`, `mtl.gate_reason`).

Registration is idempotent per run (registry.versions).

The version's description is its per-task test table and, when the model was compared with single-task
models (reports/comparison.json, a dependency of this stage in dvc.yaml), Δm per task; its model card
(registry.model_card: what it predicts, its input contract, its data, how to call it, its results) goes to
`reports/model_card.md`, into the logged model's folder, and, while it is champion, into the registered
model's description.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mtl_core.config import PipelineConfig
from mtl_core.faults import fault_point
from mtl_core.hashing import file_sha256
from mtl_core.paths import ProjectPaths
from mtl_core.registry.champion import decide, finish_pending
from mtl_core.registry.gate import champion_gate
from mtl_core.registry.model_card import CardFacts, DataRevision, model_card
from mtl_core.registry.solutions import Solution, registered_solution
from mtl_core.registry.versions import (
    DECISION_TAG, GATE_FAILURES_TAG, GATE_REASON_TAG, GATE_TAG, MAX_TAG_VALUE, PENDING, SCORE_TAG, TASK_SET_SHA_TAG,
    TEST_DATA_TAG, WEIGHTS_TAG, log_model, logged_model_of_run, publish_card, test_split_sha256, version_of_run,
    version_tags_for,
)  # fmt: skip
from mtl_core.tasks import TaskSpec, majority_counts
from mtl_core.tracking.runs import model_run
from mtl_core.tracking.views import version_description

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryReport:
    model_name: str
    version: str
    run_id: str
    model_uri: str
    mean_test_accuracy: float | None  # None when not finite (JSON has no NaN)
    previous_champion_version: str | None
    previous_champion_accuracy: float | None
    champion_version: str | None
    champion_moved: bool
    reason: str
    gate_failures: list[str] = field(default_factory=list)  # failed gate checks; empty: the gate passed
    tasks_at_chance: list[str] = field(default_factory=list)  # no better than chance (see the module docstring)
    solution: str = "trained"  # what was registered: the train stage's model, or the solution compare selected
    solution_note: str = ""  # how it was chosen (compare.select), or that an automatic grouping is unverified


def _finite_or_none(x: float) -> float | None:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def _comparison(paths: ProjectPaths) -> dict | None:
    """reports/comparison.json, when the compare stage has written one (dvc.yaml runs it first)."""
    return json.loads(paths.comparison.read_text()) if paths.comparison.is_file() else None


def _card_facts(
    paths: ProjectPaths, solution: Solution, run, name: str, version: str, verdict: str, metrics: dict, majority: dict
) -> CardFacts:  # fmt: skip
    spec = json.loads(Path(solution.spec).read_text())
    tags = run.data.tags
    method = (
        f"weighting `{tags.get('mtl.weighting', '?')}`, architecture `{spec['arch']}`, backbone `{spec['backbone']}`"
    )
    if spec.get("task_groups"):
        method += ", one network per task group: " + "; ".join(", ".join(g) for g in spec["task_groups"])
    if solution.name != "trained":
        method += f" (the solution compare selected: {solution.name})"
    images = {s: int(np.load(paths.labels_cache(s), mmap_mode="r").shape[0]) for s in ("train", "val", "test")}
    data = DataRevision(
        source=run.data.params.get("data.source", "?"), dvc_md5=tags.get("dvc.data_md5"),
        manifest_sha256=tags.get("data.manifest_sha256"), git_commit=tags.get("git_commit"), images=images,
    )  # fmt: skip
    return CardFacts(
        model_name=name, version=version, run_name=run.info.run_name, run_id=run.info.run_id, method=method,
        tasks=spec["tasks"], image_size=int(spec["image_size"]), data=data, per_task=metrics.get("tasks", {}),
        mean=metrics.get("mean", {}), majority=majority, gate=verdict, comparison=_comparison(paths),
    )  # fmt: skip


def run_register(cfg: PipelineConfig, root: Path) -> RegistryReport:
    """Register the solution compare selected (registry.solutions; without a comparison, the train
    stage's model) as a version of `mlflow.model_name`, in the model's MLflow run."""
    paths = ProjectPaths(root)
    with tempfile.TemporaryDirectory(prefix="mtl-register-") as scratch:
        return _register(cfg, paths, registered_solution(cfg, paths, Path(scratch)))


def _register(cfg: PipelineConfig, paths: ProjectPaths, solution: Solution) -> RegistryReport:
    root = paths.root
    metrics = solution.metrics
    score = float(metrics["mean"]["accuracy"])
    tasks = TaskSpec.load(paths.tasks_file).names
    test_labels = np.load(paths.labels_cache("test"))
    gate = champion_gate(solution.weights, metrics, test_labels, tasks, cfg.register.min_mean_accuracy)
    weights_sha = file_sha256(solution.weights)
    name = cfg.mlflow.model_name

    spec_tasks = json.loads(Path(solution.spec).read_text())["tasks"]
    identity = version_tags_for(spec_tasks, test_split_sha256(paths.manifest, tasks))
    # everything the champion decision needs goes onto the version when it is created, so that a register
    # stage killed before the decision leaves a version the next one can decide (registry.champion)
    version_tags = {
        WEIGHTS_TAG: weights_sha, SCORE_TAG: repr(score),  # unrounded: ties compare equal
        GATE_TAG: "passed" if gate.passed else "refused", GATE_FAILURES_TAG: ",".join(gate.failures),
        GATE_REASON_TAG: (gate.describe() or "passed")[:MAX_TAG_VALUE], "mtl.solution": solution.name, **identity,
    }  # fmt: skip
    if gate.at_chance:
        version_tags["mtl.tasks_at_chance"] = "; ".join(gate.at_chance)[:MAX_TAG_VALUE]

    with model_run(cfg, root, "register") as run:
        run_id = run.info.run_id
        client = MlflowClient()
        version = version_of_run(client, name, run_id, weights_sha)
        if version is not None:
            log.info("register: run %s already has version %s of these weights; finishing it", run_id, version)
            for key, value in version_tags.items():  # an earlier attempt's version: this attempt's verdict
                client.set_model_version_tag(name, version, key, value)
        else:
            model_uri = logged_model_of_run(run, weights_sha)
            if model_uri is None:
                model_uri = log_model(solution.spec, solution.weights, paths.images_cache("test"), weights_sha)
            else:
                log.info("register: reusing the model already logged to run %s (%s)", run_id, model_uri)
            version = str(mlflow.register_model(model_uri, name, tags={**version_tags, DECISION_TAG: PENDING}).version)
            fault_point("register.after_create_version")

        majority = {t: (m / n if n else float("nan")) for t, (m, n) in majority_counts(test_labels, tasks).items()}
        verdict = "passed" if gate.passed else f"refused ({gate.describe()})"
        if gate.at_chance:
            verdict += f"; no better than chance on {', '.join(gate.at_chance)}"
        description = version_description(
            client.get_run(run_id).info.run_name, run_id, verdict, metrics.get("tasks", {}), metrics.get("mean", {}), majority,
            _comparison(paths),
        )
        if solution.note:  # how the registered solution was chosen (compare.select), or that it is unverified
            description = f"{solution.note}\n\n{description}"
        client.update_model_version(name, version, description=description[:MAX_TAG_VALUE])  # the store's limit too

        finish_pending(client, name, version)  # versions whose register stage was killed before deciding
        decision = decide(
            client, name, version, score, gate.passed, gate.describe(), spec_tasks, identity[TASK_SET_SHA_TAG], identity[TEST_DATA_TAG]
        )  # fmt: skip
        moved, champion, reason = decision.moved, decision.champion, decision.reason
        prev_version, prev_score = decision.previous, decision.previous_score
        (log.info if moved or champion == version else log.warning)("register: %s", reason)

        card = model_card(_card_facts(paths, solution, client.get_run(run_id), name, version, verdict, metrics, majority))
        paths.model_card.write_text(card)
        first_description = not client.get_registered_model(name).description
        publish_card(client, name, version, paths.model_card, as_description=champion == version or first_description)

        report = RegistryReport(
            model_name=name,
            version=version,
            run_id=run_id,
            model_uri=f"models:/{name}/{version}",
            mean_test_accuracy=_finite_or_none(score),
            previous_champion_version=prev_version,
            previous_champion_accuracy=_finite_or_none(prev_score),
            champion_version=champion,
            champion_moved=moved,
            reason=reason,
            gate_failures=gate.failures,
            tasks_at_chance=gate.at_chance,
            solution=solution.name,
            solution_note=solution.note,
        )
        paths.registry_report.write_text(json.dumps(asdict(report), indent=2) + "\n")
        mlflow.log_artifact(str(paths.registry_report), artifact_path="registry")
        mlflow.set_tags({"mtl.registered_model": name, "mtl.registered_version": version})
    return report
