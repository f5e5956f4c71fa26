"""Stage `register`: log the model to its MLflow run, register a version, maybe move `champion`.

Every model that reaches this stage is registered (a version is the record that it was trained and
evaluated); the alias `champion` moves to it only when it passes the champion gate and beats the
current champion. Aliases, not the deprecated registry stages.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mtl_core.config import PipelineConfig
from mtl_core.faults import fault_point
from mtl_core.hashing import file_sha256
from mtl_core.paths import ProjectPaths
from mtl_core.registry.gate import champion_gate
from mtl_core.registry.model_card import CardFacts, DataRevision, model_card
from mtl_core.registry.versions import (
    CHAMPION, GATE_FAILURES_TAG, GATE_REASON_TAG, GATE_TAG, MAX_TAG_VALUE, SCORE_TAG, WEIGHTS_TAG, current_champion,
    log_model, logged_model_of_run, publish_card, version_of_run,
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


def _finite_or_none(x: float) -> float | None:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def _comparison(paths: ProjectPaths) -> dict | None:
    """reports/comparison.json, when the compare stage has written one (dvc.yaml runs it first)."""
    return json.loads(paths.comparison.read_text()) if paths.comparison.is_file() else None


def _card_facts(paths: ProjectPaths, run, name: str, version: str, verdict: str, metrics: dict, majority: dict) -> CardFacts:
    spec = json.loads(paths.model_spec.read_text())
    tags = run.data.tags
    method = (
        f"weighting `{tags.get('mtl.weighting', '?')}`, architecture `{spec['arch']}`, backbone `{spec['backbone']}`"
    )
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
    paths = ProjectPaths(root)
    metrics = json.loads(paths.test_metrics.read_text())
    score = float(metrics["mean"]["accuracy"])
    tasks = TaskSpec.load(paths.tasks_file).names
    test_labels = np.load(paths.labels_cache("test"))
    gate = champion_gate(paths.weights, metrics, test_labels, tasks, cfg.register.min_mean_accuracy)
    weights_sha = file_sha256(paths.weights)
    name = cfg.mlflow.model_name

    with model_run(cfg, root) as run:
        run_id = run.info.run_id
        client = MlflowClient()
        version = version_of_run(client, name, run_id, weights_sha)
        if version is not None:
            log.info("register: run %s already has version %s of these weights; finishing it", run_id, version)
        else:
            model_uri = logged_model_of_run(run, weights_sha)
            if model_uri is None:
                model_uri = log_model(paths, weights_sha)
            else:
                log.info("register: reusing the model already logged to run %s (%s)", run_id, model_uri)
            version = str(mlflow.register_model(model_uri, name, tags={WEIGHTS_TAG: weights_sha}).version)
            fault_point("register.after_create_version")

        prev_version, prev_score = current_champion(client, name)
        client.set_model_version_tag(name, version, SCORE_TAG, repr(score))  # unrounded: ties compare equal
        client.set_model_version_tag(name, version, GATE_TAG, "passed" if gate.passed else "refused")
        client.set_model_version_tag(name, version, GATE_FAILURES_TAG, ",".join(gate.failures))
        client.set_model_version_tag(name, version, GATE_REASON_TAG, (gate.describe() or "passed")[:MAX_TAG_VALUE])
        if gate.at_chance:
            client.set_model_version_tag(name, version, "mtl.tasks_at_chance", "; ".join(gate.at_chance)[:MAX_TAG_VALUE])
        majority = {t: (m / n if n else float("nan")) for t, (m, n) in majority_counts(test_labels, tasks).items()}
        verdict = "passed" if gate.passed else f"refused ({gate.describe()})"
        if gate.at_chance:
            verdict += f"; no better than chance on {', '.join(gate.at_chance)}"
        description = version_description(
            client.get_run(run_id).info.run_name, run_id, verdict, metrics.get("tasks", {}), metrics.get("mean", {}), majority,
            _comparison(paths),
        )
        client.update_model_version(name, version, description=description[:MAX_TAG_VALUE])  # the store's limit too

        if prev_version == version:
            # an earlier attempt for this run already moved the alias (or this version has been champion
            # since): nothing to move, and nothing better to fall back on if the gate now refuses it
            moved, champion = False, version
            reason = f"version {version} is already champion"
            if not gate.passed:
                reason += f", though the champion gate now refuses it ({gate.describe()}); alias left on it"
        elif not gate.passed:
            moved, champion = False, prev_version
            where = f"left on version {prev_version}" if prev_version else "not set (no champion yet)"
            reason = f"version {version} refused by the champion gate: {gate.describe()}; alias '{CHAMPION}' {where}"
        elif prev_version is None or prev_score is None or score > prev_score:
            client.set_registered_model_alias(name, CHAMPION, version)
            moved, champion = True, version
            reason = (
                f"no previous champion; version {version} is champion"
                if prev_version is None
                else f"version {version} ({score:.4f}) beats champion version {prev_version} ({prev_score:.4f})"
            )
        else:
            moved, champion = False, prev_version
            reason = (
                f"version {version} ({score:.4f}) does not beat champion version {prev_version} "
                f"({prev_score:.4f}); alias '{CHAMPION}' left on version {prev_version}"
            )
        (log.info if moved or champion == version else log.warning)("register: %s", reason)

        card = model_card(_card_facts(paths, client.get_run(run_id), name, version, verdict, metrics, majority))
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
        )
        paths.registry_report.write_text(json.dumps(asdict(report), indent=2) + "\n")
        mlflow.log_artifact(str(paths.registry_report), artifact_path="registry")
        mlflow.set_tags({"mtl.registered_model": name, "mtl.registered_version": version})
    return report
