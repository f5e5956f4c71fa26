"""Stage `ingest`: a CSV manifest (a user's, or a generated built-in one) -> checked rows + a split.

Every row is checked: the path stays inside the dataset folder, the file exists and decodes as
mtl_core/data/images.py reads it (EXIF orientation, 16-bit and float scaling), every task has a label -
or, with `data.missing_labels: allow`, at least one task has -, the sample weight is a number >= 0, a
`split` cell names train/val/test, a group cell is not empty. A failing row is written to `rejected.csv`
with its reason, never dropped silently; above `data.max_rejected_fraction` the stage fails and names the
first bad rows.

Duplicates (mtl_core/data/duplicates.py): rows holding the same file (same path, or the same bytes under
another name) are merged into the first when they agree on every carried column and rejected, all of
them, when they do not; the report lists both. The split is the manifest's own `split` column when it has
one, else grouped by `data.split.group_column`, else stratified on the labels (mtl_core/data/split.py);
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

import csv
import hashlib
import json
import logging
import math
import os
import shutil
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from mtl_core.config import PipelineConfig
from mtl_core.data import images
from mtl_core.data.builtin import BUILTIN_DATASETS
from mtl_core.data.disk import require_free_space
from mtl_core.data.duplicates import DuplicateSet, find_duplicates
from mtl_core.data.manifest import (
    PATH_COLUMN,
    ROW_COLUMN,
    SPLIT_COLUMN,
    Columns,
    IngestError,
    ManifestFile,
    clean,
    resolve_columns,
)
from mtl_core.data.parallel import chunk_size, map_chunks
from mtl_core.data.split import (
    SPLIT_VALUES,
    grouped_split,
    parse_split,
    shared_keys,
    split_balance,
    stratified_split_codes,
)
from mtl_core.paths import SPLITS, ProjectPaths

__all__ = ["PATH_COLUMN", "SPLIT_COLUMN", "IngestError", "IngestResult", "run_ingest"]

log = logging.getLogger(__name__)

NO_LEAK = "no image and no group appears in two splits"


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


# --- per file, in the worker processes ------------------------------------------------------------------


def _resolve_row_path(raw: str, dataset_dir: Path) -> tuple[Path | None, str | None]:
    """Resolve a manifest path under the dataset folder; refuse any path that leaves it (symlinks too)."""
    if not raw.strip():
        return None, "empty path"
    try:
        candidate = (dataset_dir / raw.strip()).resolve()
        if not candidate.is_relative_to(dataset_dir):
            return None, f"path escapes the dataset folder {dataset_dir}"
        if not candidate.is_file():
            return None, "file not found"
    except (OSError, ValueError) as err:  # a NUL byte, a name too long, no permission on a folder
        return None, f"unusable path: {type(err).__name__}: {err}"
    return candidate, None


def _portable(path: Path, root: Path) -> str:
    """Path relative to the project when inside it (outputs stay valid in another clone), else absolute."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


@dataclass(frozen=True)
class _FileCheck:
    """What a worker found about one row's file."""

    path_reason: str | None = None  # the path is unusable (before any label reason)
    decode_reason: str | None = None  # the file does not read or decode (after the label reasons)
    portable: str | None = None
    digest: bytes | None = None  # of the file's bytes
    path_key: bytes | None = None  # of the resolved path
    info: images.ImageInfo | None = None


