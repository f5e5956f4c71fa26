"""`mtl predict`: class and probability per task for image files, from a registered or a local model.

A model is named either by an MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`,
`runs:/RUN_ID/model`, ...), loaded as the registered pyfunc from the project's tracking store, or by a
local path:

- a trained-model folder (the train stage's `models/`): `model_spec.json` plus `model.safetensors`
  (the best-on-validation weights), or, when there are no safetensors, `checkpoint.pt` (last epoch);
- a `.safetensors` file, or a training checkpoint `.pt`/`.pth` file (read with `weights_only=True`),
  each with the `model_spec.json` next to it;
- a downloaded MLflow model folder (one with an `MLmodel` file), loaded as a pyfunc.

The first two need neither MLflow nor a params.yaml: they predict with `MultiTaskPredictor` directly.

Every error names the thing at fault (image file, model URI and tracking store, model folder and the
files it lacks) and is a ValueError, FileNotFoundError or RuntimeError, which the CLI reports as such.
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import save_file

from mtl_core.config import PipelineConfig, load_config
from mtl_core.registry.predictor import MultiTaskPredictor
from mtl_core.transforms import resize_rgb

CHAMPION = "champion"  # same alias as mtl_core.registry.register (not imported: that pulls in MLflow)
SPEC_FILE = "model_spec.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_SUFFIXES = (".pt", ".pth")
MLMODEL_FILE = "MLmodel"
BATCH_SIZE = 64
# A URI scheme of two characters or more: `models:/x`, `runs:/x`, `s3://x`; not a Windows drive `C:\x`.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
# URI schemes resolved through the tracking store (and registry) rather than read from a location.
_STORE_SCHEMES = ("models", "runs")


class ImageReadError(ValueError):
    """An image file cannot be read or decoded; the message names the file."""


class ModelLoadError(RuntimeError):
    """A model cannot be found or loaded; the message names the URI or path (and tracking store)."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict: `predict(images)` -> the pyfunc's DataFrame (`<task>`, ...)."""

    source: str  # what was loaded, for messages: the URI or the files
    tasks: dict[str, list[str]]  # task -> class names, in label order
    image_size: int | None  # images are resized to this first (None: the model resizes each)
    predict: Callable[[np.ndarray | list[np.ndarray]], pd.DataFrame]


# --------------------------------------------------------------------------------------------- images


def check_images(images: Sequence[str | Path]) -> list[Path]:
    """Fail early, before loading a model, on a missing file or one that is not an image."""
    if not images:
        raise ValueError("no images given")
    paths = [Path(p) for p in images]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"image not found: {path}")
        if not path.is_file():
            raise ImageReadError(f"not an image file: {path} is a folder")
        try:
            with Image.open(path):  # reads the header only
                pass
        except UnidentifiedImageError:
            raise ImageReadError(f"cannot read image {path}: not an image format Pillow recognises") from None
        except (OSError, Image.DecompressionBombError) as err:
            raise ImageReadError(f"cannot read image {path}: {err}") from None
    return paths


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """Any mode and size -> uint8 RGB (H, W, 3); resized to (size, size) when size is given."""
    try:
        with Image.open(path) as im:
            im.load()
            if size is not None:
                return resize_rgb(im, size)
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # what PIL raises on bad files
        raise ImageReadError(f"cannot read image {path}: {err}") from None


# --------------------------------------------------------------------------------------------- models


def default_model_uri(cfg: PipelineConfig) -> str:
    return f"models:/{cfg.mlflow.model_name}@{CHAMPION}"


def is_model_uri(model: str) -> bool:
    return bool(_URI.match(model))


def load_model_for_prediction(model: str | None, root: Path, params: Path) -> LoadedModel:
    """`model`: an MLflow model URI or a local path (see the module docstring); None: the champion.

    The parameters file (relative to `root` unless absolute) is read only for an MLflow model, for the
    model name and the tracking store: a local model folder predicts outside any project.
    """
    if model and not is_model_uri(model):
        return load_local_model(Path(model))
    cfg = load_config(params if params.is_absolute() else root / params)
    return load_mlflow_model(model or default_model_uri(cfg), cfg, root)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///FILE` URI (SQLAlchemy's form: four slashes for an absolute path)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    return None if path in ("", ":memory:") else Path(path)


def load_mlflow_model(uri: str, cfg: PipelineConfig, root: Path) -> LoadedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    from mtl_core.tracking import tracking_uri

    store = tracking_uri(cfg, root)
    if uri.split(":", 1)[0].lower() in _STORE_SCHEMES:
        db = _sqlite_file(store)
        if db is not None and not db.is_file():  # MLflow would silently create an empty store
            raise ModelLoadError(
                f"cannot load model {uri}: no MLflow tracking store at {db} (tracking URI {store}); "
                "run the register stage first, or pass --model with a trained models/ folder"
            )
    mlflow.set_tracking_uri(store)
    try:
        pyfunc = mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        raise ModelLoadError(f"cannot load model {uri} from tracking store {store}: {err.message}") from None
    except OSError as err:
        raise ModelLoadError(f"cannot load model {uri} from tracking store {store}: {err}") from None
    return _from_pyfunc(pyfunc, source=uri)


def _from_pyfunc(pyfunc: Any, source: str) -> LoadedModel:
    metadata = getattr(pyfunc.metadata, "metadata", None) or {}
    tasks = metadata.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ModelLoadError(
            f"model {source} has no task metadata (metadata['tasks']); was it registered by `mtl register`?"
        )
    size = metadata.get("image_size")
    return LoadedModel(
        source=source,
        tasks={str(t): [str(c) for c in cs] for t, cs in tasks.items()},
        image_size=int(size) if size else None,
        predict=lambda images: pyfunc.predict(_as_batch(images)),
    )


