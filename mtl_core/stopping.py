"""Stopping a stage from outside: SIGTERM, SIGINT (Ctrl-C) and SIGHUP, and the end of the `dvc repro`
that started it.

`install_stop_handlers()` (the `mtl` CLI, for a stage) turns the first of those signals into
`StageStopped`, raised in the main thread, after it has killed the stage's own child processes (the
DataLoader workers, the ingest pool): nothing keeps writing once the stage is told to stop. The stage's
`finally` blocks remove their temporary files, the MLflow run open at that moment is marked KILLED with
the signal as its reason (training.runs, tracking.runs), and the CLI prints one line and exits with
128 + the signal's number: no traceback.

`exit_with_launcher()`: under `dvc repro` (which sets $DVC_STAGE), the stage also stops when DVC is gone,
killed by SIGTERM (which DVC does not forward) or by the end of the Prefect flow run that started it:
Linux's parent-death signal when DVC started the stage directly, and a watcher thread when a shell sits
in between (`/bin/sh -c`, which dash does not replace by the command).
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None)
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "fish"})
WATCH_INTERVAL_S = 0.5


class StageStopped(BaseException):
    """The stage was told to stop (a signal). A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way up takes it for an error to handle."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")

    @property
    def reason(self) -> str:
        return f"stopped by {self.signal_name}"


def _children() -> list[int]:
    """The pids of this process's children (from /proc; empty where there is none)."""
    me, found = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) "
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(name))
    return found


def kill_children() -> None:
    """SIGKILL this process's child processes: multiprocessing's (DataLoader workers, process pools) and
    any other (from /proc)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        try:
            child.kill()
        except (OSError, ValueError):
            pass
    for pid in _children():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _on_signal(signum: int, frame: object) -> None:
    for sig in STOP_SIGNALS:  # once: a second Ctrl-C does not interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    # PyTorch's DataLoader handler would turn its killed workers into a RuntimeError of its own
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    kill_children()
    raise StageStopped(signum)


def install_stop_handlers() -> dict[int, object]:
    """SIGTERM, SIGINT and SIGHUP raise StageStopped in the main thread (see the module docstring); the
    handlers they replace are returned, for `restore_handlers` (a stage run in a test's process)."""
    previous = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, signal.SIGCHLD)}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    return previous


def restore_handlers(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def _command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _set_parent_death_signal(sig: int) -> bool:
    """Linux: the kernel sends `sig` to this process when its parent ends."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def parent_death_signal() -> None:
    """For a child about to be started (`preexec_fn`): SIGTERM when the process that started it ends."""
    _set_parent_death_signal(signal.SIGTERM)


def exit_with_launcher() -> None:
    """Under `dvc repro` ($DVC_STAGE set): SIGTERM to this process when DVC is gone (see the module
    docstring). Started by hand (a terminal, nohup), a stage outlives its parent as any program does."""
    if "DVC_STAGE" not in os.environ or not os.path.isdir("/proc"):
        return
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGTERM)
    grandparent = _parent_of(parent) if _command_name(parent) in SHELLS else None

    def watch() -> None:
        while True:
            if os.getppid() != parent or (grandparent is not None and _parent_of(parent) != grandparent):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(WATCH_INTERVAL_S)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()
