"""`mtl predict`: class and probability per task for image files, from a registered or a local model
(registry.model_source), as records, JSON or a table."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl_core.registry.image_files import check_images, read_image
from mtl_core.registry.model_source import LoadedModel, load_model_for_prediction

BATCH_SIZE = 64


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_files(model: LoadedModel, images: Sequence[Path], batch_size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """One record per image: {"image", "predictions": {task: {"class", "probability", "probabilities"}}}."""
    records: list[dict[str, Any]] = []
    for chunk in _batches(list(images), batch_size):
        arrays = [read_image(p, model.image_size) for p in chunk]
        # without a known size the model resizes each image itself; sizes may differ, so one at a time
        answers = [model.probabilities(arrays)] if model.image_size else [model.probabilities([a]) for a in arrays]
        rows = [(answer, i) for answer in answers for i in range(len(next(iter(answer.values()))))]
        for path, (answer, i) in zip(chunk, rows, strict=True):
            predictions = {t: _task_prediction(p[i], model.tasks[t]) for t, p in answer.items()}
            records.append({"image": str(path), "predictions": predictions})
    return records


def _task_prediction(probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    best = int(probs.argmax())
    return {
        "class": str(classes[best]),
        "probability": float(probs[best]),
        "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
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
