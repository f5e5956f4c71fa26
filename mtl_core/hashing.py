"""Content hashes of the project's files, and the hashes DVC recorded for them in `dvc.lock`.

What ties a run, a checkpoint or a model version to the exact data and weights it was made from: the
sha256 of a file's bytes, and the md5 that DVC wrote for a stage's output (which costs nothing to read
where hashing the file itself would cost seconds: the image cache of the default data is 73 MB a split).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks (model weights, data caches)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_locked_md5(root: Path, stage: str, out: str) -> str | None:
    """The md5 `dvc.lock` records for output `out` (a path relative to the project) of `stage`; None
    when there is no dvc.lock, no such stage or output, or no md5 (a stage run outside DVC)."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for entry in stages.get(stage, {}).get("outs", []):
        if entry.get("path") == out and "md5" in entry:
            return entry["md5"]
    return None
