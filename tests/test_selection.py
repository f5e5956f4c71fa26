"""The `compare.select` policies (mtl_core/evaluation/selection.py) on hand-built solution tables, and the
grouping chosen from hand-built affinity matrices (mtl_core/evaluation/task_grouping.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mtl_core.evaluation.selection import select_solution
from mtl_core.evaluation.task_grouping import propose_grouping

TASKS = ["shape", "color", "size", "position"]


def verdicts(**worse_points: float) -> dict:
    """Every task no different from its single-task model, but those given: worse by that many points."""
    out = {}
    for t in TASKS:
        d = -worse_points[t] / 100 if t in worse_points else 0.001
        low, high = (d - 0.02, d - 0.005) if t in worse_points else (-0.01, 0.012)
        out[t] = {"metric": "accuracy", "difference": d, "low": low, "high": high, "confidence": 0.95,
                  "verdict": "worse" if t in worse_points else "no significant difference"}  # fmt: skip
    return out


def row(groups: list[list[str]], delta_m: float, **worse_points: float) -> dict:
    return {"groups": groups, "delta_m_pct": delta_m, "verdicts": verdicts(**worse_points)}


TABLE = {
    "all_in_one": row([TASKS], -12.4, shape=25.6),  # one network, shape much worse
    "grouped": row([["shape"], ["size"], ["color", "position"]], 0.03),  # three networks, nothing worse
    "single_task": row([[t] for t in TASKS], 0.0),
}
ALL = ["all_in_one", "grouped", "single_task"]


def test_fewest_networks_takes_the_smallest_solution_that_loses_no_task() -> None:
    choice = select_solution(TABLE, "fewest_networks", 1.0, ALL, "all_in_one")
    assert choice["solution"] == "grouped" and choice["met"] is True
    assert "fewest networks" in choice["reason"] and "all-in-one (1 network, Δm -12.40 %) not" in choice["reason"]
    assert "shape significantly worse than its single-task model by 25.6 points" in choice["reason"]


def test_a_loss_within_the_allowance_is_accepted() -> None:
    table = {**TABLE, "all_in_one": row([TASKS], -0.3, shape=0.8)}  # significant, but under 1 point
    assert select_solution(table, "fewest_networks", 1.0, ALL, "all_in_one")["solution"] == "all_in_one"
    assert select_solution(table, "fewest_networks", 0.5, ALL, "all_in_one")["solution"] == "grouped"


def test_best_delta_m_and_trained() -> None:
    table = {**TABLE, "all_in_one": row([TASKS], 1.5, shape=0.4)}
    assert select_solution(table, "best_delta_m", 1.0, ALL, "all_in_one")["solution"] == "all_in_one"
    assert select_solution(TABLE, "best_delta_m", 1.0, ALL, "all_in_one")["solution"] == "grouped"
    trained = select_solution(TABLE, "trained", 1.0, ALL, "all_in_one")
    assert trained["solution"] == "all_in_one" and "rule: trained" in trained["reason"]


def test_ties_go_to_the_higher_delta_m_then_to_fewer_networks() -> None:
    table = {"a": row([["shape", "color"], ["size", "position"]], 0.5), "b": row([["shape"], ["color", "size", "position"]], 1.2)}
    assert select_solution(table, "fewest_networks", 1.0, ["a", "b"], "a")["solution"] == "b"
    table["b"] = row([[t] for t in TASKS], 0.5)  # same Δm as a, more networks
    assert select_solution(table, "best_delta_m", 1.0, ["a", "b"], "a")["solution"] == "a"


def test_no_candidate_meets_the_policy_the_closest_names_the_task_and_the_margin() -> None:
    table = {"all_in_one": row([TASKS], -12.4, shape=25.6), "grouped": row([["shape", "size"], ["color", "position"]], -2.0, size=3.5)}
    choice = select_solution(table, "fewest_networks", 1.0, ["all_in_one", "grouped"], "all_in_one")
    assert choice["solution"] == "grouped" and choice["met"] is False
    assert choice["missed"] == {"task": "size", "points": pytest.approx(2.5)}
    assert "task size misses by 2.5 points" in choice["reason"]


def test_a_candidate_not_allowed_is_never_chosen() -> None:
    assert select_solution(TABLE, "fewest_networks", 1.0, ["all_in_one", "single_task"], "all_in_one")["solution"] == "single_task"


def test_the_grouping_from_hand_built_affinities() -> None:
    """shape is hurt by everyone and hurts everyone; color, size, position help each other: shape alone."""
    a = np.array([
        [0.0, -0.5, -0.4, -0.6],
        [-0.3, 0.0, 0.4, 0.5],
        [-0.2, 0.6, 0.0, 0.3],
        [-0.5, 0.4, 0.2, 0.0],
    ])  # fmt: skip
    assert propose_grouping(a, TASKS).groups == [["shape"], ["color", "size", "position"]]
    assert propose_grouping(np.full((4, 4), 0.2), TASKS).groups == [TASKS]  # everyone helps everyone: one network
    # the lookahead affinity is not bounded by 1: only the relative sizes matter
    assert propose_grouping(40 * a, TASKS).groups == [["shape"], ["color", "size", "position"]]
