"""The preprocessed cache: per split, uint8 images (N, S, S, 3) in a memory-mapped `.npy`, int64 labels
(-1 for a missing label) and float32 sample weights; here the pieces the preprocess stage fills it with."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mtl_core.data.images import ImageError, read_rgb, resize_rgb
from mtl_core.data.manifest import IngestError
from mtl_core.tasks import MISSING_LABEL, TaskSpec

NPY_HEADER = 128  # bytes before the array in a .npy file (format 1.0)


def encode_labels(rows: list[list[str]], task_index: list[int], tasks: TaskSpec) -> np.ndarray:
    """(N, T) int64 class indices of the rows' label cells; MISSING_LABEL for an empty cell."""
    labels = np.full((len(rows), len(tasks.names)), MISSING_LABEL, dtype=np.int64)
    for k, (task, col) in enumerate(zip(tasks.names, task_index)):
        index = {c: i for i, c in enumerate(tasks.classes[task])}
        labels[:, k] = [index.get(r[col], MISSING_LABEL) for r in rows]
    return labels


def manifest_records(manifest: Path) -> Iterator[list[str]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        yield from csv.reader(f)


def write_images(images: dict[str, str], root: str, size: int, job: tuple[str, int, list[str]]) -> int:
    """Decode, resize and write rows start.. of one split's cache (in a worker); returns how many."""
    split, start, files = job
    cache = np.load(images[split], mmap_mode="r+")
    try:
        for i, rel in enumerate(files):
            path = Path(root) / rel
            try:
                cache[start + i] = resize_rgb(read_rgb(path), size)
            except (ImageError, OSError) as err:
                raise IngestError(f"{path}: {err}; it decoded at ingest: run the ingest stage again") from None
        cache.flush()
    finally:
        del cache
    return len(files)
