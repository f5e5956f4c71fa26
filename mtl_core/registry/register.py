"""Stage `register`: log the model to its MLflow run, register a version, maybe move `champion`.

Every model that reaches this stage is registered (a version is the record that it was trained and
evaluated); the alias `champion` moves to it only when it passes the champion gate and beats the
current champion. Aliases, not the deprecated registry stages.

The gate refuses a version (registered, alias left where it is) when any of these checks fails:

* `finite_weights`: a NaN or inf in any floating tensor of `models/model.safetensors` (a diverged
  training run can still evaluate to plausible-looking accuracies on argmax).
* `finite_metrics`: a NaN or inf anywhere in `reports/test_metrics.json`.
* `above_chance`: over the tasks, the model must answer more test images correctly than always
  answering each task's most frequent class of the *test* split would (its majority rate, from the
  test labels cache, over the labelled samples only): the summed correct answers against the summed
  majority counts, compared as counts, so the float32 accuracy of a constant predictor cannot land a
  rounding error above its own majority rate. The tasks on which the model is no better than chance
  are named in the log, the report (`tasks_at_chance`) and a version tag even when the model passes:
  the registered model is served for all of its tasks at once, and a mean hides a dead head. They do
  not refuse it, because a real multi-task model can be at chance on one hard task (the built-in data's
  `shape` after a short run) and still be the best model for the others; `register.min_mean_accuracy`
  is the stricter bar a project sets for itself. A task with no labelled test sample, or only one class
  in the test split (nothing can beat a majority rate of 1), carries no evidence and is not checked; a
  model with no checkable task is refused, since nothing shows it beats chance.
* `min_mean_accuracy`: the mean test accuracy must be at least `register.min_mean_accuracy`.

A version that passes beats the champion only on a strictly higher, unrounded mean test accuracy (a tie,
such as the same model registered again, leaves the alias). The decision and its reason go to the log,
`reports/registry.json` (`reason`, `gate_failures`) and the version's tags (`mtl.champion_gate`,
`mtl.gate_failures`, `mtl.gate_reason`).

Registration is idempotent per run: one MLflow run holds one trained model, so a rerun for the same run
(the stage killed after `register_model`, or `dvc repro` rerunning it) finds that run's version with the
same weights (by run id and the `mtl.weights_sha256` tag) and finishes it instead of creating another,
and reuses the run's logged pyfunc model instead of logging it again.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from safetensors import safe_open

import mtl_core
from mtl_core.config import PipelineConfig
from mtl_core.faults import fault_point
from mtl_core.paths import ProjectPaths
from mtl_core.registry.predictor import MultiTaskPredictor
from mtl_core.tasks import MISSING_LABEL, TaskSpec
from mtl_core.tracking import file_sha256, model_run, version_description

log = logging.getLogger(__name__)

CHAMPION = "champion"
SCORE_TAG = "mean_test_accuracy"
WEIGHTS_TAG = "mtl.weights_sha256"
GATE_TAG = "mtl.champion_gate"  # "passed" or "refused"
GATE_FAILURES_TAG = "mtl.gate_failures"  # comma-separated failed checks
GATE_REASON_TAG = "mtl.gate_reason"
LOGGED_MODEL_NAME = "model"
MAX_TAG_VALUE = 5000  # MLflow's limit on a model version tag value
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# What the served model imports; pinned to the versions that trained it.
SERVING_PACKAGES = ("torch", "torchvision", "timm", "safetensors", "albumentations", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "mlflow")


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


@dataclass(frozen=True)
class GateResult:
    failures: list[str]  # names of the failed checks
    details: list[str]  # one human-readable line per failed check
    at_chance: list[str] = field(default_factory=list)  # tasks no better than chance (named, not refusing)

    @property
    def passed(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        return "; ".join(self.details)


def _pip_requirements() -> list[str]:
    reqs = []
    for name in SERVING_PACKAGES:
        try:
            version = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
        reqs.append(f"{name}=={version}")
    return reqs


def _non_finite_tensors(weights: Path) -> list[str]:
    bad = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                bad.append(key)
    return bad


def _non_finite_numbers(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite_numbers(v, f"{prefix}{k}.")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _non_finite_numbers(v, f"{prefix}{i}.")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [prefix.rstrip(".")]
    return []


def majority_counts(paths: ProjectPaths) -> dict[str, tuple[int, int]]:
    """Per task: (count of the test split's most frequent class, labelled test samples)."""
    labels = np.load(paths.labels_cache("test"))
    out = {}
    for k, task in enumerate(TaskSpec.load(paths.tasks_file).names):
        y = labels[:, k]
        y = y[y != MISSING_LABEL]
        out[task] = (int(np.bincount(y).max()) if y.size else 0, int(y.size))
    return out


def champion_gate(cfg: PipelineConfig, paths: ProjectPaths, metrics: dict[str, Any]) -> GateResult:
    """The checks a version must pass before it may become champion (see the module docstring)."""
    failures: list[str] = []
    details: list[str] = []

    if bad := _non_finite_tensors(paths.weights):
        failures.append("finite_weights")
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        details.append(f"non-finite weights (NaN/inf) in {shown}")

    if bad := _non_finite_numbers(metrics):
        failures.append("finite_metrics")
        details.append(f"non-finite test metrics: {', '.join(bad)}")

    per_task = metrics.get("tasks", {})
    at_chance: list[str] = []
    correct_sum = majority_sum = checked = 0
    for task, (majority, n) in majority_counts(paths).items():
        if n == 0 or majority == n:
            log.info(
                "register: task %s not checked against chance (%d labelled test images, %d of its majority class)",
                task, n, majority,
            )  # fmt: skip
            continue
        checked += 1
        accuracy = per_task.get(task, {}).get("accuracy")
        correct = round(accuracy * n) if isinstance(accuracy, int | float) and math.isfinite(accuracy) else 0
        correct_sum, majority_sum = correct_sum + correct, majority_sum + majority
        if correct <= majority:
            at_chance.append(f"{task} ({correct}/{n} = {correct / n:.3f} <= majority class {majority}/{n} = {majority / n:.3f})")
    if checked == 0:
        failures.append("above_chance")
        details.append("not better than chance: no task has test labels of more than one class to show it")
    elif correct_sum <= majority_sum:
        failures.append("above_chance")
        details.append(
            f"not better than chance: {correct_sum} correct test answers over the tasks, always answering each "
            f"task's majority class gives {majority_sum}"
        )
    if at_chance:
        log.warning("register: no better than chance on %s", ", ".join(at_chance))

    score = metrics.get("mean", {}).get("accuracy")
    minimum = cfg.register.min_mean_accuracy
    if isinstance(score, int | float) and math.isfinite(score) and score < minimum:  # else: finite_metrics
        failures.append("min_mean_accuracy")
        details.append(f"mean test accuracy {score:.4f} below register.min_mean_accuracy {minimum}")
    return GateResult(failures, details, at_chance)


def _current_champion(client: MlflowClient, name: str) -> tuple[str | None, float | None]:
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    if SCORE_TAG in champ.tags:
        return str(champ.version), float(champ.tags[SCORE_TAG])
    metrics = client.get_run(champ.run_id).data.metrics if champ.run_id else {}
    return str(champ.version), metrics.get("test/mean/accuracy")


def _version_of_run(client: MlflowClient, name: str, run_id: str, weights_sha: str) -> str | None:
    """This run's registered version of these weights, when an earlier attempt created one."""
    try:
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    same = [int(v.version) for v in versions if v.tags.get(WEIGHTS_TAG) == weights_sha]
    return str(max(same)) if same else None


def _logged_model_of_run(run: mlflow.ActiveRun, weights_sha: str) -> str | None:
    """The URI of this run's completely logged pyfunc model of these weights, if there is one."""
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{LOGGED_MODEL_NAME}'",
        output_format="list",
    )
    ready = [m for m in models if m.status == LoggedModelStatus.READY and m.tags.get(WEIGHTS_TAG) == weights_sha]
    return max(ready, key=lambda m: m.creation_timestamp).model_uri if ready else None


