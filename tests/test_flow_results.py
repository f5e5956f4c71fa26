"""What the Prefect flow run shows of its results, from hand-made reports (no server needed)."""

from __future__ import annotations

from flows.pipeline import DELTA_M_ROW, metrics_table

TEST = {
    "tasks": {"shape": {"accuracy": 0.61234, "balanced_accuracy": 0.6}, "color": {"accuracy": 0.9, "balanced_accuracy": 0.8}},
    "mean": {"accuracy": 0.75617, "balanced_accuracy": 0.7},
}
COMPARISON = {
    "enabled": True, "primary_metric": "balanced_accuracy", "negative_transfer": ["shape"],
    "tasks": {"shape": {"balanced_accuracy": {"mtl": 0.6, "stl": 0.75, "relative_pct": -20.0}},
              "color": {"balanced_accuracy": {"mtl": 0.8, "stl": 0.5, "relative_pct": 60.0}}},
    "delta_m_pct": {"balanced_accuracy": 20.0},
}  # fmt: skip


def test_the_flow_table_has_a_labelled_delta_m_row_and_the_difference_per_task():
    rows = metrics_table(TEST, COMPARISON)
    assert [r["task"] for r in rows] == ["shape", "color", "mean over tasks", f"{DELTA_M_ROW} (balanced_accuracy, %)"]
    assert rows[0] == {"task": "shape", "accuracy": 0.6123, "balanced_accuracy": 0.6, "single_task_balanced_accuracy": 0.75,
                       "difference_pct": -20.0, "negative_transfer": True}  # fmt: skip
    assert rows[1]["difference_pct"] == 60.0 and rows[1]["negative_transfer"] is False
    assert rows[2] == {"task": "mean over tasks", "accuracy": 0.7562, "balanced_accuracy": 0.7}  # means only
    assert rows[3] == {"task": f"{DELTA_M_ROW} (balanced_accuracy, %)", "difference_pct": 20.0}  # (-20 + 60) / 2


def test_without_a_comparison_the_table_is_the_test_metrics_and_with_verdicts_it_shows_them():
    assert [r["task"] for r in metrics_table(TEST, {"enabled": False})] == ["shape", "color", "mean over tasks"]
    judged = {**COMPARISON, "tasks": {t: {**v, "verdict": "worse" if t == "shape" else "better"} for t, v in COMPARISON["tasks"].items()}}
    rows = metrics_table(TEST, judged)
    assert [r.get("significance") for r in rows] == ["worse", "better", None, None]


def test_a_stages_warnings_and_errors_reach_the_run_log_at_their_level():
    """What the Prefect UI's "warning and above" filter shows: the stage's own WARNING/ERROR lines (the
    `mtl` log format when not on a terminal) and DVC's; everything else at INFO."""
    import logging

    from flows.pipeline import line_level

    assert line_level("2026-12-06 10:00:00,123 WARNING mtl_core.stages.compare: negative transfer on task 'shape'") == logging.WARNING
    assert line_level("2026-12-06 10:00:00,123 ERROR mtl_core.cli: boom") == logging.ERROR
    assert line_level("WARNING: 'models_all_in_one' is empty.") == logging.WARNING
    assert line_level("ERROR: failed to reproduce 'train'") == logging.ERROR
    for info in ("2026-12-06 10:00:00,123 INFO mtl_core.training.engine: epoch 1/2", "Running stage 'train':",
                 "> mtl train", "a line that mentions WARNING later"):  # fmt: skip
        assert line_level(info) == logging.INFO
