"""Per-task metrics a majority-class model cannot win (evaluation/metrics.py), checked against numbers
computed by hand, and the default decision metric of the comparison (compare.metrics[0])."""

from __future__ import annotations

import numpy as np
import pytest

from mtl_core.config import CompareConfig
from mtl_core.evaluation.comparison import compare_tasks, flat_metrics
from mtl_core.evaluation.metrics import mean_over_tasks, task_metrics
from mtl_core.tasks import MISSING_LABEL


def one_hot(predicted: list[int], classes: int) -> np.ndarray:
    """Probabilities whose argmax is `predicted`."""
    probs = np.full((len(predicted), classes), 0.1 / classes, dtype=np.float32)
    probs[np.arange(len(predicted)), predicted] = 0.9
    return probs


def binary(positive: list[float]) -> np.ndarray:
    p = np.asarray(positive, dtype=np.float32)
    return np.stack([1 - p, p], axis=1)


def test_balanced_accuracy_is_the_mean_recall_over_the_classes_present():
    # 3 classes; class 2 has no labelled target (it is still predicted once); the last sample is unlabelled.
    # class 0 (4 samples): predicted 0, 0, 2, 1 -> recall 2/4; class 1 (2 samples): predicted 1, 0 -> 1/2.
    # balanced accuracy = (1/2 + 1/2) / 2 = 0.5 (class 2, absent, is left out: not (0.5 + 0.5 + 0) / 3);
    # accuracy = 3 right of 6 labelled = 0.5 as well, so a second case tells them apart:
    targets = np.array([0, 0, 0, 0, 1, 1, MISSING_LABEL])
    values, confusion = task_metrics(one_hot([0, 0, 2, 1, 1, 0, 1], 3), targets)
    assert values["balanced_accuracy"] == pytest.approx(0.5)
    assert values["recall_macro"] == pytest.approx(1 / 3)  # torchmetrics' macro recall counts class 2 (predicted)
    assert confusion.tolist() == [[2, 1, 1], [1, 1, 0], [0, 0, 0]]
    # class 0 (6 samples) all right -> 1; class 1 (2 samples): 0 of 2 -> 0. balanced (1 + 0) / 2 = 0.5,
    # accuracy 6/8 = 0.75
    values, _ = task_metrics(one_hot([0] * 8, 2), np.array([0, 0, 0, 0, 0, 0, 1, 1]))
    assert values["accuracy"] == pytest.approx(0.75) and values["balanced_accuracy"] == pytest.approx(0.5)


def test_auroc_and_average_precision_of_a_two_class_task():
    # P(class 1) = 0.1, 0.4 for the negatives, 0.35, 0.8 for the positives; the 5th sample is unlabelled.
    # AUROC: of the 4 (positive, negative) pairs the positive scores higher in 3 (0.35 < 0.4 is the
    # miss): 3/4. Average precision: ranked 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): precision 1/1 at the
    # first positive and 2/3 at the second, AP = (1 + 2/3) / 2 = 5/6.
    values, _ = task_metrics(binary([0.1, 0.4, 0.35, 0.8, 0.99]), np.array([0, 0, 1, 1, MISSING_LABEL]))
    assert values["auroc"] == pytest.approx(0.75)
    assert values["average_precision"] == pytest.approx(5 / 6)
    assert values["accuracy"] == pytest.approx(3 / 4)  # argmax at 0.5: 0.1, 0.4, 0.35 -> 0, 0.8 -> 1