def _log_model(paths: ProjectPaths, weights_sha: str) -> str:
    """Log the pyfunc. Its signature has outputs only: an input schema of uint8 tensors makes MLflow's
    scoring server cast a JSON request to uint8 before the model sees it (a float image in [0, 1] became
    zeros, answered with HTTP 200), so the model checks dtype, range and channels itself
    (`predictor.as_image_batch`); the input example shows the format."""
    predictor = MultiTaskPredictor(paths.model_spec, paths.weights)
    example = np.load(paths.images_cache("test"), mmap_mode="r")[:2].copy()
    signature = ModelSignature(outputs=infer_signature(example, predictor.predict_images(example)).outputs)
    info = mlflow.pyfunc.log_model(
        name=LOGGED_MODEL_NAME,
        python_model=str(PYFUNC_CODE),
        artifacts={"spec": str(paths.model_spec), "weights": str(paths.weights)},
        code_paths=[str(Path(mtl_core.__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
        metadata={"tasks": predictor.spec["tasks"], "image_size": predictor.spec["image_size"]},
        tags={WEIGHTS_TAG: weights_sha},
    )
    return info.model_uri


def _finite_or_none(x: float) -> float | None:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def run_register(cfg: PipelineConfig, root: Path) -> RegistryReport:
    paths = ProjectPaths(root)
    metrics = json.loads(paths.test_metrics.read_text())
    score = float(metrics["mean"]["accuracy"])
    gate = champion_gate(cfg, paths, metrics)
    weights_sha = file_sha256(paths.weights)
    name = cfg.mlflow.model_name

    with model_run(cfg, root) as run:
        run_id = run.info.run_id
        client = MlflowClient()
        version = _version_of_run(client, name, run_id, weights_sha)
        if version is not None:
            log.info("register: run %s already has version %s of these weights; finishing it", run_id, version)
        else:
            model_uri = _logged_model_of_run(run, weights_sha)
            if model_uri is None:
                model_uri = _log_model(paths, weights_sha)
            else:
                log.info("register: reusing the model already logged to run %s (%s)", run_id, model_uri)
            version = str(mlflow.register_model(model_uri, name, tags={WEIGHTS_TAG: weights_sha}).version)
            fault_point("register.after_create_version")

        prev_version, prev_score = _current_champion(client, name)
        client.set_model_version_tag(name, version, SCORE_TAG, repr(score))  # unrounded: ties compare equal
        client.set_model_version_tag(name, version, GATE_TAG, "passed" if gate.passed else "refused")
        client.set_model_version_tag(name, version, GATE_FAILURES_TAG, ",".join(gate.failures))
        client.set_model_version_tag(name, version, GATE_REASON_TAG, (gate.describe() or "passed")[:MAX_TAG_VALUE])
        if gate.at_chance:
            client.set_model_version_tag(name, version, "mtl.tasks_at_chance", "; ".join(gate.at_chance)[:MAX_TAG_VALUE])
        majority = {t: (m / n if n else float("nan")) for t, (m, n) in majority_counts(paths).items()}
        verdict = "passed" if gate.passed else f"refused ({gate.describe()})"
        if gate.at_chance:
            verdict += f"; no better than chance on {', '.join(gate.at_chance)}"
        description = version_description(
            client.get_run(run_id).info.run_name, run_id, verdict, metrics.get("tasks", {}), metrics.get("mean", {}), majority
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
