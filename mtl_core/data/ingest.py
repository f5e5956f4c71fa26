"""Stage `ingest`: a CSV manifest (a user's, or a generated built-in one) -> checked rows + a split.

Every row is checked (the path stays inside the dataset folder, the file exists and decodes, every task
has a label - or, with `data.missing_labels: allow`, at least one task has -, the sample weight is a
number >= 0). A failing row is written to `rejected.csv` with its reason, never dropped silently; above
`data.max_rejected_fraction` the stage fails and names the first bad rows.

The normalised manifest has the columns `row, path, <tasks...>, [<sample weight column>], split`; an empty
label cell (allowed rows only) stays empty and becomes MISSING_LABEL in preprocess.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from mtl_core.config import PipelineConfig
from mtl_core.data.builtin import BUILTIN_DATASETS
from mtl_core.data.split import stratified_split
from mtl_core.paths import SPLITS, ProjectPaths

log = logging.getLogger(__name__)

PATH_COLUMN = "path"
SPLIT_COLUMN = "split"


class IngestError(ValueError):
    """The manifest cannot be ingested; the message names the file, column or rows at fault."""


@dataclass(frozen=True)
class IngestResult:
    manifest: Path
    rejected: Path
    report: Path
    rows_kept: int
    rows_rejected: int


def _resolve_source(cfg: PipelineConfig, paths: ProjectPaths) -> Path:
    """The CSV to ingest: generated for a built-in source, the user's file otherwise."""
    if cfg.data.is_builtin:
        out = paths.builtin_dir / cfg.data.builtin_name
        if out.exists():
            shutil.rmtree(out)
        b = cfg.data.builtin
        log.info("generating built-in dataset %r: %d images, seed %d", cfg.data.builtin_name, b.num_images, b.seed)
        return BUILTIN_DATASETS[cfg.data.builtin_name](out, b.num_images, b.image_size, b.seed)
    paths.builtin_dir.mkdir(parents=True, exist_ok=True)  # a DVC output of this stage, empty here
    csv = Path(cfg.data.source)
    return csv if csv.is_absolute() else paths.root / csv


