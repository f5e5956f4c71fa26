"""Which model `mtl predict` answers with: a registered or a local model, resolved and loaded (`LoadedModel`).

A model is named either by an MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`,
`runs:/RUN_ID/model`, ...), resolved through the project's tracking store, or by a local path:

- a trained-model folder (the train stage's `models/`): `model_spec.json` plus `model.safetensors`
  (the best-on-validation weights), or, when there are no safetensors, `checkpoint.pt` (last epoch);
- a `.safetensors` file, or a training checkpoint `.pt`/`.pth` file (read with `weights_only=True`),
  each with the `model_spec.json` next to it;
- a downloaded MLflow model folder (one with an `MLmodel` file).

`mtl predict` is meant to run in a shell loop, so it imports only what the model needs. An MLflow model of
this project's pyfunc (`pyfunc_model.py`) whose folder is on this machine is read straight from its files
(spec and safetensors weights, with the pyfunc's own `MultiTaskPredictor`), without MLflow's pyfunc
loader, which copied the whole model folder and checked its pip requirements. `models:/NAME@ALIAS` and
`models:/NAME/VERSION` in the project's own SQLite store are looked up in its registry tables read-only,
without importing MLflow (two seconds on 2 cores); any other URI or store, a schema this does not know,
a version that is not READY, or a model folder elsewhere goes through MLflow as before. The local folders
need neither MLflow nor a params.yaml.

Every error names the thing at fault (image file, model URI and tracking store, model folder and the
files it lacks) and is a ValueError, FileNotFoundError or RuntimeError, which the CLI reports as such.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sqlite3
import tempfile
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np

from mtl_core.paths import CHECKPOINT_FILE, SPEC_FILE, WEIGHTS_FILE
from mtl_core.registry import CHAMPION
from mtl_core.tracking.store import sqlite_db_path, tracking_uri

if TYPE_CHECKING:
    import pandas as pd

    from mtl_core.config import PipelineConfig
    from mtl_core.registry.predictor import MultiTaskPredictor

CHECKPOINT_SUFFIXES = (".pt", ".pth")
MLMODEL_FILE = "MLmodel"

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
# URI schemes resolved through the tracking store (and registry) rather than read from a location.
_STORE_SCHEMES = ("models", "runs")


class ModelLoadError(RuntimeError):
    """A model cannot be found or loaded; the message names the URI or path (and tracking store)."""


PYFUNC_CODE_FILE = "pyfunc_model.py"  # the registered pyfunc's code (registry.versions.PYFUNC_CODE)
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict: `probabilities(images)` -> {task: (N, classes) array}, tasks in the
    model's order."""

    source: str  # what was loaded, for messages: the URI or the files
    tasks: dict[str, list[str]]  # task -> class names, in label order
    image_size: int | None  # images are resized to this first (None: the model resizes each)
    probabilities: Callable[[list[np.ndarray]], dict[str, np.ndarray]]


def default_model_uri(cfg: PipelineConfig) -> str:
    return f"models:/{cfg.mlflow.model_name}@{CHAMPION}"


def is_model_uri(model: str) -> bool:
    return bool(_URI.match(model))


def load_model_for_prediction(model: str | None, root: Path, params: Path, raw: bool = False) -> LoadedModel:
    """`model`: an MLflow model URI or a local path (see the module docstring); None: the champion.

    The parameters file (relative to `root` unless absolute) is read only for an MLflow model, for the
    model name and the tracking store: a local model folder predicts outside any project.
    """
    if model and not is_model_uri(model):
        return load_local_model(Path(model), raw)
    from mtl_core.config import load_config

    # the model name and the store only: no augmentation built (it would import Albumentations)
    cfg = load_config(params if params.is_absolute() else root / params, build_augment=False)
    return load_mlflow_model(model or default_model_uri(cfg), cfg, root, raw)


def load_mlflow_model(uri: str, cfg: PipelineConfig, root: Path, raw: bool = False) -> LoadedModel:
    store = tracking_uri(cfg, root)
    db = sqlite_db_path(store)
    if uri.split(":", 1)[0].lower() in _STORE_SCHEMES and db is not None and not db.is_file():
        # MLflow would silently create an empty store
        raise ModelLoadError(
            f"cannot load model {uri}: no MLflow tracking store at {db} (tracking URI {store}); "
            "run the register stage first, or pass --model with a trained models/ folder"
        )
    if db is not None and (folder := registry_model_folder(db, uri)) is not None:
        if (local := _pyfunc_files(folder)) is not None:
            return _from_weights(*local, source=uri, raw=raw)
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(store)
    try:
        pyfunc = mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        raise ModelLoadError(f"cannot load model {uri} from tracking store {store}: {err.message}") from None
    except OSError as err:
        raise ModelLoadError(f"cannot load model {uri} from tracking store {store}: {err}") from None
    return _from_pyfunc(pyfunc, source=uri, raw=raw)


_REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?")


def registry_model_folder(db: Path, uri: str) -> Path | None:
    """The local folder of the model version that `models:/NAME@ALIAS` or `models:/NAME/VERSION` names in
    the SQLite store `db`, read from MLflow's registry tables (`registered_model_aliases`,
    `model_versions`) read-only; None whenever MLflow should answer instead: another kind of URI, a
    registry elsewhere ($MLFLOW_REGISTRY_URI) or in workspaces, no such version (MLflow's error says
    why), a version not READY or deleted, artifacts not on this machine, a schema this does not know."""
    match = _REGISTRY_URI.fullmatch(uri)
    if match is None or os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_WORKSPACE"):
        return None
    if os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true"):
        return None
    name, alias, version = match["name"], match["alias"], match["version"]
    columns = "v.status, v.current_stage, v.storage_location, v.source"
    if alias:  # workspaces off: every row is in MLflow's 'default' workspace
        query = (
            f"SELECT {columns} FROM registered_model_aliases a JOIN model_versions v ON v.workspace = a.workspace "
            "AND v.name = a.name AND v.version = a.version WHERE a.workspace = 'default' AND a.name = ? AND a.alias = ?"
        )
        args: tuple[Any, ...] = (name, alias)
    else:
        query = f"SELECT {columns} FROM model_versions v WHERE v.workspace = 'default' AND v.name = ? AND v.version = ?"
        args = (name, int(version))
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=20)) as conn:
            rows = conn.execute(query, args).fetchall()
    except sqlite3.Error:  # not MLflow's schema (an older one, a newer one): ask MLflow
        return None
    if len(rows) != 1:
        return None
    status, stage, storage_location, source = rows[0]
    if status != "READY" or stage == "Deleted_Internal":
        return None
    location = storage_location or source or ""
    parsed = urlparse(location)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        folder = Path(unquote(parsed.path))
    elif parsed.scheme == "" and Path(location).is_absolute():
        folder = Path(location)
    else:
        return None
    return folder if (folder / MLMODEL_FILE).is_file() else None


def _pyfunc_files(folder: Path) -> tuple[Path, Path] | None:
    """(spec, weights) of an MLflow model folder logged by this project's register stage (its pyfunc is
    `pyfunc_model.py` over a `spec` and a `weights` artifact); None for any other MLflow model."""
    import yaml

    try:
        mlmodel = yaml.safe_load((folder / MLMODEL_FILE).read_text())
        flavor = mlmodel["flavors"]["python_function"]
        artifacts = flavor["artifacts"]
        ours = flavor.get("loader_module") == CODE_MODEL_LOADER and Path(flavor["model_code_path"]).name == PYFUNC_CODE_FILE
        spec, weights = folder / artifacts["spec"]["path"], folder / artifacts["weights"]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return (spec, weights) if ours and spec.is_file() and weights.is_file() else None


def _from_pyfunc(pyfunc: Any, source: str, raw: bool = False) -> LoadedModel:
    """A model that only MLflow's pyfunc loader can load: its DataFrame answer read back as probabilities
    (`raw`: asked for with the pyfunc's parameter `raw`, which this project's pyfunc honours)."""
    metadata = getattr(pyfunc.metadata, "metadata", None) or {}
    tasks = metadata.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ModelLoadError(
            f"model {source} has no task metadata (metadata['tasks']); was it registered by `mtl register`?"
        )
    tasks = {str(t): [str(c) for c in cs] for t, cs in tasks.items()}
    size = metadata.get("image_size")
    return LoadedModel(
        source=source,
        tasks=tasks,
        image_size=int(size) if size else None,
        probabilities=lambda images: _frame_probabilities(
            pyfunc.predict(_as_batch(images), params={"raw": True}) if raw else pyfunc.predict(_as_batch(images)), tasks, source
        ),
    )


def _as_batch(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images)


