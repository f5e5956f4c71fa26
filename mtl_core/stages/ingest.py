"""Stage `ingest`: a CSV manifest (a user's, or a generated built-in one) -> checked rows + a split.

Every row is checked: the path stays inside the dataset folder, the file exists and decodes as
data/images.py reads it (EXIF orientation, 16-bit and float scaling), every task has a label -
or, with `data.missing_labels: allow`, at least one task has -, the sample weight is a number >= 0, a
`split` cell names train/val/test, a group cell is not empty. A failing row is written to `rejected.csv`
with its reason, never dropped silently; above `data.max_rejected_fraction` the stage fails and names the
first bad rows.

Duplicates (data/duplicates.py): rows holding the same file (same path, or the same bytes under
another name) are merged into the first when they agree on every carried column and rejected, all of
them, when they do not; the report lists both. The split is the manifest's own `split` column when it has
one, else grouped by `data.split.group_column`, else stratified on the labels (data/split.py);
the report then states "no image and no group appears in two splits" after checking it on the content
hashes and groups, and refuses a split that leaves a split empty or a task without a labelled row in one.

Memory stays small as rows grow: records are read one chunk at a time, files are read, hashed and decoded
in a process pool, the checked rows go to a spool file on disk, and only compact per-row arrays (line,
content and path hashes, label codes, split and group codes: about 60 bytes a row) stay in memory for
the duplicate search and the split; a second pass over the spool writes the manifest.

The normalised manifest has the columns `row, path, <tasks...>, [<sample weight column>], split`; `row`
is the record's line in the CSV; an empty label cell (allowed rows only) stays empty and becomes
MISSING_LABEL in preprocess.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl_core.config import PipelineConfig
from mtl_core.data.builtin import BUILTIN_DATASETS
from mtl_core.data.disk import require_free_space
from mtl_core.data.ingest_report import NO_LEAK, data_report
from mtl_core.data.ingest_scan import (
    check_split, choose_split, classes_missing_from_training, drop_duplicates, numeric_label_clashes, scan_manifest,
    write_manifest, write_rejected,
)  # fmt: skip
from mtl_core.data.manifest import PATH_COLUMN, ROW_COLUMN, SPLIT_COLUMN, IngestError, ManifestFile, resolve_columns
from mtl_core.data.parallel import map_chunks
from mtl_core.data.split import shared_keys
from mtl_core.paths import ProjectPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    manifest: Path
    rejected: Path
    report: Path
    rows_kept: int
    rows_rejected: int


def _resolve_source(cfg: PipelineConfig, paths: ProjectPaths, workers: int | None) -> Path:
    """The CSV to ingest: generated for a built-in source, the user's file otherwise."""
    if cfg.data.is_builtin:
        out = paths.builtin_dir / cfg.data.builtin_name
        if out.exists():
            shutil.rmtree(out)
        b = cfg.data.builtin
        what = f"the built-in dataset ({b.num_images} images)"
        require_free_space(paths.builtin_dir, b.num_images * (b.image_size**2 * 3 + 100), what)  # PNGs of noise
        log.info("generating built-in dataset %r: %d images, seed %d", cfg.data.builtin_name, b.num_images, b.seed)

        def mapper(fn, chunks, total):
            return map_chunks(fn, chunks, total=total, desc="generate", workers=workers, size=lambda c: c[2] - c[1])

        return BUILTIN_DATASETS[cfg.data.builtin_name](out, b.num_images, b.image_size, b.seed, mapper=mapper)
    paths.builtin_dir.mkdir(parents=True, exist_ok=True)  # a DVC output of this stage, empty here
    csv_path = Path(cfg.data.source)
    return csv_path if csv_path.is_absolute() else paths.root / csv_path


