"""Many tasks: `on: auto` for the gradient-balancing methods, and bench/task_scaling.py's summary."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from mtl_core.weighting import GradientBalancing, WEIGHTINGS, build_weighting
from mtl_core.weighting.gradients import AUTO_REPRESENTATION_ABOVE

spec = importlib.util.spec_from_file_location("bench_task_scaling", Path(__file__).resolve().parents[1] / "bench" / "task_scaling.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

GRADIENT_METHODS = sorted(n for n, cls in WEIGHTINGS.items() if issubclass(cls, GradientBalancing))


def tasks(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_on_auto_is_params_up_to_the_threshold_and_representation_above(name, caplog):
    with caplog.at_level(logging.INFO, logger="mtl_core.weighting.gradients"):
        few = build_weighting(name, tasks(AUTO_REPRESENTATION_ABOVE))
        assert caplog.records == []
        many = build_weighting(name, tasks(AUTO_REPRESENTATION_ABOVE + 1))
    assert (few.on_option, few.on) == ("auto", "params")
    assert (many.on_option, many.on) == ("auto", "representation")
    (record,) = caplog.records  # said once, when the method is built
    assert f"{name} on: auto -> representation for {AUTO_REPRESENTATION_ABOVE + 1} tasks" in record.getMessage()


def test_an_explicit_on_is_kept_at_any_number_of_tasks(caplog):
    with caplog.at_level(logging.INFO, logger="mtl_core.weighting.gradients"):
        assert build_weighting("pcgrad", tasks(40), {"on": "params"}).on == "params"
        assert build_weighting("pcgrad", tasks(2), {"on": "representation"}).on == "representation"
    assert caplog.records == []
    with pytest.raises(ValueError, match="option 'on' must be 'auto', 'params' or 'representation', got 'repr'"):
        build_weighting("mgda", tasks(2), {"on": "repr"})


def test_on_auto_falls_back_to_params_where_representation_gradients_are_not_exact():
    method = build_weighting("imtl", tasks(40))
    method.for_model(exact_representation_gradients=True)
    assert method.on == "representation"
    method.for_model(exact_representation_gradients=False)  # cross-stitch with per-task branches
    assert method.on == "params"
    explicit = build_weighting("imtl", tasks(40), {"on": "representation"})
    explicit.for_model(exact_representation_gradients=False)
    assert explicit.on == "representation"  # the trainer refuses it, naming the arch


def test_bench_summary_ratios_and_table_from_fake_timings():
    times = {
        ("equal", 4): [1.0, 3.0, 2.0],  # median 2.0: the reference
        ("equal", 40): [2.2, 2.2, 9.0],  # median 2.2
        ("pcgrad (on: params)", 4): [5.0],
        ("pcgrad (on: params)", 40): [33.0, 31.0],  # median 32.0
    }
    summary = bench.summarise(times)
    assert summary[("equal", 4)] == {"median_s": 2.0, "min_s": 1.0, "vs_equal_k4": 1.0, "vs_equal_same_k": 1.0}
    assert summary[("equal", 40)]["vs_equal_k4"] == pytest.approx(1.1)
    assert summary[("pcgrad (on: params)", 40)]["vs_equal_k4"] == pytest.approx(16.0)
    assert summary[("pcgrad (on: params)", 40)]["vs_equal_same_k"] == pytest.approx(32.0 / 2.2)
    table = bench.markdown(summary)
    assert "| method | K = 4 | K = 40 |" in table
    assert "| equal | 2000 ms (1.00×; 1.00×), fastest 1000 | 2200 ms (1.10×; 1.00×), fastest 2200 |" in table
    assert "| pcgrad (on: params) | 5000 ms (2.50×; 2.50×), fastest 5000 | 32000 ms (16.00×; 14.55×), fastest 31000 |" in table


def test_bench_summary_without_the_reference_leaves_the_ratios_out():
    summary = bench.summarise({("famo", 10): [1.0]})
    assert summary[("famo", 10)]["median_s"] == 1.0
    assert summary[("famo", 10)]["vs_equal_k4"] != summary[("famo", 10)]["vs_equal_k4"]  # NaN
    assert "| famo | 1000 ms (nan×; nan×), fastest 1000 |" in bench.markdown(summary)