def _as_batch(images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    return images if isinstance(images, np.ndarray) else np.stack(images)


def load_local_model(path: Path) -> LoadedModel:
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
                    return _from_weights(spec, weights)
            raise FileNotFoundError(
                f"model folder {path} has {SPEC_FILE} but no weights: expected {WEIGHTS_FILE} (or {CHECKPOINT_FILE})"
            )
        if (path / MLMODEL_FILE).is_file():
            import mlflow
            from mlflow.exceptions import MlflowException

            try:
                return _from_pyfunc(mlflow.pyfunc.load_model(str(path)), source=str(path))
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
        return _from_weights(spec, path)
    raise ValueError(
        f"--model {path}: expected a trained models/ folder, a .safetensors or .pt file next to its "
        f"{SPEC_FILE}, or an MLflow model URI such as models:/NAME@{CHAMPION}"
    )


def _from_weights(spec: Path, weights: Path) -> LoadedModel:
    try:
        if weights.suffix in CHECKPOINT_SUFFIXES:
            predictor = checkpoint_predictor(spec, weights)
        else:
            predictor = MultiTaskPredictor(spec, weights)
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"cannot load model: {spec} is not valid JSON: {err}") from None
    except (KeyError, OSError, RuntimeError, ValueError, SafetensorError, pickle.UnpicklingError) as err:
        # read_spec: ValueError; a spec without a key: KeyError; load_state_dict on other weights: RuntimeError
        raise ModelLoadError(f"cannot load model from {spec} and {weights}: {type(err).__name__}: {err}") from None
    return LoadedModel(
        source=str(weights),
        tasks=predictor.spec["tasks"],
        image_size=predictor.size,
        predict=predictor.predict_images,
    )


def checkpoint_predictor(spec_path: Path, checkpoint_path: Path, device: str = "cpu") -> MultiTaskPredictor:
    """A MultiTaskPredictor over a training checkpoint (`torch.save` of {"epoch", "model", "optimizer"} or of a
    bare state dict), read with `weights_only=True`: no code is unpickled.

    The weights go through a temporary safetensors file so that the network is rebuilt by the very code
    that loads the train stage's model.safetensors (`mtl_core.models.io.load_model`).
    """
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint_path}: neither a training checkpoint nor a state dict of tensors")
    with tempfile.TemporaryDirectory(prefix="mtl-predict-") as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(weights))
        return MultiTaskPredictor(spec_path, weights, device)


# ----------------------------------------------------------------------------------------- prediction


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_files(model: LoadedModel, images: Sequence[Path], batch_size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """One record per image: {"image", "predictions": {task: {"class", "probability", "probabilities"}}}."""
    records: list[dict[str, Any]] = []
    for chunk in _batches(list(images), batch_size):
        arrays = [read_image(p, model.image_size) for p in chunk]
        # without a known size the model resizes each image itself; sizes may differ, so one at a time
        frames = [model.predict(arrays)] if model.image_size else [model.predict(a[None]) for a in arrays]
        frame = pd.concat(frames, ignore_index=True)
        tasks = _task_order(model, frame)
        for path, row in zip(chunk, frame.to_dict("records"), strict=True):
            predictions = {t: _task_prediction(row, t, model.tasks[t]) for t in tasks}
            records.append({"image": str(path), "predictions": predictions})
    return records


def _task_order(model: LoadedModel, frame: pd.DataFrame) -> list[str]:
    """The model's tasks in its output's column order (the registry's metadata has them sorted by name)."""
    expected = [c for t, cs in model.tasks.items() for c in (t, f"{t}_probability", *(f"{t}_prob_{c}" for c in cs))]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise ModelLoadError(f"model {model.source} returned no column(s) {', '.join(missing)}")
    return sorted(model.tasks, key=frame.columns.get_loc)


def _task_prediction(row: dict[str, Any], task: str, classes: list[str]) -> dict[str, Any]:
    return {
        "class": str(row[task]),
        "probability": float(row[f"{task}_probability"]),
        "probabilities": {c: float(row[f"{task}_prob_{c}"]) for c in classes},
    }


def predict(
    images: Sequence[str | Path],
    model: str | None = None,
    root: str | Path = ".",
    params: str | Path = "params.yaml",
) -> list[dict[str, Any]]:
    """`mtl predict` as a function: checks the images, loads the model, returns one record per image."""
    paths = check_images(images)
    return predict_files(load_model_for_prediction(model, Path(root).resolve(), Path(params)), paths)


# -------------------------------------------------------------------------------------------- output


def to_json(records: list[dict[str, Any]]) -> str:
    return json.dumps(records, indent=2)


def print_table(records: list[dict[str, Any]], source: str | None = None) -> None:
    """One row per image and task; not wrapped when stdout is not a terminal (a file, a pipe)."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text  # plain text: a "[...]" in a file or class name is not rich markup

    table = Table(title=Text(f"predictions of {source}") if source else None, title_justify="left")
    table.add_column("image", no_wrap=True)
    table.add_column("task")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for record in records:
        items = list(record["predictions"].items())
        for i, (task, p) in enumerate(items):
            table.add_row(
                Text(record["image"] if i == 0 else ""), Text(task), Text(p["class"]), f"{p['probability']:.4f}",
                end_section=i == len(items) - 1,
            )  # fmt: skip
    console = Console()
    if not console.is_terminal:
        needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
        console.width = max(console.width, needed)
    console.print(table)
