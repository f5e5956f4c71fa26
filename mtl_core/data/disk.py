"""Free-disk checks before a stage writes gigabytes: fail at once with the size needed, not with a
truncated cache and `OSError: [Errno 28] No space left on device` half an hour in."""

from __future__ import annotations

import shutil
from pathlib import Path


class DiskSpaceError(OSError):
    """Not enough free disk for what a stage is about to write; the message gives both sizes."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def require_free_space(folder: Path, needed: int, what: str, reclaimed: int = 0) -> None:
    """Raise DiskSpaceError unless `needed` bytes fit in `folder`; `reclaimed`: bytes of files being replaced."""
    free = free_bytes(folder)
    if needed > free + reclaimed:
        extra = f" (+{human_bytes(reclaimed)} from the files it replaces)" if reclaimed else ""
        raise DiskSpaceError(
            f"{folder}: {what} needs {human_bytes(needed)}, and only {human_bytes(free)}{extra} is free on "
            "that disk; free some space, or write the data elsewhere (a smaller preprocess.image_size also "
            "shrinks the image cache)"
        )
