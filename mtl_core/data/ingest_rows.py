"""Ingest, per record of the manifest: its cells cleaned and checked (labels, sample weight, split, group)
in this process, and its file resolved, read, hashed and decoded in a worker process (`inspect_files`).
A record that fails gets its reason; nothing is dropped silently (stages/ingest.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from mtl_core.config import PipelineConfig
from mtl_core.data import images
from mtl_core.data.manifest import SPLIT_COLUMN, Columns, clean
from mtl_core.data.split import SPLIT_VALUES, parse_split


def resolve_row_path(raw: str, dataset_dir: Path) -> tuple[Path | None, str | None]:
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


def portable_path(path: Path, root: Path) -> str:
    """Path relative to the project when inside it (outputs stay valid in another clone), else absolute."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


@dataclass(frozen=True)
class FileCheck:
    """What a worker found about one row's file."""

    path_reason: str | None = None  # the path is unusable (before any label reason)
    decode_reason: str | None = None  # the file does not read or decode (after the label reasons)
    portable: str | None = None
    digest: bytes | None = None  # of the file's bytes
    path_key: bytes | None = None  # of the resolved path
    info: images.ImageInfo | None = None


def inspect_files(dataset_dir: str, root: str, items: list[tuple[str, bool]]) -> list[FileCheck]:
    """For each (raw path, decode it?): resolve the path; read, hash and decode the file."""
    folder, project = Path(dataset_dir), Path(root)
    out = []
    for raw, decode in items:
        path, reason = resolve_row_path(raw, folder)
        if reason is not None:
            out.append(FileCheck(path_reason=reason))
            continue
        portable = portable_path(path, project)
        key = hashlib.blake2b(portable.encode(), digest_size=8).digest()
        if not decode:
            out.append(FileCheck(portable=portable, path_key=key))
            continue
        try:
            data = path.read_bytes()
            _, info = images.decode(data)
        except OSError as err:
            out.append(FileCheck(decode_reason=f"cannot read the file: {type(err).__name__}: {err}"))
            continue
        except images.ImageError as err:
            out.append(FileCheck(decode_reason=str(err)))
            continue
        digest = hashlib.blake2b(data, digest_size=16).digest()
        out.append(FileCheck(portable=portable, digest=digest, path_key=key, info=info))
    return out


def check_labels(tasks: list[str], labels: list[str], allow_missing: bool) -> str | None:
    """None if the row's labels are acceptable, else the reason they are not."""
    missing = [t for t, v in zip(tasks, labels) if not v]
    if not missing:
        return None
    if not allow_missing:
        return "missing label for task(s) " + ", ".join(map(repr, missing))
    if len(missing) == len(tasks):
        return "no label for any task"
    return None


def check_weight(raw: str, column: str) -> str | None:
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
class Row:
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


def prepare_row(cells: list[str], line: int, cols: Columns, cfg: PipelineConfig) -> Row:
    """The record's cells cleaned, and the first reason (labels, weight, split, group) to reject it."""
    width = len(cols.header)
    raw_path = cells[cols.path].strip() if cols.path < len(cells) else ""
    if len(cells) > width:
        malformed = f"malformed row: {len(cells)} fields where the header has {width} (a comma in an unquoted cell?)"
        return Row(line, raw_path, [], malformed=malformed)
    cells = cells + [""] * (width - len(cells))  # trailing empty cells a spreadsheet left out
    row = Row(line, raw_path, [clean(cells[i]) for i in cols.task_index])
    row.reason = check_labels(cols.tasks, row.labels, cfg.data.missing_labels == "allow")
    if cols.weight is not None:
        row.weight = cells[cols.weight].strip()
        row.reason = row.reason or check_weight(row.weight, cfg.data.sample_weight_column)
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
