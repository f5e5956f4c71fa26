"""Chunks of work over the machine's cores, in order, with a bounded number in flight and a progress bar.

Why not `ProcessPoolExecutor.map`: it submits every chunk at once, so a million rows would sit in memory
as pending work; here at most `2 x workers` chunks are queued, so memory stays flat whatever the number
of rows. Results come back in input order, so the output does not depend on the number of workers, and
`workers=1` runs the same function in this process (no pool), which is what small inputs get.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

C = TypeVar("C")
R = TypeVar("R")

SERIAL_BELOW = 256
"""Below this many items the pool costs more than it saves: run in this process."""


class _Bar(tqdm):
    """A progress bar without tqdm's monitor thread: the pool forks this process, and a fork with other
    threads running is what Python 3.12+ warns about (a thread holding a lock is copied mid-way)."""

    monitor_interval = 0


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the stage's process is gone (killed by SIGTERM, say),
    instead of sleeping forever on a queue nobody writes to."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def available_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def map_chunks(
    fn: Callable[[C], R],
    chunks: Iterable[C],
    *,
    total: int | None,
    desc: str,
    workers: int | None = None,
    size: Callable[[C], int] = len,
) -> Iterator[R]:
    """fn(chunk) for each chunk, yielded in input order; the progress bar counts items (size(chunk)).

    workers: None = every available core (1 if `total` is below SERIAL_BELOW). `fn` must be a module-level
    function (it is pickled to the workers) and should turn a bad item into a result, not an exception:
    an exception stops the whole map.
    """
    if workers is None:
        workers = 1 if total is not None and total < SERIAL_BELOW else available_cores()
    bar = _Bar(total=total, desc=desc, unit="img", disable=None, leave=False, dynamic_ncols=True)
    try:
        if workers <= 1:
            for chunk in chunks:
                result = fn(chunk)
                bar.update(size(chunk))
                yield result
            return
        pending: deque[tuple[Future[R], int]] = deque()
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_exit_with_parent, initargs=(os.getpid(),))
        try:
            for chunk in chunks:
                pending.append((pool.submit(fn, chunk), size(chunk)))
                if len(pending) >= 2 * workers:
                    future, n = pending.popleft()
                    result = future.result()
                    bar.update(n)
                    yield result
            while pending:
                future, n = pending.popleft()
                result = future.result()
                bar.update(n)
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def chunk_size(total: int, workers: int | None = None, largest: int = 512) -> int:
    """Chunks small enough to spread `total` items over the workers (about 8 chunks each), at most `largest`."""
    workers = workers or available_cores()
    return max(1, min(largest, -(-total // (8 * workers))))