def _inspect_files(dataset_dir: str, root: str, items: list[tuple[str, bool]]) -> list[_FileCheck]:
    """For each (raw path, decode it?): resolve the path; read, hash and decode the file."""
    folder, project = Path(dataset_dir), Path(root)
    out = []
    for raw, decode in items:
        path, reason = _resolve_row_path(raw, folder)
        if reason is not None:
            out.append(_FileCheck(path_reason=reason))
            continue
        portable = _portable(path, project)
        key = hashlib.blake2b(portable.encode(), digest_size=8).digest()
        if not decode:
            out.append(_FileCheck(portable=portable, path_key=key))
            continue
        try:
            data = path.read_bytes()
            _, info = images.decode(data)
        except OSError as err:
            out.append(_FileCheck(decode_reason=f"cannot read the file: {type(err).__name__}: {err}"))
            continue
        except images.ImageError as err:
            out.append(_FileCheck(decode_reason=str(err)))
            continue
        digest = hashlib.blake2b(data, digest_size=16).digest()
        out.append(_FileCheck(portable=portable, digest=digest, path_key=key, info=info))
    return out


# --- per row, in this process -----------------------------------------------------------------------------


def _check_labels(tasks: list[str], labels: list[str], allow_missing: bool) -> str | None:
    """None if the row's labels are acceptable, else the reason they are not."""
    missing = [t for t, v in zip(tasks, labels) if not v]
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
        value = float(raw.strip())
    except ValueError:
        return f"sample weight column '{column}': not a number ({raw!r})"
    if not math.isfinite(value):
        return f"sample weight column '{column}': not a finite number ({raw!r})"
    if value < 0:
        return f"sample weight column '{column}': negative ({raw!r})"
    return None


@dataclass
class _Row:
    """A record's cleaned cells, and what is wrong with them before its file is looked at."""

    line: int
    raw_path: str
    labels: list[str]
    weight: str = ""
    split: str = ""
    group: str = ""
    malformed: str | None = None  # takes precedence over every other reason
    reason: str | None = None  # labels, weight, split or group: after the path's own reason

    @property
    def work(self) -> tuple[str, bool]:
        """What the worker gets: the path, and whether to decode the file (not for a row rejected anyway)."""
        return (self.raw_path if self.malformed is None else "", self.malformed is None and self.reason is None)


def _prepare(cells: list[str], line: int, cols: Columns, cfg: PipelineConfig) -> _Row:
    """The record's cells cleaned, and the first reason (labels, weight, split, group) to reject it."""
    width = len(cols.header)
    raw_path = cells[cols.path].strip() if cols.path < len(cells) else ""
    if len(cells) > width:
        malformed = f"malformed row: {len(cells)} fields where the header has {width} (a comma in an unquoted cell?)"
        return _Row(line, raw_path, [], malformed=malformed)
    cells = cells + [""] * (width - len(cells))  # trailing empty cells a spreadsheet left out
    row = _Row(line, raw_path, [clean(cells[i]) for i in cols.task_index])
    row.reason = _check_labels(cols.tasks, row.labels, cfg.data.missing_labels == "allow")
    if cols.weight is not None:
        row.weight = cells[cols.weight].strip()
        row.reason = row.reason or _check_weight(row.weight, cfg.data.sample_weight_column)
    if cols.split is not None:
        row.split = clean(cells[cols.split])
        if not row.split:
            row.reason = row.reason or f"{SPLIT_COLUMN} column: empty (give train, val or test)"
        elif parse_split(row.split) is None:
            row.reason = row.reason or f"{SPLIT_COLUMN} column: {row.split!r} is not one of {', '.join(SPLIT_VALUES)}"
    if cols.group is not None:
        row.group = clean(cells[cols.group])
        if not row.group:
            row.reason = row.reason or f"group column '{cfg.data.split.group_column}': empty"
    return row


