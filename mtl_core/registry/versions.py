"""The MLflow Model Registry side of registering: the pyfunc model logged to its run, the version that a
run already registered, the current champion.

Registration is idempotent per run: one MLflow run holds one trained model, so a rerun for the same run
(the stage killed after `register_model`, or `dvc repro` rerunning it) finds that run's version with the
same weights (by run id and the `mtl.weights_sha256` tag) and finishes it instead of creating another,
and reuses the run's logged pyfunc model instead of logging it again.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient

import mtl_core
from mtl_core.registry import CHAMPION
from mtl_core.registry.predictor import MultiTaskPredictor

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


def _pip_requirements() -> list[str]:
    reqs = []
    for name in SERVING_PACKAGES:
        try:
            version = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
        reqs.append(f"{name}=={version}")
    return reqs


def current_champion(client: MlflowClient, name: str) -> tuple[str | None, float | None]:
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    if SCORE_TAG in champ.tags:
        return str(champ.version), float(champ.tags[SCORE_TAG])
    metrics = client.get_run(champ.run_id).data.metrics if champ.run_id else {}
    return str(champ.version), metrics.get("test/mean/accuracy")


def version_of_run(client: MlflowClient, name: str, run_id: str, weights_sha: str) -> str | None:
    """This run's registered version of these weights, when an earlier attempt created one."""
    try:
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    same = [int(v.version) for v in versions if v.tags.get(WEIGHTS_TAG) == weights_sha]
    return str(max(same)) if same else None


def logged_model_of_run(run: mlflow.ActiveRun, weights_sha: str) -> str | None:
    """The URI of this run's completely logged pyfunc model of these weights, if there is one."""
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{LOGGED_MODEL_NAME}'",
        output_format="list",
    )
    ready = [m for m in models if m.status == LoggedModelStatus.READY and m.tags.get(WEIGHTS_TAG) == weights_sha]
    return max(ready, key=lambda m: m.creation_timestamp).model_uri if ready else None


def log_model(spec: Path, weights: Path, example_images: Path, weights_sha: str) -> str:
    """Log the pyfunc. Its signature has outputs only: an input schema of uint8 tensors makes MLflow's
    scoring server cast a JSON request to uint8 before the model sees it (a float image in [0, 1] became
    zeros, answered with HTTP 200), so the model checks dtype, range and channels itself
    (`predictor.as_image_batch`); the input example (the first two images of `example_images`, a uint8
    image cache) shows the format."""
    predictor = MultiTaskPredictor(spec, weights)
    example = np.load(example_images, mmap_mode="r")[:2].copy()
    signature = ModelSignature(outputs=infer_signature(example, predictor.predict_images(example)).outputs)
    info = mlflow.pyfunc.log_model(
        name=LOGGED_MODEL_NAME,
        python_model=str(PYFUNC_CODE),
        artifacts={"spec": str(spec), "weights": str(weights)},
        code_paths=[str(Path(mtl_core.__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
        metadata={"tasks": predictor.spec["tasks"], "image_size": predictor.spec["image_size"]},
        tags={WEIGHTS_TAG: weights_sha},
    )
    return info.model_uri


TASK_SET_TAG = "mtl.task_set"  # {task: [classes]} as JSON (cut to MAX_TAG_VALUE: for reading)
TASK_SET_SHA_TAG = "mtl.task_set_sha256"  # what versions are compared by
TEST_DATA_TAG = "mtl.test_data_sha256"  # the test split the version was evaluated on (test_split_sha256)
DECISION_TAG = "mtl.champion_decision"
"""'pending' from the version's creation until its champion decision is taken, then the decision's
reason: a register stage killed in between leaves it pending, and the next register stage takes it
(registry.champion.finish_pending), whatever model that stage registers."""
PENDING = "pending"


def task_set_sha256(tasks: dict[str, list[str]]) -> str:
    """The task set (names and classes; the order of the tasks does not matter) as one hash."""
    return hashlib.sha256(json.dumps(tasks, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_split_sha256(manifest: Path, tasks: list[str]) -> str:
    """The test split of the ingested manifest (data/ingested/manifest.csv): its rows' image paths and
    labels of `tasks`, in order, as one hash. Two versions are compared only when they were evaluated on
    the same test split: more training rows or another image size leave it the same; another split, other
    images or labels do not."""
    digest = hashlib.sha256()
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if row.get("split") == "test":
                digest.update(json.dumps([row["path"], *(row.get(t, "") for t in tasks)]).encode() + b"\n")
    return digest.hexdigest()


def version_tags_for(tasks: dict[str, list[str]], test_data: str) -> dict[str, str]:
    """The tags that say what a version can be compared with: its task set and its test split."""
    text = json.dumps(tasks, sort_keys=True)
    return {
        TASK_SET_TAG: text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "...",
        TASK_SET_SHA_TAG: task_set_sha256(tasks),
        TEST_DATA_TAG: test_data,
    }


def recorded_tasks(client: MlflowClient, name: str, version: str) -> tuple[str | None, dict[str, list[str]] | None]:
    """(task set hash, {task: classes} where known) of a registered version: from its tags, or, for a
    version registered before they existed, from the model spec its run logged (model_spec/); (None,
    None) when neither is there."""
    mv = client.get_model_version(name, version)
    if TASK_SET_SHA_TAG in mv.tags:
        try:
            tasks = json.loads(mv.tags.get(TASK_SET_TAG, ""))
        except ValueError:
            tasks = None
        return mv.tags[TASK_SET_SHA_TAG], tasks
    if not mv.run_id:
        return None, None
    try:
        local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="model_spec/model_spec.json")
        tasks = json.loads(Path(local).read_text())["tasks"]
    except (MlflowException, OSError, ValueError, KeyError):
        return None, None
    return task_set_sha256(tasks), tasks
