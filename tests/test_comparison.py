import math

import pytest

from mtl_core.evaluation.comparison import compare_tasks, comparison_rows, relative_difference


def test_delta_m_on_a_hand_made_table():
    mtl = {"a": {"accuracy": 0.90, "f1_macro": 0.80}, "b": {"accuracy": 0.60, "f1_macro": 0.50}, "c": {"accuracy": 0.75, "f1_macro": 0.70}}
    stl = {"a": {"accuracy": 0.80, "f1_macro": 0.80}, "b": {"accuracy": 0.75, "f1_macro": 0.40}, "c": {"accuracy": 0.75, "f1_macro": 0.70}}
    table = compare_tasks(mtl, stl, ["accuracy", "f1_macro"])
    # accuracy: a +12.5 %, b -20 %, c 0 % -> Δm = -7.5/3 = -2.5 %
    assert table["tasks"]["a"]["accuracy"]["relative_pct"] == pytest.approx(12.5)
    assert table["tasks"]["b"]["accuracy"]["relative_pct"] == pytest.approx(-20.0)
    assert table["delta_m_pct"]["accuracy"] == pytest.approx(-2.5)
    # f1: a 0, b +25, c 0 -> 25/3
    assert table["delta_m_pct"]["f1_macro"] == pytest.approx(25 / 3)
    assert table["negative_transfer"] == ["b"]  # judged on the primary metric (accuracy)
    rows = comparison_rows(table)
    assert rows[1] == {"task": "b", "mtl_accuracy": 0.6, "stl_accuracy": 0.75, "relative_pct": -20.0, "negative_transfer": True}


def test_relative_difference_with_a_zero_baseline_is_undefined():
    assert math.isnan(relative_difference(0.5, 0.0))


def test_tasks_must_match():
    with pytest.raises(ValueError, match="different tasks: c"):
        compare_tasks({"a": {"accuracy": 1.0}}, {"a": {"accuracy": 1.0}, "c": {"accuracy": 1.0}}, ["accuracy"])