@dataclass
class _Scan:
    """The checked rows, as compact arrays: index i is the i-th row of the spool."""

    cols: Columns
    lines: array = field(default_factory=lambda: array("q"))
    digests: bytearray = field(default_factory=bytearray)  # 16 bytes a row
    path_keys: bytearray = field(default_factory=bytearray)  # 8 bytes a row
    codes: list[array] = field(default_factory=list)  # per task: label codes, -1 missing
    weights: array = field(default_factory=lambda: array("d"))
    splits: array = field(default_factory=lambda: array("b"))  # the split column's, as an index of SPLITS
    groups: array = field(default_factory=lambda: array("q"))
    vocab: list[dict[str, int]] = field(default_factory=list)  # per task: label -> code
    group_ids: dict[str, int] = field(default_factory=dict)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (line, path, reason)
    rows_total: int = 0
    modes: Counter = field(default_factory=Counter)
    oriented: int = 0
    scaled: int = 0

    def __post_init__(self) -> None:
        self.codes = [array("i") for _ in self.cols.tasks]
        self.vocab = [{} for _ in self.cols.tasks]

    def add(self, row: _Row, found: _FileCheck, spool: csv.writer) -> None:
        self.rows_total += 1
        reason = row.malformed or found.path_reason or row.reason or found.decode_reason
        if reason is not None:
            self.rejected.append((row.line, row.raw_path, reason))
            return
        self.modes[found.info.mode] += 1
        self.oriented += found.info.orientation != 1
        self.scaled += found.info.value_range is not None
        self.lines.append(row.line)
        self.digests += found.digest
        self.path_keys += found.path_key
        for codes, vocab, label in zip(self.codes, self.vocab, row.labels):
            codes.append(vocab.setdefault(label, len(vocab)) if label else -1)
        weight = [repr(float(row.weight))] if self.cols.weight is not None else []
        self.weights.append(float(row.weight) if weight else 1.0)
        self.splits.append(SPLITS.index(parse_split(row.split)) if self.cols.split is not None else -1)
        group = self.group_ids.setdefault(row.group, len(self.group_ids)) if self.cols.group is not None else -1
        self.groups.append(group)
        spool.writerow([row.line, found.portable, *row.labels, *weight, row.raw_path])  # the raw path last

    def arrays(self) -> dict[str, np.ndarray]:
        n, tasks = len(self.lines), self.cols.tasks
        return {
            "lines": np.frombuffer(self.lines, dtype=np.int64) if n else np.zeros(0, np.int64),
            "codes": (np.stack([np.frombuffer(c, dtype=np.int32) for c in self.codes], axis=1)
                      if n else np.zeros((0, len(tasks)), np.int32)),
            "digests": np.frombuffer(bytes(self.digests), dtype="S16") if n else np.zeros(0, "S16"),
            "path_keys": np.frombuffer(bytes(self.path_keys), dtype="S8") if n else np.zeros(0, "S8"),
            "weights": np.frombuffer(self.weights, dtype=np.float64) if n else np.zeros(0),
            "splits": np.frombuffer(self.splits, dtype=np.int8) if n else np.zeros(0, np.int8),
            "groups": np.frombuffer(self.groups, dtype=np.int64) if n else np.zeros(0, np.int64),
        }  # fmt: skip