def read_manifest(
    csv_path: Path, tasks: list[str], weight_column: str | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Read the manifest as strings and check its columns; returns the frame and the task list.

    `weight_column` (data.sample_weight_column) must be a column of the manifest and is never a task.
    """
    if not csv_path.is_file():
        raise IngestError(f"manifest not found: {csv_path}")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise IngestError(f"{csv_path}: not a readable CSV: {err}") from None
    df.columns = [c.strip() for c in df.columns]
    if PATH_COLUMN not in df.columns:
        raise IngestError(
            f"{csv_path}: no '{PATH_COLUMN}' column; columns found: {', '.join(df.columns) or '(none)'}"
        )
    if weight_column is not None:
        if weight_column in (PATH_COLUMN, SPLIT_COLUMN):
            raise IngestError(
                f"{csv_path}: '{weight_column}' cannot be the sample weight column (data.sample_weight_column)"
            )
        if weight_column not in df.columns:
            raise IngestError(
                f"{csv_path}: sample weight column '{weight_column}' (data.sample_weight_column) not in the "
                f"manifest; columns found: {', '.join(df.columns)}"
            )
        if weight_column in tasks:
            raise IngestError(
                f"{csv_path}: column '{weight_column}' is the sample weight column (data.sample_weight_column) "
                "and cannot also be a task"
            )
    label_columns = [c for c in df.columns if c not in (PATH_COLUMN, weight_column)]
    if not tasks:
        tasks = label_columns
    unknown = [t for t in tasks if t not in label_columns]
    if unknown:
        raise IngestError(
            f"{csv_path}: task column(s) {', '.join(map(repr, unknown))} not in the manifest; "
            f"label columns found: {', '.join(label_columns) or '(none)'}"
        )
    if not tasks:
        raise IngestError(f"{csv_path}: no label columns besides '{PATH_COLUMN}'")
    if SPLIT_COLUMN in tasks:
        raise IngestError(f"{csv_path}: '{SPLIT_COLUMN}' is reserved and cannot be a task column")
    return df, list(tasks)


def _check_image(path: Path) -> str | None:
    """None if the file decodes as an image, else the reason it does not."""
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return f"image does not decode: {type(err).__name__}: {err}"
    return None


def _resolve_row_path(raw: str, dataset_dir: Path) -> tuple[Path | None, str | None]:
    """Resolve a manifest path under the dataset folder; refuse any path that leaves it."""
    if not raw.strip():
        return None, "empty path"
    candidate = (dataset_dir / raw.strip()).resolve()
    if not candidate.is_relative_to(dataset_dir):
        return None, f"path escapes the dataset folder {dataset_dir}"
    if not candidate.is_file():
        return None, "file not found"
    return candidate, None


def _check_labels(tasks: list[str], labels: list[str], allow_missing: bool) -> str | None:
    """None if the row's labels are acceptable, else the reason they are not."""
    missing = [t for t, v in zip(tasks, labels) if not str(v).strip()]
    if not missing:
        return None
    if not allow_missing:
        return "missing label for task(s) " + ", ".join(map(repr, missing))
    if len(missing) == len(tasks):
        return "no label for any task"
    return None


def _check_weight(raw: str, column: str) -> str | None:
    """None if `raw` is a finite number >= 0, else the reason (naming the column) it is not."""
    try:
        value = float(str(raw).strip())
    except ValueError:
        return f"sample weight column '{column}': not a number ({raw!r})"
    if not math.isfinite(value):
        return f"sample weight column '{column}': not a finite number ({raw!r})"
    if value < 0:
        return f"sample weight column '{column}': negative ({raw!r})"
    return None


def validate_rows(
    df: pd.DataFrame,
    tasks: list[str],
    dataset_dir: Path,
    allow_missing: bool = False,
    weight_column: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the manifest into kept rows (with resolved paths) and rejected rows (with reasons).

    allow_missing: keep a row with some (not all) empty label cells. weight_column: checked (a number
    >= 0) and carried into the kept rows as floats, after the task columns.
    """
    dataset_dir = dataset_dir.resolve()
    weights = df[weight_column] if weight_column is not None else pd.Series("1", index=df.index)
    reasons: list[str | None] = []
    resolved: list[Path | None] = []
    for weight, (raw_path, *labels) in zip(weights, df[[PATH_COLUMN, *tasks]].itertuples(index=False, name=None)):
        path, reason = _resolve_row_path(raw_path, dataset_dir)
        if reason is None:
            reason = _check_labels(tasks, labels, allow_missing)
        if reason is None and weight_column is not None:
            reason = _check_weight(weight, weight_column)
        reasons.append(reason)
        resolved.append(path)

    to_decode = [i for i, r in enumerate(reasons) if r is None]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i, reason in zip(to_decode, pool.map(_check_image, [resolved[i] for i in to_decode])):
            reasons[i] = reason

    rows = pd.Series(range(len(df)), index=df.index) + 2  # CSV line numbers: header is line 1
    bad = pd.Series([r is not None for r in reasons], index=df.index)
    rejected = pd.DataFrame(
        {"row": rows[bad], PATH_COLUMN: df.loc[bad, PATH_COLUMN], "reason": [r for r in reasons if r is not None]}
    )
    kept = df.loc[~bad, [PATH_COLUMN, *tasks]].copy()
    kept[PATH_COLUMN] = [resolved[i] for i in range(len(df)) if not bad.iloc[i]]
    for t in tasks:
        kept[t] = kept[t].str.strip()
    if weight_column is not None:
        kept[weight_column] = [float(str(v).strip()) for v in df.loc[~bad, weight_column]]
    kept.insert(0, "row", rows[~bad])
    return kept.reset_index(drop=True), rejected.reset_index(drop=True)


def _portable(path: Path, root: Path) -> str:
    """Path relative to the project when inside it (outputs stay valid in another clone), else absolute."""
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def run_ingest(cfg: PipelineConfig, root: Path) -> IngestResult:
    paths = ProjectPaths(root)
    csv_path = _resolve_source(cfg, paths)
    weight_column = cfg.data.sample_weight_column
    df, tasks = read_manifest(csv_path, list(cfg.data.tasks), weight_column)
    if df.empty:
        raise IngestError(f"{csv_path}: manifest has no rows")
    kept, rejected = validate_rows(
        df, tasks, csv_path.parent, allow_missing=cfg.data.missing_labels == "allow", weight_column=weight_column
    )

    paths.ingested_dir.mkdir(parents=True, exist_ok=True)
    rejected.to_csv(paths.rejected, index=False)
    fraction = len(rejected) / len(df)
    for r in rejected.head(20).itertuples(index=False):
        log.warning("%s row %d rejected (%s): %s", csv_path.name, r.row, r.path, r.reason)
    if fraction > cfg.data.max_rejected_fraction:
        first = "; ".join(f"row {r.row} ({r.path}): {r.reason}" for r in rejected.head(5).itertuples(index=False))
        raise IngestError(
            f"{csv_path}: {len(rejected)} of {len(df)} rows rejected ({fraction:.1%}), above "
            f"data.max_rejected_fraction={cfg.data.max_rejected_fraction:g}. First bad rows: {first}. "
            f"All rejections with reasons: {paths.rejected}"
        )
    if kept.empty:
        raise IngestError(f"{csv_path}: no valid rows")
    classes = {t: sorted(c for c in kept[t].unique() if c != "") for t in tasks}  # "": a missing label
    for t in tasks:
        if len(classes[t]) < 2:
            found = f"a single class ({classes[t][0]!r})" if classes[t] else "no label"
            raise IngestError(
                f"{csv_path}: task '{t}' has {found} among the valid rows; "
                "a classification task needs at least two classes"
            )

    split = cfg.data.split
    kept[SPLIT_COLUMN] = stratified_split(
        kept[tasks], {"train": split.train, "val": split.val, "test": split.test}, seed=split.seed
    )
    kept[PATH_COLUMN] = [_portable(p, root) for p in kept[PATH_COLUMN]]
    kept.to_csv(paths.manifest, index=False)

    in_split = {s: kept[SPLIT_COLUMN] == s for s in SPLITS}
    labelled = {t: kept[t] != "" for t in tasks}
    report = {
        "source": cfg.data.source,
        "manifest": _portable(csv_path.resolve(), root),
        "tasks": classes,
        "rows_total": len(df),
        "rows_kept": len(kept),
        "rows_rejected": len(rejected),
        "rejected_reasons": dict(Counter(r.split(":")[0] for r in rejected["reason"])),
        "split_sizes": {s: int(in_split[s].sum()) for s in SPLITS},
        "class_counts": {
            t: {s: {c: int(n) for c, n in kept.loc[in_split[s] & labelled[t], t].value_counts().sort_index().items()}
                for s in SPLITS}
            for t in tasks
        },
        "missing_labels": {t: int((~labelled[t]).sum()) for t in tasks},
        "labelled_counts": {t: {s: int((in_split[s] & labelled[t]).sum()) for s in SPLITS} for t in tasks},
        "sample_weight_column": weight_column,
    }
    paths.data_report.write_text(json.dumps(report, indent=2) + "\n")
    log.info("ingest: kept %d rows, rejected %d; split %s", len(kept), len(rejected), report["split_sizes"])
    return IngestResult(paths.manifest, paths.rejected, paths.data_report, len(kept), len(rejected))
