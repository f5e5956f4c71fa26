"""Which tasks to train together: a partition of the tasks from a task-affinity matrix.

Follows the selection step of Fifty, Amid, Zhao, Yu, Anil & Finn 2021 ("Efficiently Identifying Task
Groupings for Multi-Task Learning", NeurIPS): the affinity onto task t from the group it is trained in
is the mean of A[s, t] over the other members s of that group, and a grouping scores the sum of these
over all tasks. A task trained alone scores 0 (no transfer either way), so a grouping beats all-in-one
exactly when some tasks pull others down more than they help them. Where the paper lets groups
overlap (a task served by its best group at inference), this module returns a partition, what
`model.task_groups` trains: one network per group, every task in one of them.

The affinity here is what the train stage measures (`reports/task_gradient_cosine.json`: the cosine
of the task gradients on the shared parameters, averaged over the epochs); Fifty et al.'s lookahead
affinity Z (the relative change of task t's loss after a step on task s alone) fits the same interface.
Pairs never measured together (NaN) count as 0.

Up to `EXHAUSTIVE_MAX_TASKS` tasks every partition is scored (Bell(10) = 115,975); beyond that an
agglomerative search starts from singletons and merges the two groups whose union raises the score
most, while one does. Ties go to fewer groups (one network costs less than two), then to the
partition listed first.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXHAUSTIVE_MAX_TASKS = 10


@dataclass(frozen=True)
class Grouping:
    groups: list[list[str]]
    score: float
    all_in_one_score: float
    search: str
    """"exhaustive" or "agglomerative"."""

    @property
    def is_all_in_one(self) -> bool:
        return len(self.groups) == 1

    def as_dict(self) -> dict:
        return {"groups": self.groups, "score": self.score, "all_in_one_score": self.all_in_one_score, "search": self.search}


def _clean(affinity: np.ndarray, k: int) -> np.ndarray:
    a = np.asarray(affinity, dtype=float)
    if a.shape != (k, k):
        raise ValueError(f"affinity matrix must be {k} x {k} (one row and column per task), got {a.shape}")
    return np.nan_to_num(a, nan=0.0)


def partition_score(affinity: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """Sum over tasks t of the mean affinity A[s, t] onto t from the other members s of t's group."""
    total = 0.0
    for g in groups:
        if len(g) < 2:
            continue
        idx = np.asarray(g)
        block = affinity[np.ix_(idx, idx)]
        onto = (block.sum(0) - np.diag(block)) / (len(g) - 1)  # column t: mean over s != t of A[s, t]
        total += float(onto.sum())
    return total


def _partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every set partition of `items`, each group in item order, groups in order of their first item."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in _partitions(rest):
        yield [[first], *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1 :]]


def _better(score: float, n_groups: int, best: tuple[float, int] | None, tol: float = 1e-12) -> bool:
    if best is None:
        return True
    return score > best[0] + tol or (abs(score - best[0]) <= tol and n_groups < best[1])


def propose_grouping(affinity: np.ndarray, task_names: Sequence[str]) -> Grouping:
    """The partition of `task_names` with the highest `partition_score` (see the module docstring)."""
    names = list(task_names)
    k = len(names)
    a = _clean(affinity, k)
    all_in_one = partition_score(a, [list(range(k))])
    if k <= EXHAUSTIVE_MAX_TASKS:
        best: tuple[float, int] | None = None
        chosen: list[list[int]] = [list(range(k))]
        for p in _partitions(list(range(k))):
            s = partition_score(a, p)
            if _better(s, len(p), best):
                best, chosen = (s, len(p)), p
        search = "exhaustive"
    else:
        chosen = [[i] for i in range(k)]
        current = 0.0
        while len(chosen) > 1:
            best_merge: tuple[float, int, int] | None = None
            for i in range(len(chosen)):
                for j in range(i + 1, len(chosen)):
                    merged = [*chosen[:i], sorted(chosen[i] + chosen[j]), *chosen[i + 1 : j], *chosen[j + 1 :]]
                    s = partition_score(a, merged)
                    if best_merge is None or s > best_merge[0] + 1e-12:
                        best_merge = (s, i, j)
            assert best_merge is not None
            s, i, j = best_merge
            if s < current - 1e-12:  # equal: merge anyway (fewer networks for the same affinity)
                break
            chosen = [*chosen[:i], sorted(chosen[i] + chosen[j]), *chosen[i + 1 : j], *chosen[j + 1 :]]
            current = s
        chosen.sort(key=lambda g: g[0])
        search = "agglomerative"
    groups = [[names[i] for i in g] for g in chosen]
    return Grouping(groups, partition_score(a, chosen), all_in_one, search)


def mean_gradient_cosine(report_path: Path) -> tuple[list[str], np.ndarray] | None:
    """(tasks, the mean over epochs of the per-epoch cosine matrices) of the train stage's
    `task_gradient_cosine.json`; None when nothing was measured (train.task_affinity_every: 0)."""
    if not Path(report_path).is_file():
        return None
    report = json.loads(Path(report_path).read_text())
    epochs = report.get("epochs") or {}
    if not epochs:
        return None
    stack = np.asarray([np.asarray(m, dtype=float) for m in epochs.values()])
    with warnings.catch_warnings():  # a pair never measured together stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stack, axis=0)
    return list(report["tasks"]), mean


def format_groups(groups: Sequence[Sequence[str]]) -> str:
    """The YAML flow form a user pastes into params.yaml: [[shape], [color, size, position]]."""
    return "[" + ", ".join("[" + ", ".join(g) + "]" for g in groups) + "]"
