"""Task grouping from an affinity matrix (Fifty et al. 2021's selection step, partitions only)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from mtl_core.evaluation import task_grouping
from mtl_core.evaluation.task_grouping import format_groups, mean_gradient_cosine, partition_score, propose_grouping

TASKS = ["shape", "color", "size", "position"]


def test_partition_score_by_hand():
    a = np.array([[1.0, 0.2, -0.4], [0.6, 1.0, 0.0], [0.1, 0.3, 1.0]])
    # {0, 1}: onto 0 from 1 is A[1, 0] = 0.6, onto 1 from 0 is A[0, 1] = 0.2; task 2 alone scores 0
    assert partition_score(a, [[0, 1], [2]]) == pytest.approx(0.8)
    # all in one: onto 0 (0.6 + 0.1) / 2, onto 1 (0.2 + 0.3) / 2, onto 2 (-0.4 + 0.0) / 2
    assert partition_score(a, [[0, 1, 2]]) == pytest.approx(0.35 + 0.25 - 0.2)
    assert partition_score(a, [[0], [1], [2]]) == 0.0


def test_a_task_that_conflicts_with_all_others_is_split_off():
    """shape's gradients oppose the other three, which agree with each other."""
    a = np.full((4, 4), 0.3)
    a[0, :] = a[:, 0] = -0.1
    np.fill_diagonal(a, 1.0)
    g = propose_grouping(a, TASKS)
    assert g.groups == [["shape"], ["color", "size", "position"]]
    assert g.score == pytest.approx(0.9) and g.all_in_one_score == pytest.approx(3 * (0.6 - 0.1) / 3 - 0.1)
    assert g.search == "exhaustive" and not g.is_all_in_one
    assert format_groups(g.groups) == "[[shape], [color, size, position]]"


def test_two_blocks_and_ties_go_to_fewer_groups():
    a = np.array([[1, 0.5, -0.2, -0.2], [0.5, 1, -0.2, -0.2], [-0.2, -0.2, 1, 0.4], [-0.2, -0.2, 0.4, 1]])
    assert propose_grouping(a, TASKS).groups == [["shape", "color"], ["size", "position"]]
    # every affinity 0: every partition scores 0, and one network is the cheapest of them
    assert propose_grouping(np.eye(4), TASKS).groups == [TASKS]
    # NaN (never measured together) counts as 0
    nan = np.full((4, 4), np.nan)
    assert propose_grouping(nan, TASKS).groups == [TASKS]


def test_exhaustive_search_finds_the_best_partition():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.3, (5, 5))
    best = propose_grouping(a, list("abcde"))
    # brute force over labelings: every assignment of 5 tasks to at most 5 groups
    top = max(
        partition_score(a, [[i for i in range(5) if lab[i] == g] for g in set(lab)])
        for lab in itertools.product(range(5), repeat=5)
    )
    assert best.score == pytest.approx(top)


def test_agglomerative_search_beyond_the_exhaustive_limit(monkeypatch):
    """Twelve tasks in three planted blocks (within +0.5, across -0.3): found by the greedy search, and
    the greedy search agrees with the exhaustive one on a small case."""
    k = 12
    block = np.repeat([0, 1, 2], 4)
    a = np.where(block[:, None] == block[None, :], 0.5, -0.3)
    names = [f"t{i:02d}" for i in range(k)]
    g = propose_grouping(a, names)
    assert g.search == "agglomerative"
    assert g.groups == [names[0:4], names[4:8], names[8:12]]
    small = np.array([[1, 0.5, -0.2, -0.2], [0.5, 1, -0.2, -0.2], [-0.2, -0.2, 1, 0.4], [-0.2, -0.2, 0.4, 1]])
    exhaustive = propose_grouping(small, TASKS)
    monkeypatch.setattr(task_grouping, "EXHAUSTIVE_MAX_TASKS", 2)
    greedy = propose_grouping(small, TASKS)
    assert greedy.search == "agglomerative" and greedy.groups == exhaustive.groups


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="4 x 4"):
        propose_grouping(np.eye(3), TASKS)


def test_mean_gradient_cosine_reads_the_train_report(tmp_path):
    report = {"tasks": ["a", "b"], "epochs": {"1": [[1, 0.2], [0.2, 1]], "2": [[1, None], [None, 1]], "3": [[1, 0.4], [0.4, 1]]}}
    path = tmp_path / "task_gradient_cosine.json"
    path.write_text(json.dumps(report).replace("null", "NaN"))
    tasks, mean = mean_gradient_cosine(path)
    assert tasks == ["a", "b"] and mean[0, 1] == pytest.approx(0.3)
    path.write_text(json.dumps({"tasks": ["a", "b"], "epochs": {}}))
    assert mean_gradient_cosine(path) is None
    assert mean_gradient_cosine(tmp_path / "missing.json") is None
