"""bench/methods.py's summary: Δm against the same seed's single-task models, ratios to equal weighting."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("bench_methods", Path(__file__).resolve().parents[1] / "bench" / "methods.py")
methods = importlib.util.module_from_spec(spec)
spec.loader.exec_module(methods)


def run(method, seed, a, b, sec, mem):
    return {"method": method, "seed": seed, "accuracy": {"a": a, "b": b}, "seconds_per_epoch": sec, "peak_memory_mib": mem}


def test_summary_by_hand():
    runs = [
        run("single_task", 0, 0.5, 0.8, 20.0, 100.0), run("single_task", 1, 0.4, 0.8, 22.0, 100.0),
        run("equal", 0, 0.6, 0.6, 5.0, 50.0), run("equal", 1, 0.4, 0.4, 7.0, 70.0),
        run("pcgrad", 0, 0.5, 0.8, 12.0, 90.0), run("pcgrad", 1, 0.5, 1.0, 18.0, 90.0),
    ]  # fmt: skip
    rows = {r["method"]: r for r in methods.summarise(runs, ["a", "b"])}
    # equal, seed 0: (+20 % on a, -25 % on b) / 2 = -2.5; seed 1: (0 %, -50 %) / 2 = -25
    assert rows["equal"]["delta_m_pct"][0] == pytest.approx(-13.75)
    assert rows["equal"]["delta_m_pct"][1] == pytest.approx(np.std([-2.5, -25.0], ddof=1))
    # pcgrad, seed 0: (0, 0) -> 0; seed 1: (+25 %, +25 %) -> 25
    assert rows["pcgrad"]["delta_m_pct"][0] == pytest.approx(12.5)
    assert rows["pcgrad"]["a"] == pytest.approx((0.5, 0.0))
    assert rows["equal"]["mean_accuracy"][0] == pytest.approx(0.5)
    assert rows["pcgrad"]["time_vs_equal"] == pytest.approx(15.0 / 6.0)
    assert rows["pcgrad"]["memory_vs_equal"] == pytest.approx(90.0 / 60.0)
    assert rows["single_task"]["delta_m_pct"] == pytest.approx((0.0, 0.0))
    table = methods.markdown(list(rows.values()), ["a", "b"], "setup")
    assert "| pcgrad | 0.500 ± 0.000 | 0.900 ± 0.141 | 0.700 ± 0.071 | +12.50 ± 17.68 | 15.0 | 2.50× | 90 | 1.50× |" in table


def test_without_equal_weighting_the_ratios_are_left_out():
    rows = methods.summarise([run("famo", 0, 0.5, 0.5, 3.0, 10.0)], ["a", "b"])
    assert rows[0]["time_vs_equal"] is None and rows[0]["delta_m_pct"] is None
    assert "| famo | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | — | 3.0 | — | 10 | — |" in methods.markdown(rows, ["a", "b"], "")