def _frame_probabilities(frame: pd.DataFrame, tasks: dict[str, list[str]], source: str) -> dict[str, np.ndarray]:
    """{task: (N, classes)} from the pyfunc's `<task>_prob_<class>` columns, tasks in the columns' order
    (the MLmodel metadata has them sorted by name)."""
    expected = [c for t, cs in tasks.items() for c in (t, f"{t}_probability", *(f"{t}_prob_{c}" for c in cs))]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise ModelLoadError(f"model {source} returned no column(s) {', '.join(missing)}")
    order = sorted(tasks, key=frame.columns.get_loc)
    return {t: frame[[f"{t}_prob_{c}" for c in tasks[t]]].to_numpy(dtype=np.float64) for t in order}


def load_local_model(path: Path, raw: bool = False) -> LoadedModel:
    if not path.exists():
        raise FileNotFoundError(
            f"model not found: {path} is neither an MLflow model URI (e.g. models:/NAME@{CHAMPION}) "
            "nor an existing file or folder"
        )
    if path.is_dir():
        spec = path / SPEC_FILE
        if spec.is_file():
            for weights in (path / WEIGHTS_FILE, path / CHECKPOINT_FILE):
                if weights.is_file():
                    return _from_weights(spec, weights, raw=raw)
            raise FileNotFoundError(
                f"model folder {path} has {SPEC_FILE} but no weights: expected {WEIGHTS_FILE} (or {CHECKPOINT_FILE})"
            )
        if (path / MLMODEL_FILE).is_file():
            if (local := _pyfunc_files(path)) is not None:
                return _from_weights(*local, source=str(path), raw=raw)
            import mlflow
            from mlflow.exceptions import MlflowException

            try:
                return _from_pyfunc(mlflow.pyfunc.load_model(str(path)), source=str(path), raw=raw)
            except MlflowException as err:
                raise ModelLoadError(f"cannot load MLflow model folder {path}: {err.message}") from None
        raise FileNotFoundError(
            f"model folder {path} lacks {SPEC_FILE} (with {WEIGHTS_FILE} or {CHECKPOINT_FILE}), "
            f"as the train stage writes them to models/; nor is it an MLflow model folder ({MLMODEL_FILE})"
        )
    if path.suffix in (".safetensors", *CHECKPOINT_SUFFIXES):
        spec = path.with_name(SPEC_FILE)
        if not spec.is_file():
            raise FileNotFoundError(f"model weights {path} need {SPEC_FILE} next to them: {spec} not found")
        return _from_weights(spec, path, raw=raw)
    raise ValueError(
        f"--model {path}: expected a trained models/ folder, a .safetensors or .pt file next to its "
        f"{SPEC_FILE}, or an MLflow model URI such as models:/NAME@{CHAMPION}"
    )


def _from_weights(spec: Path, weights: Path, source: str | None = None, raw: bool = False) -> LoadedModel:
    from safetensors import SafetensorError

    from mtl_core.registry.predictor import MultiTaskPredictor

    try:
        if weights.suffix in CHECKPOINT_SUFFIXES:
            predictor = checkpoint_predictor(spec, weights, raw=raw)
        else:
            predictor = MultiTaskPredictor(spec, weights, raw=raw)
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"cannot load model: {spec} is not valid JSON: {err}") from None
    except (KeyError, OSError, RuntimeError, ValueError, SafetensorError, pickle.UnpicklingError) as err:
        # read_spec: ValueError; a spec without a key: KeyError; load_state_dict on other weights: RuntimeError
        raise ModelLoadError(f"cannot load model from {spec} and {weights}: {type(err).__name__}: {err}") from None
    return LoadedModel(
        source=source or str(weights),
        tasks=predictor.spec["tasks"],
        image_size=predictor.size,
        probabilities=predictor.probabilities,
    )


def checkpoint_predictor(spec_path: Path, checkpoint_path: Path, device: str = "cpu", raw: bool = False) -> MultiTaskPredictor:
    """A MultiTaskPredictor over a training checkpoint (`torch.save` of {"epoch", "model", "optimizer"} or of a
    bare state dict), read with `weights_only=True`: no code is unpickled.

    The weights go through a temporary safetensors file so that the network is rebuilt by the very code
    that loads the train stage's model.safetensors (`mtl_core.models.io.load_model`).
    """
    import torch
    from safetensors.torch import save_file

    from mtl_core.registry.predictor import MultiTaskPredictor

    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint_path}: neither a training checkpoint nor a state dict of tensors")
    with tempfile.TemporaryDirectory(prefix="mtl-predict-") as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(weights))
        return MultiTaskPredictor(spec_path, weights, device, raw=raw)