def _scan(mf: ManifestFile, cols: Columns, cfg: PipelineConfig, root: Path, spool: Path, workers: int | None) -> _Scan:
    """Pass 1: check every record; kept rows to the spool and the compact arrays, the others to `rejected`."""
    scan = _Scan(cols)
    with open(mf.path, "rb") as f:  # about the number of rows (for the progress bar and the pool size)
        total = max(0, sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b"")) - mf.header_line + 1)
    size = chunk_size(total, workers)
    batches: deque[list[_Row]] = deque()  # those sent to the pool, in order; at most 2 x workers

    def work():
        batch: list[_Row] = []
        for line, cells in mf.records():
            batch.append(_prepare(cells, line, cols, cfg))
            if len(batch) == size:
                batches.append(batch)
                yield [r.work for r in batch]
                batch = []
        if batch:
            batches.append(batch)
            yield [r.work for r in batch]

    inspect = partial(_inspect_files, str(mf.path.parent.resolve()), str(root))
    with open(spool, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        for found in map_chunks(inspect, work(), total=total, desc="ingest", workers=workers):
            for row, file_check in zip(batches.popleft(), found):
                scan.add(row, file_check, writer)
    return scan


# --- the whole table --------------------------------------------------------------------------------------


def _duplicate_reasons(
    dup: DuplicateSet, lines: np.ndarray, columns: dict[str, np.ndarray], show: dict
) -> dict[int, str]:
    """Row index -> the reason it is rejected, for each row of a conflicting duplicate set."""
    reasons = {}
    for i in dup.rows:
        others = [j for j in dup.rows if j != i]
        listed = ", ".join(str(lines[j]) for j in others[:5])
        listed += f" and {len(others) - 5} more" if len(others) > 5 else ""
        diffs = []
        for name in dup.differing:
            theirs = "; ".join(f"{show[name](columns[name][j])!r} on line {lines[j]}" for j in others[:3])
            diffs.append(f"{name} {show[name](columns[name][i])!r} here, {theirs}")
        reasons[i] = f"conflicting duplicate: {dup.why} as line(s) {listed}, with " + "; ".join(diffs)
    return reasons


def _drop_duplicates(
    scan: _Scan, a: dict[str, np.ndarray], cfg: PipelineConfig, spool: Path
) -> tuple[np.ndarray, list[DuplicateSet], dict[int, str]]:
    """(rows kept, merged duplicate sets, raw paths of the duplicate rows); conflicts go to scan.rejected."""
    cols, data = scan.cols, cfg.data
    vocab = [list(v) for v in scan.vocab]
    columns = {t: a["codes"][:, k] for k, t in enumerate(cols.tasks)}
    show = {t: (lambda c, k=k: vocab[k][c] if c >= 0 else "") for k, t in enumerate(cols.tasks)}
    if cols.weight is not None:
        columns[data.sample_weight_column], show[data.sample_weight_column] = a["weights"], float
    if cols.split is not None:
        columns[SPLIT_COLUMN], show[SPLIT_COLUMN] = a["splits"], lambda c: SPLITS[c]
    if cols.group is not None:
        names = list(scan.group_ids)
        columns[data.split.group_column], show[data.split.group_column] = a["groups"], lambda c: names[c]
    duplicates = find_duplicates(a["digests"], a["path_keys"], columns)
    raw_paths = _spool_paths(spool, {i for d in duplicates for i in d.rows})
    keep = np.ones(len(a["lines"]), dtype=bool)
    for dup in duplicates:
        if dup.differing:
            for i, reason in _duplicate_reasons(dup, a["lines"], columns, show).items():
                scan.rejected.append((int(a["lines"][i]), raw_paths[i], reason))
            keep[dup.rows] = False
        else:
            keep[dup.rows[1:]] = False
    return keep, [d for d in duplicates if not d.differing], raw_paths


def _choose_split(
    csv_path: Path, scan: _Scan, a: dict[str, np.ndarray], kept: np.ndarray, cfg: PipelineConfig
) -> tuple[str, np.ndarray]:
    """(method, split index per kept row): the manifest's column, else grouped, else stratified."""
    s, cols = cfg.data.split, scan.cols
    fractions = {"train": s.train, "val": s.val, "test": s.test}
    codes, groups = a["codes"][kept], a["groups"][kept]
    if cols.split is not None:
        which = a["splits"][kept]
        leaking = shared_keys(groups, which) if cols.group is not None else []
        if len(leaking):
            names = list(scan.group_ids)
            examples = ", ".join(repr(names[g]) for g in np.unique(groups)[leaking[:5]])
            raise IngestError(
                f"{csv_path}: the manifest's '{SPLIT_COLUMN}' column puts {len(leaking)} group(s) of "
                f"'{s.group_column}' in more than one split (e.g. {examples}); keep each group in one split, "
                "or drop data.split.group_column"
            )
        return "column", which
    vocab = [list(v) for v in scan.vocab]
    if cols.group is not None:
        _, dense = np.unique(groups, return_inverse=True)
        return "grouped", grouped_split(codes, [len(v) for v in vocab], dense.reshape(-1), fractions, s.seed)
    return "stratified", stratified_split_codes(codes, vocab, fractions, s.seed)


def _split_problems(
    csv_path: Path, method: str, tasks: list[str], codes: np.ndarray, which: np.ndarray, cfg: PipelineConfig
) -> None:
    """Refuse a split that leaves a split empty, or a task without a labelled row in a split."""
    sizes = np.bincount(which, minlength=len(SPLITS))
    how = {
        "column": f"the manifest's '{SPLIT_COLUMN}' column",
        "grouped": f"data.split (grouped by '{cfg.data.split.group_column}')",
        "stratified": "data.split",
    }[method]
    for s, name in enumerate(SPLITS):
        if sizes[s] == 0:
            fix = (
                f"put rows in '{name}'" if method == "column"
                else f"raise data.split.{name} ({getattr(cfg.data.split, name):g}) or add rows"
                + (" or groups" if method == "grouped" else "")
            )  # fmt: skip
            counts = ", ".join(f"{n} {int(sizes[i])}" for i, n in enumerate(SPLITS))
            raise IngestError(f"{csv_path}: {how} leaves the '{name}' split empty ({len(which)} rows: {counts}); {fix}")
    for t, task in enumerate(tasks):
        labelled = np.bincount(which[codes[:, t] >= 0], minlength=len(SPLITS))
        for s, name in enumerate(SPLITS):
            if labelled[s] == 0:
                raise IngestError(
                    f"{csv_path}: task '{task}' has no labelled row in the '{name}' split ({how}, {int(sizes[s])} "
                    "rows there); training needs labelled rows in train, keeps the epoch that scores best on val, "
                    "and evaluate scores test"
                )


def _spool_paths(spool: Path, rows: set[int]) -> dict[int, str]:
    """The paths, as the CSV gives them, of some spooled rows (those of duplicate sets: few), by row index."""
    if not rows:
        return {}
    with open(spool, newline="", encoding="utf-8") as f:
        return {i: record[-1] for i, record in enumerate(csv.reader(f)) if i in rows}


def _write_manifest(spool: Path, manifest: Path, header: list[str], keep: np.ndarray, which: np.ndarray) -> None:
    """Pass 2: the kept rows of the spool, with their split, to the manifest (atomically)."""
    tmp = manifest.with_name(manifest.name + ".tmp")
    with open(spool, newline="", encoding="utf-8") as f, open(tmp, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for i, record in enumerate(csv.reader(f)):
            if keep[i]:
                writer.writerow([*record[:-1], SPLITS[which[i]]])  # the last: the path as the CSV gave it
    os.replace(tmp, manifest)


def _write_rejected(rejected: list[tuple[int, str, str]], path: Path) -> pd.DataFrame:
    frame = pd.DataFrame(rejected, columns=["row", PATH_COLUMN, "reason"]).sort_values("row", kind="stable")
    frame.to_csv(path, index=False)
    return frame.reset_index(drop=True)


def _class_counts(codes: np.ndarray, vocab: list[str], which: np.ndarray) -> dict[str, dict[str, int]]:
    """split -> {class: labelled rows}, classes sorted by name, absent classes left out."""
    out = {}
    for i, name in enumerate(SPLITS):
        counts = np.bincount(codes[(which == i) & (codes >= 0)], minlength=len(vocab))
        out[name] = {vocab[c]: int(counts[c]) for c in sorted(np.flatnonzero(counts), key=lambda c: vocab[c])}
    return out


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
        scan = _scan(mf, cols, cfg, root, spool, workers)
        if scan.rows_total == 0:
            raise IngestError(f"{csv_path}: manifest has no rows")
        a = scan.arrays()
        keep, merged, raw_paths = _drop_duplicates(scan, a, cfg, spool)

        rejected = _write_rejected(scan.rejected, paths.rejected)
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

        method, which = _choose_split(csv_path, scan, a, kept, cfg)
        _split_problems(csv_path, method, cols.tasks, codes, which, cfg)
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
        _write_manifest(spool, paths.manifest, header, keep, full)
    finally:
        spool.unlink(missing_ok=True)

    report = _report(cfg, root, csv_path, mf, scan, a, kept, which, method, classes, rejected, merged, raw_paths)
    paths.data_report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "ingest: kept %d rows, rejected %d, merged %d duplicates; split (%s) %s; %s (checked)",
        len(kept), len(rejected), report["duplicates"]["rows_merged"], method, report["split_sizes"], NO_LEAK,
    )  # fmt: skip
    return IngestResult(paths.manifest, paths.rejected, paths.data_report, len(kept), len(rejected))


def _report(cfg, root, csv_path, mf, scan, a, kept, which, method, classes, rejected, merged, raw_paths) -> dict:
    """data_report.json: what was read, kept, rejected, merged, and how the split came out."""
    data, s, tasks = cfg.data, cfg.data.split, scan.cols.tasks
    codes, groups = a["codes"][kept], a["groups"][kept]
    vocab = [list(v) for v in scan.vocab]
    labelled = codes >= 0
    in_split = [which == i for i in range(len(SPLITS))]
    grouped = scan.cols.group is not None
    fractions = {"train": s.train, "val": s.val, "test": s.test}
    return {
        "source": data.source,
        "manifest": _portable(csv_path.resolve(), root),
        "encoding": {"codec": mf.encoding, "how": mf.encoding_source},
        "tasks": classes,
        "rows_total": scan.rows_total,
        "rows_kept": len(kept),
        "rows_rejected": len(rejected),
        "rejected_reasons": dict(Counter(r.split(":")[0] for r in rejected["reason"])),
        "split_sizes": {name: int(in_split[i].sum()) for i, name in enumerate(SPLITS)},
        "split": {
            "method": method,
            "source": {
                "column": f"the manifest's '{SPLIT_COLUMN}' column (data.split fractions not used)",
                "grouped": f"data.split fractions, each '{s.group_column}' group whole in one split, seed {s.seed}",
                "stratified": f"data.split fractions, stratified on the joint label of all tasks, seed {s.seed}",
            }[method],
            "group_column": s.group_column,
            "groups": {n: len(np.unique(groups[in_split[i]])) for i, n in enumerate(SPLITS)} if grouped else None,
            **split_balance(codes, tasks, vocab, which, fractions),
        },
        "leakage": {
            "statement": NO_LEAK,
            "checked": True,
            "images": len(np.unique(a["digests"][kept])),
            "groups": len(np.unique(groups)) if grouped else None,
        },
        "duplicates": {
            "rows_merged": sum(len(d.rows) - 1 for d in merged),
            "rows_rejected_conflicting": int(rejected["reason"].str.startswith("conflicting duplicate:").sum()),
            "merged": [
                {"kept_row": int(a["lines"][d.rows[0]]), "merged_rows": [int(a["lines"][i]) for i in d.rows[1:]],
                 "why": d.why, "paths": sorted({raw_paths[i] for i in d.rows})}
                for d in merged
            ],  # fmt: skip
        },
        "class_counts": {t: _class_counts(codes[:, k], vocab[k], which) for k, t in enumerate(tasks)},
        "missing_labels": {t: int((~labelled[:, k]).sum()) for k, t in enumerate(tasks)},
        "labelled_counts": {
            t: {n: int((in_split[i] & labelled[:, k]).sum()) for i, n in enumerate(SPLITS)} for k, t in enumerate(tasks)
        },
        "sample_weight_column": data.sample_weight_column,
        "images": {
            "modes": dict(sorted(scan.modes.items())), "exif_oriented": scan.oriented, "scaled_to_8bit": scan.scaled,
        },  # fmt: skip
        "ignored_columns": scan.cols.ignored,
    }
