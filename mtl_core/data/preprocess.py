"""Stage `preprocess`: decode and resize every image once into uint8 arrays that training memory-maps.

Training then never decodes an image file again: each split is one `.npy` of shape (N, S, S, 3), read
with `np.load(mmap_mode="r")` by every DataLoader worker, and labels are int64 class indices with -1 for
a missing label (an empty manifest cell). `{split}_weights.npy` holds each sample's float32 loss weight:
the `data.sample_weight_column` values, or ones without that column.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mtl_core.config import PipelineConfig
from mtl_core.data.ingest import PATH_COLUMN, SPLIT_COLUMN, IngestError
from mtl_core.paths import SPLITS, ProjectPaths
from mtl_core.tasks import MISSING_LABEL, TaskSpec
from mtl_core.transforms import resize_rgb, train_transform

log = logging.getLogger(__name__)


def _load(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return resize_rgb(im, size)


def encode_labels(frame: pd.DataFrame, tasks: TaskSpec) -> np.ndarray:
    labels = np.full((len(frame), len(tasks.names)), MISSING_LABEL, dtype=np.int64)
    for k, task in enumerate(tasks.names):
        index = {c: i for i, c in enumerate(tasks.classes[task])}
        col = frame[task].fillna("").astype(str)
        labels[:, k] = [index.get(v, MISSING_LABEL) for v in col]
    return labels


def encode_weights(frame: pd.DataFrame, weight_column: str | None) -> np.ndarray:
    """Per-sample loss weights (N,) float32: the column's values, or ones without a weight column."""
    if weight_column is None:
        return np.ones(len(frame), dtype=np.float32)
    return frame[weight_column].astype(np.float64).to_numpy(dtype=np.float32)


def run_preprocess(cfg: PipelineConfig, root: Path) -> Path:
    paths = ProjectPaths(root)
    train_transform(cfg.preprocess)  # fail now, not in a DataLoader worker, on a bad augmentation
    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
    weight_column = cfg.data.sample_weight_column
    if weight_column is not None and weight_column not in manifest.columns:
        raise IngestError(
            f"{paths.manifest}: no sample weight column '{weight_column}' (data.sample_weight_column); "
            f"columns found: {', '.join(manifest.columns)}. Run the ingest stage again."
        )
    tasks_cols = [c for c in manifest.columns if c not in ("row", PATH_COLUMN, SPLIT_COLUMN, weight_column)]
    tasks = TaskSpec({t: sorted(v for v in manifest[t].unique() if v != "") for t in tasks_cols})
    paths.preprocessed_dir.mkdir(parents=True, exist_ok=True)
    size = cfg.preprocess.image_size

    for split in SPLITS:
        part = manifest[manifest[SPLIT_COLUMN] == split].reset_index(drop=True)
        images = np.lib.format.open_memmap(
            paths.images_cache(split), mode="w+", dtype=np.uint8, shape=(len(part), size, size, 3)
        )
        files = [root / p for p in part[PATH_COLUMN]]
        with ThreadPoolExecutor(max_workers=4) as pool:
            for i, arr in enumerate(pool.map(lambda p: _load(p, size), files)):
                images[i] = arr
        images.flush()
        del images
        np.save(paths.labels_cache(split), encode_labels(part, tasks))
        np.save(paths.weights_cache(split), encode_weights(part, weight_column))
        log.info("preprocess: %s split, %d images at %dx%d", split, len(part), size, size)
    tasks.save(paths.tasks_file)
    return paths.preprocessed_dir
