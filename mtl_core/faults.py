"""Named fault-injection points, for the tests that kill a stage at the worst moment.

`fault_point("checkpoint.before_rename")` does nothing unless `$MTL_FAULT` names that point; then the
process SIGKILLs itself there, as a preemption or the OOM killer would (no exception handler, no
`finally`, no MLflow `end_run` runs): a real signal at a chosen place, where a timer-driven kill from
outside could only hit it by luck. `MTL_FAULT=train.after_step:9` kills at the 9th time the point is
reached. With `MTL_FAULT_ONCE=<file>` too, the point fires only while that file does not exist, and
creates it first: a crash that a retry (a new process) does not meet again.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

FAULT_ENV = "MTL_FAULT"
_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == (int(nth) if nth else 1):
        if once := os.environ.get("MTL_FAULT_ONCE"):
            if os.path.exists(once):
                return
            with open(once, "w") as f:
                f.write(name)
        os.kill(os.getpid(), signal.SIGKILL)
