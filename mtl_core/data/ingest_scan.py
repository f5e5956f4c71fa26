"""Ingest over the whole manifest: pass 1 checks every record into compact per-row arrays and a spool file
(`scan_manifest`), then duplicates are merged or rejected (`drop_duplicates`), the split is chosen and
checked (`choose_split`, `check_split`), and pass 2 writes the kept rows with their split (`write_manifest`).

Memory stays small as rows grow: records are read one chunk at a time, files are read, hashed and decoded
in a process pool, the checked rows go to a spool file on disk, and only compact per-row arrays (line,
content and path hashes, label codes, split and group codes: about 60 bytes a row) stay in memory for
the duplicate search and the split; a second pass over the spool writes the manifest.
"""

from __future__ import annotations

import csv
import os
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from mtl_core.config import PipelineConfig
from mtl_core.data.duplicates import DuplicateSet, find_duplicates
from mtl_core.data.ingest_rows import FileCheck, Row, inspect_files, prepare_row
from mtl_core.data.manifest import PATH_COLUMN, SPLIT_COLUMN, Columns, IngestError, ManifestFile
from mtl_core.data.parallel import chunk_size, map_chunks
from mtl_core.data.split import grouped_split, parse_split, shared_keys, stratified_split_codes
from mtl_core.paths import SPLITS


@dataclass
class Scan:
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

    def add(self, row: Row, found: FileCheck, spool: csv.writer) -> None:
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


def scan_manifest(mf: ManifestFile, cols: Columns, cfg: PipelineConfig, root: Path, spool: Path, workers: int | None) -> Scan:
    """Pass 1: check every record; kept rows to the spool and the compact arrays, the others to `rejected`."""
    scan = Scan(cols)
    with open(mf.path, "rb") as f:  # about the number of rows (for the progress bar and the pool size)
        total = max(0, sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b"")) - mf.header_line + 1)
    size = chunk_size(total, workers)
    batches: deque[list[Row]] = deque()  # those sent to the pool, in order; at most 2 x workers

    def work():
        batch: list[Row] = []
        for line, cells in mf.records():
            batch.append(prepare_row(cells, line, cols, cfg))
            if len(batch) == size:
                batches.append(batch)
                yield [r.work for r in batch]
                batch = []
        if batch:
            batches.append(batch)
            yield [r.work for r in batch]

    inspect = partial(inspect_files, str(mf.path.parent.resolve()), str(root))
    with open(spool, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        for found in map_chunks(inspect, work(), total=total, desc="ingest", workers=workers):
            for row, file_check in zip(batches.popleft(), found):
                scan.add(row, file_check, writer)
    return scan


def duplicate_reasons(
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


def drop_duplicates(
    scan: Scan, a: dict[str, np.ndarray], cfg: PipelineConfig, spool: Path
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
    raw_paths = spool_paths(spool, {i for d in duplicates for i in d.rows})
    keep = np.ones(len(a["lines"]), dtype=bool)
    for dup in duplicates:
        if dup.differing:
            for i, reason in duplicate_reasons(dup, a["lines"], columns, show).items():
                scan.rejected.append((int(a["lines"][i]), raw_paths[i], reason))
            keep[dup.rows] = False
        else:
            keep[dup.rows[1:]] = False
    return keep, [d for d in duplicates if not d.differing], raw_paths


def choose_split(
    csv_path: Path, scan: Scan, a: dict[str, np.ndarray], kept: np.ndarray, cfg: PipelineConfig
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


def check_split(
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


def spool_paths(spool: Path, rows: set[int]) -> dict[int, str]:
    """The paths, as the CSV gives them, of some spooled rows (those of duplicate sets: few), by row index."""
    if not rows:
        return {}
    with open(spool, newline="", encoding="utf-8") as f:
        return {i: record[-1] for i, record in enumerate(csv.reader(f)) if i in rows}


def write_manifest(spool: Path, manifest: Path, header: list[str], keep: np.ndarray, which: np.ndarray) -> None:
    """Pass 2: the kept rows of the spool, with their split, to the manifest (atomically)."""
    tmp = manifest.with_name(manifest.name + ".tmp")
    try:
        with open(spool, newline="", encoding="utf-8") as f, open(tmp, "w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(header)
            for i, record in enumerate(csv.reader(f)):
                if keep[i]:
                    writer.writerow([*record[:-1], SPLITS[which[i]]])  # the last: the path as the CSV gave it
    except BaseException:  # a full disk, a stop: no half-written temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, manifest)


def write_rejected(rejected: list[tuple[int, str, str]], path: Path) -> pd.DataFrame:
    frame = pd.DataFrame(rejected, columns=["row", PATH_COLUMN, "reason"]).sort_values("row", kind="stable")
    frame.to_csv(path, index=False)
    return frame.reset_index(drop=True)


def _as_number(label: str) -> float | None:
    try:
        value = float(label)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def numeric_label_clashes(csv_path: Path, scan: Scan, a: dict[str, np.ndarray]) -> None:
    """Refuse labels of one task that are the same number written two ways (`1` and `1.0`, `2` and
    `02`): each spelling would be a class of its own, so one class would be split in two without a word
    (a spreadsheet that wrote some cells as floats). Refused rather than merged: which spelling is the
    class's name is the user's call, and the fix is one search-and-replace in the CSV."""
    problems = []
    for k, task in enumerate(scan.cols.tasks):
        by_value: dict[float, list[str]] = {}
        for label in scan.vocab[k]:
            if (value := _as_number(label)) is not None:
                by_value.setdefault(value, []).append(label)
        for spellings in by_value.values():
            if len(spellings) < 2:
                continue
            codes = a["codes"][:, k]
            first = {label: int(a["lines"][np.argmax(codes == scan.vocab[k][label])]) for label in spellings}
            shown = " and ".join(f"{label!r} (first on line {line})" for label, line in sorted(first.items(), key=lambda x: x[1]))
            problems.append(f"task '{task}': labels {shown} are the same number written {len(spellings)} ways")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IngestError(
            f"{csv_path}: {'; '.join(problems[:5])}{more}; they would be separate classes. Write each class one "
            "way in the CSV (e.g. all '1', or all '1.0'), then run ingest again"
        )


def classes_missing_from_training(codes: np.ndarray, vocab: list[list[str]], tasks: list[str], which: np.ndarray) -> dict[str, dict[str, list[str]]]:
    """Per task, the classes of the val and test splits that no training row has: the model can never
    answer them, so every such image is an error, and their share of the metrics says nothing about
    learning. A property of the data (too few images per class): a warning, not a refusal."""
    out: dict[str, dict[str, list[str]]] = {}
    for k, task in enumerate(tasks):
        column = codes[:, k]
        trained = set(np.unique(column[(which == SPLITS.index("train")) & (column >= 0)]).tolist())
        for split in ("val", "test"):
            present = np.unique(column[(which == SPLITS.index(split)) & (column >= 0)]).tolist()
            missing = sorted(vocab[k][c] for c in present if c not in trained)
            if missing:
                out.setdefault(task, {})[split] = missing
    return out
