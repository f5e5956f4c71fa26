"""Stage `preprocess`: decode and resize every image once into uint8 arrays that training memory-maps.

Training then never decodes an image file again: each split is one `.npy` of shape (N, S, S, 3), read
with `np.load(mmap_mode="r")` by every DataLoader worker, and labels are int64 class indices with -1 for
a missing label (an empty manifest cell). `{split}_weights.npy` holds each sample's float32 loss weight:
the `data.sample_weight_column` values, or ones without that column.

Images are read by data/images.py, as ingest checked them (EXIF orientation, 16-bit scaling).
Bounded memory at any size: the manifest is streamed twice (counts and classes, then the rows), the
free disk is checked for the whole cache first, and a process pool decodes chunks of rows, each worker
writing its rows straight into the split's memory-mapped `.npy` (flushed per chunk), so neither the
pixels nor the paths of all rows are ever held at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from mtl_core.config import PipelineConfig
from mtl_core.data.cache import NPY_HEADER, encode_labels, manifest_records, write_images
from mtl_core.data.disk import require_free_space
from mtl_core.data.manifest import PATH_COLUMN, ROW_COLUMN, SPLIT_COLUMN, IngestError
from mtl_core.data.parallel import chunk_size, map_chunks
from mtl_core.paths import SPLITS, ProjectPaths
from mtl_core.tasks import TaskSpec
from mtl_core.transforms import train_transform

log = logging.getLogger(__name__)


def run_preprocess(cfg: PipelineConfig, root: Path, workers: int | None = None) -> Path:
    """workers: processes decoding images (None: every available core; 1: this process only)."""
    root = Path(root)
    paths = ProjectPaths(root)
    train_transform(cfg.preprocess, normalize=False)  # fail now, not in a DataLoader worker, on a bad augmentation
    records = manifest_records(paths.manifest)
    header = next(records, [])
    weight_column = cfg.data.sample_weight_column
    if weight_column is not None and weight_column not in header:
        raise IngestError(
            f"{paths.manifest}: no sample weight column '{weight_column}' (data.sample_weight_column); "
            f"columns found: {', '.join(header)}. Run the ingest stage again."
        )
    if PATH_COLUMN not in header or SPLIT_COLUMN not in header:
        raise IngestError(
            f"{paths.manifest}: not an ingested manifest (columns: {', '.join(header)}). Run the ingest stage again."
        )
    task_cols = [c for c in header if c not in (ROW_COLUMN, PATH_COLUMN, SPLIT_COLUMN, weight_column)]
    task_index = [header.index(t) for t in task_cols]
    path_i, split_i = header.index(PATH_COLUMN), header.index(SPLIT_COLUMN)
    weight_i = header.index(weight_column) if weight_column is not None else None

    # pass 1: split sizes and the classes of every task
    counts = dict.fromkeys(SPLITS, 0)
    classes: list[set[str]] = [set() for _ in task_cols]
    for r in records:
        if r[split_i] not in counts:
            raise IngestError(
                f"{paths.manifest}: split {r[split_i]!r} is not one of {', '.join(SPLITS)}. Run the ingest stage again."
            )
        counts[r[split_i]] += 1
        for seen, col in zip(classes, task_index):
            seen.add(r[col])
    tasks = TaskSpec({t: sorted(c for c in seen if c != "") for t, seen in zip(task_cols, classes)})

    size = cfg.preprocess.image_size
    paths.preprocessed_dir.mkdir(parents=True, exist_ok=True)
    outputs = [f(s) for s in SPLITS for f in (paths.images_cache, paths.labels_cache, paths.weights_cache)]
    total = sum(counts.values())
    needed = sum(3 * NPY_HEADER + n * (size * size * 3 + 8 * len(task_cols) + 4) for n in counts.values())
    replaced = sum(p.stat().st_size for p in outputs if p.is_file())
    require_free_space(paths.preprocessed_dir, needed, f"the image cache ({total} images at {size}x{size}x3)", replaced)

    for p in outputs:
        p.unlink(missing_ok=True)  # a new file: never write through a link into DVC's cache
    caches = {}
    for s in SPLITS:
        n = counts[s]
        np.lib.format.open_memmap(paths.images_cache(s), mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
        caches[s] = (
            np.lib.format.open_memmap(paths.labels_cache(s), mode="w+", dtype=np.int64, shape=(n, len(task_cols))),
            np.lib.format.open_memmap(paths.weights_cache(s), mode="w+", dtype=np.float32, shape=(n,)),
        )

    # pass 2: labels and weights here, pixels in the pool
    step = chunk_size(total, workers, largest=256)
    filled = dict.fromkeys(SPLITS, 0)

    def jobs() -> Iterator[tuple[str, int, list[str]]]:
        pending: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
        rows = manifest_records(paths.manifest)
        next(rows)

        def flush(s: str) -> tuple[str, int, list[str]]:
            batch, start = pending[s], filled[s]
            labels, weights = caches[s]
            labels[start : start + len(batch)] = encode_labels(batch, task_index, tasks)
            weights[start : start + len(batch)] = [float(r[weight_i]) for r in batch] if weight_i is not None else 1.0
            filled[s] += len(batch)
            pending[s] = []
            return s, start, [r[path_i] for r in batch]

        for r in rows:
            s = r[split_i]
            pending[s].append(r)
            if len(pending[s]) == step:
                yield flush(s)
        for s in SPLITS:
            if pending[s]:
                yield flush(s)

    write = partial(write_images, {s: str(paths.images_cache(s)) for s in SPLITS}, str(root), size)
    for _ in map_chunks(write, jobs(), total=total, desc="preprocess", workers=workers, size=lambda job: len(job[2])):
        pass
    for labels, weights in caches.values():
        labels.flush()
        weights.flush()
    del caches
    for s in SPLITS:
        log.info("preprocess: %s split, %d images at %dx%d", s, counts[s], size, size)
    tasks.save(paths.tasks_file)
    return paths.preprocessed_dir
