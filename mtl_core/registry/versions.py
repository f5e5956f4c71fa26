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
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

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


# The input contract as MLflow shows it (the model page's *Inputs*): uint8 RGB images (N, H, W, 3), any
# N, H, W. See `image_signature` for why MLflow must not enforce it itself.
IMAGE_INPUT = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])


def image_signature(example: np.ndarray, output: object) -> ModelSignature:
    """The logged model's signature: inputs `IMAGE_INPUT`, outputs the prediction table's columns, and one
    parameter, `raw` (default false: calibrated probabilities; true: the network's own softmax).

    MLflow's scoring server casts a JSON request to the input schema's dtype before the model sees it
    (`np.array(inputs, dtype=uint8)` in `mlflow.utils.proto_json_utils.convert_data_type`): a float image
    in [0, 1] became zeros and was answered with HTTP 200. For a signature that comes from type hints it
    does not: the request's `inputs` reach the model as sent, and the model validates them
    (`predictor.as_image_batch`: 400 with a one-line message for floats, values outside 0-255, other
    channel counts). So the signature carries that mark (`is_signature_from_type_hint: true` in MLmodel):
    MLflow shows the uint8 tensor as the model's inputs, and leaves the checking to the model, whose checks
    are stricter than a dtype cast. tests/test_predict.py serves the model and sends it a float image."""
    params = ParamSchema([ParamSpec("raw", "boolean", False)])  # pyfunc_model: predict(..., params={"raw": true})
    signature = ModelSignature(inputs=IMAGE_INPUT, outputs=infer_signature(example, output).outputs, params=params)
    signature._is_signature_from_type_hint = True  # MLflow's own switch (mlflow.models.signature), see above
    return signature


def log_model(spec: Path, weights: Path, example_images: Path, weights_sha: str) -> str:
    """Log the pyfunc with its input contract (`image_signature`) and the first two images of
    `example_images` (a uint8 image cache) as input example."""
    predictor = MultiTaskPredictor(spec, weights)
    example = np.load(example_images, mmap_mode="r")[:2].copy()
    info = mlflow.pyfunc.log_model(
        name=LOGGED_MODEL_NAME,
        python_model=str(PYFUNC_CODE),
        artifacts={"spec": str(spec), "weights": str(weights)},
        code_paths=[str(Path(mtl_core.__file__).parent)],
        signature=image_signature(example, predictor.predict_images(example)),
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


def publish_card(client: MlflowClient, name: str, version: str, card: Path, as_description: bool) -> None:
    """Put the model card `card` into the folder of the version's logged model (`model_card.md` beside
    `MLmodel`), and make it the registered model's description when `as_description` (the version is
    champion, or the registered model has no description yet); the store keeps 5,000 characters of a
    description, so a longer card is cut there with a pointer to the whole file."""
    registered = client.get_model_version(name, version)
    # the logged model's id: MLflow 3's SQLite store leaves `model_id` empty and names it in the source
    model_id = registered.model_id or registered.source.removeprefix("models:/").split("/")[0]
    client.log_model_artifact(model_id, str(card))
    if as_description:
        text = card.read_text()
        if len(text) > MAX_TAG_VALUE:
            note = f"\n\n(cut here: the whole card is `{card.name}` in the folder of version {version}'s model)\n"
            text = text[: MAX_TAG_VALUE - len(note)] + note
        client.update_registered_model(name, description=text)