def run_ingest(cfg: PipelineConfig, root: Path, workers: int | None = None) -> IngestResult:
    """workers: processes reading the files (None: every available core; 1: this process only)."""
    root = Path(root).resolve()
    paths = ProjectPaths(root)
    csv_path = _resolve_source(cfg, paths, workers)
    data = cfg.data
    mf = ManifestFile.open(csv_path, data.encoding)
    cols = resolve_columns(mf.header, csv_path, list(data.tasks), data.sample_weight_column, data.split.group_column)
    paths.ingested_dir.mkdir(parents=True, exist_ok=True)
    spool = paths.ingested_dir / ".ingest-spool.csv"
    try:
        scan = scan_manifest(mf, cols, cfg, root, spool, workers)
        if scan.rows_total == 0:
            raise IngestError(f"{csv_path}: manifest has no rows")
        a = scan.arrays()
        numeric_label_clashes(csv_path, scan, a)
        keep, merged, raw_paths = drop_duplicates(scan, a, cfg, spool)

        rejected = write_rejected(scan.rejected, paths.rejected)
        for r in rejected.head(20).itertuples(index=False):
            log.warning("%s line %d rejected (%s): %s", csv_path.name, r.row, r.path, r.reason)
        fraction = len(rejected) / scan.rows_total
        if fraction > data.max_rejected_fraction:
            first = "; ".join(f"row {r.row} ({r.path}): {r.reason}" for r in rejected.head(5).itertuples(index=False))
            raise IngestError(
                f"{csv_path}: {len(rejected)} of {scan.rows_total} rows rejected ({fraction:.1%}), above "
                f"data.max_rejected_fraction={data.max_rejected_fraction:g}. First bad rows: {first}. "
                f"All rejections with reasons: {paths.rejected}"
            )
        if not keep.any():
            raise IngestError(f"{csv_path}: no valid rows")
        kept = np.flatnonzero(keep)
        codes = a["codes"][kept]
        vocab = [list(v) for v in scan.vocab]
        classes = {}
        for k, t in enumerate(cols.tasks):
            present = np.bincount(codes[:, k][codes[:, k] >= 0], minlength=len(vocab[k])) > 0
            classes[t] = sorted(vocab[k][c] for c in np.flatnonzero(present))
            if len(classes[t]) < 2:
                found = f"a single class ({classes[t][0]!r})" if classes[t] else "no label"
                raise IngestError(
                    f"{csv_path}: task '{t}' has {found} among the valid rows; "
                    "a classification task needs at least two classes"
                )

        method, which = choose_split(csv_path, scan, a, kept, cfg)
        check_split(csv_path, method, cols.tasks, codes, which, cfg)
        unseen = classes_missing_from_training(codes, vocab, cols.tasks, which)
        for task, splits in unseen.items():
            log.warning(
                "ingest: task '%s': %s have no training image, so the model can never answer them and every "
                "such image counts as an error; give these classes more images (or merge rare classes)",
                task, "; ".join(f"{len(c)} {s} class(es) ({', '.join(map(repr, c[:5]))}{' ...' if len(c) > 5 else ''})" for s, c in splits.items()),
            )  # fmt: skip
        # the report's leakage statement, checked on what was decided rather than assumed from how
        images_shared = len(shared_keys(a["digests"][kept], which))
        groups_shared = len(shared_keys(a["groups"][kept], which)) if cols.group is not None else 0
        if images_shared or groups_shared:
            raise IngestError(
                f"{csv_path}: {images_shared} image(s) and {groups_shared} group(s) are in more than one split; "
                "a bug of the ingest stage, please report it"
            )

        full = np.zeros(len(keep), dtype=np.int8)
        full[kept] = which
        weight = [data.sample_weight_column] if cols.weight is not None else []
        header = [ROW_COLUMN, PATH_COLUMN, *cols.tasks, *weight, SPLIT_COLUMN]
        write_manifest(spool, paths.manifest, header, keep, full)
    finally:
        spool.unlink(missing_ok=True)

    report = data_report(cfg, root, csv_path, mf, scan, a, kept, which, method, classes, rejected, merged, raw_paths)
    report["classes_not_in_train"] = unseen  # per task and split: classes no training row has (warned above)
    paths.data_report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "ingest: kept %d rows, rejected %d, merged %d duplicates; split (%s) %s; %s (checked)",
        len(kept), len(rejected), report["duplicates"]["rows_merged"], method, report["split_sizes"], NO_LEAK,
    )  # fmt: skip
    return IngestResult(paths.manifest, paths.rejected, paths.data_report, len(kept), len(rejected))
