"""Stage `register`: log the model to its MLflow run, register a version, maybe move `champion`.

The alias `champion` moves to the new version only when it beats the current champion on mean test
accuracy, strictly and unrounded (a tie, such as the same model registered again, leaves it); otherwise the alias stays where it is, and the log and `reports/registry.json` say why.
Aliases, not the deprecated registry stages.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

import mtl_core
from mtl_core.config import PipelineConfig
from mtl_core.paths import ProjectPaths
from mtl_core.registry.predictor import MultiTaskPredictor
from mtl_core.tracking import model_run

log = logging.getLogger(__name__)

CHAMPION = "champion"
SCORE_TAG = "mean_test_accuracy"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# What the served model imports; pinned to the versions that trained it.
SERVING_PACKAGES = ("torch", "torchvision", "timm", "safetensors", "albumentations", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "mlflow")


@dataclass(frozen=True)
class RegistryReport:
    model_name: str
    version: str
    run_id: str
    model_uri: str
    mean_test_accuracy: float
    previous_champion_version: str | None
    previous_champion_accuracy: float | None
    champion_version: str
    champion_moved: bool
    reason: str


def _pip_requirements() -> list[str]:
    reqs = []
    for name in SERVING_PACKAGES:
        try:
            version = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
        reqs.append(f"{name}=={version}")
    return reqs


def _current_champion(client: MlflowClient, name: str) -> tuple[str | None, float | None]:
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    if SCORE_TAG in champ.tags:
        return str(champ.version), float(champ.tags[SCORE_TAG])
    metrics = client.get_run(champ.run_id).data.metrics if champ.run_id else {}
    return str(champ.version), metrics.get("test/mean/accuracy")


def run_register(cfg: PipelineConfig, root: Path) -> RegistryReport:
    paths = ProjectPaths(root)
    score = float(json.loads(paths.test_metrics.read_text())["mean"]["accuracy"])
    predictor = MultiTaskPredictor(paths.model_spec, paths.weights)
    example = np.load(paths.images_cache("test"), mmap_mode="r")[:2].copy()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), name=None)]),
        outputs=infer_signature(example, predictor.predict_images(example)).outputs,
    )
    name = cfg.mlflow.model_name

    with model_run(cfg, root) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"spec": str(paths.model_spec), "weights": str(paths.weights)},
            code_paths=[str(Path(mtl_core.__file__).parent)],
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(),
            metadata={"tasks": predictor.spec["tasks"], "image_size": predictor.spec["image_size"]},
        )
        client = MlflowClient()
        prev_version, prev_score = _current_champion(client, name)
        version = str(mlflow.register_model(info.model_uri, name).version)
        client.set_model_version_tag(name, version, SCORE_TAG, repr(score))  # unrounded: ties compare equal
        client.update_model_version(name, version, description=f"mean test accuracy {score:.4f} (run {run.info.run_id})")

        if prev_version is None or prev_score is None or score > prev_score:
            client.set_registered_model_alias(name, CHAMPION, version)
            moved, champion = True, version
            reason = (
                f"no previous champion; version {version} is champion"
                if prev_version is None
                else f"version {version} ({score:.4f}) beats champion version {prev_version} ({prev_score:.4f})"
            )
            log.info("register: %s", reason)
        else:
            moved, champion = False, prev_version
            reason = (
                f"version {version} ({score:.4f}) does not beat champion version {prev_version} "
                f"({prev_score:.4f}); alias '{CHAMPION}' left on version {prev_version}"
            )
            log.warning("register: %s", reason)

        report = RegistryReport(
            model_name=name,
            version=version,
            run_id=run.info.run_id,
            model_uri=f"models:/{name}/{version}",
            mean_test_accuracy=score,
            previous_champion_version=prev_version,
            previous_champion_accuracy=prev_score,
            champion_version=champion,
            champion_moved=moved,
            reason=reason,
        )
        paths.registry_report.write_text(json.dumps(asdict(report), indent=2) + "\n")
        mlflow.log_artifact(str(paths.registry_report), artifact_path="registry")
        mlflow.set_tags({"mtl.registered_model": name, "mtl.registered_version": version})
    return report