def test_ranking_metrics_absent_where_undefined_and_means_over_the_tasks_that_have_them():
    three, _ = task_metrics(one_hot([0, 1, 2], 3), np.array([0, 1, 2]))
    one_class, _ = task_metrics(binary([0.2, 0.7]), np.array([1, 1]))  # no negative: no ranking to judge
    two, _ = task_metrics(binary([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert "auroc" not in three and "average_precision" not in three and three["balanced_accuracy"] == 1.0
    assert "auroc" not in one_class and one_class["balanced_accuracy"] == pytest.approx(0.5)  # 1 of 2 positives
    mean = mean_over_tasks({"three": three, "one_class": one_class, "two": two})
    assert mean["auroc"] == pytest.approx(0.75)  # the one task that has it
    assert mean["balanced_accuracy"] == pytest.approx((1.0 + 0.5 + 0.75) / 3)  # two: (2/2 + 1/2) / 2
    assert "auroc" not in mean_over_tasks({"three": three})


def test_a_majority_class_model_scores_chance_on_the_new_metrics():
    # 90 negatives, 10 positives; the model always answers "no" with the same confidence
    targets = np.array([0] * 90 + [1] * 10)
    values, _ = task_metrics(binary([0.2] * 100), targets)
    assert values["accuracy"] == pytest.approx(0.9)
    assert values["balanced_accuracy"] == pytest.approx(0.5)  # recalls 1 and 0
    assert values["auroc"] == pytest.approx(0.5)  # every pair tied
    assert values["average_precision"] == pytest.approx(0.1)  # one threshold: the positive rate


def test_the_default_decision_metric_flags_a_majority_class_model_that_accuracy_calls_better():
    """Single-task: 8 of 10 positives and 77 of 90 negatives right (accuracy 0.85, balanced accuracy
    (77/90 + 8/10) / 2 = 0.8278). Multi-task: always "no" (accuracy 0.9, balanced 0.5). On accuracy the
    multi-task model gains (0.9 - 0.85) / 0.85 = +5.9 %; on balanced accuracy it loses
    (0.5 - 0.8278) / 0.8278 = -39.6 %: negative transfer, by the default compare.metrics[0]."""
    targets = np.array([0] * 90 + [1] * 10)
    stl_pred = [0] * 77 + [1] * 13 + [1] * 8 + [0] * 2
    stl, _ = task_metrics(one_hot(stl_pred, 2), targets)
    mtl, _ = task_metrics(binary([0.2] * 100), targets)
    assert stl["accuracy"] == pytest.approx(0.85) and stl["balanced_accuracy"] == pytest.approx((77 / 90 + 0.8) / 2)

    default = CompareConfig().metrics
    assert default[0] == "balanced_accuracy" and "accuracy" in default
    table = compare_tasks({"rare": mtl}, {"rare": stl}, default)
    assert table["primary_metric"] == "balanced_accuracy" and table["negative_transfer"] == ["rare"]
    assert table["delta_m_pct"]["balanced_accuracy"] == pytest.approx((0.5 - (77 / 90 + 0.8) / 2) / ((77 / 90 + 0.8) / 2) * 100)
    assert table["delta_m_pct"]["accuracy"] == pytest.approx((0.9 - 0.85) / 0.85 * 100)
    assert compare_tasks({"rare": mtl}, {"rare": stl}, ["accuracy"])["negative_transfer"] == []  # accuracy: fine

    report = {"tasks": {"rare": mtl}, "mean": mean_over_tasks({"rare": mtl})}
    flat = flat_metrics(report, default, table)
    assert flat == {
        "delta_m": pytest.approx(table["delta_m_pct"]["balanced_accuracy"]),
        "delta_m_accuracy": pytest.approx(table["delta_m_pct"]["accuracy"]),
        "negative_transfer_tasks": 1,
        "mean_mtl_balanced_accuracy": pytest.approx(0.5),
        "mean_mtl_accuracy": pytest.approx(0.9),
    }


def test_a_binary_only_metric_is_compared_over_the_two_class_tasks():
    two_mtl, _ = task_metrics(binary([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))  # AUROC 0.75
    two_stl, _ = task_metrics(binary([0.1, 0.2, 0.35, 0.8]), np.array([0, 0, 1, 1]))  # AUROC 1
    three, _ = task_metrics(one_hot([0, 1, 2], 3), np.array([0, 1, 2]))
    table = compare_tasks({"two": two_mtl, "three": three}, {"two": two_stl, "three": three}, ["auroc", "accuracy"])
    assert table["delta_m_pct"]["auroc"] == pytest.approx(-25.0)  # (0.75 - 1) / 1, over `two` only
    assert table["negative_transfer"] == ["two"] and "auroc" not in table["tasks"]["three"]
    with pytest.raises(ValueError, match="none of the tasks has"):
        compare_tasks({"three": three}, {"three": three}, ["average_precision"])
