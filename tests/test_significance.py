"""Per-task significance (mtl_core/evaluation/significance.py): against hand-computed cases and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mtl_core.evaluation.significance import (
    BETTER, NO_DIFFERENCE, WORSE, _resampled, mcnemar_exact, metric_value, paired_bootstrap,
)  # fmt: skip


def test_mcnemar_exact_by_hand() -> None:
    """8 images only A gets right, 1 only B, 11 both, 0 neither: under H0 each discordant image is A's
    with probability 1/2, so p = 2 * P(X <= 1 | n=9) = 2 * (C(9,0) + C(9,1)) / 2^9 = 20 / 512."""
    y = np.zeros(20, dtype=int)
    a = np.r_[np.zeros(8), np.ones(1), np.zeros(11)].astype(int)  # wrong on image 8 only
    b = np.r_[np.ones(8), np.zeros(1), np.zeros(11)].astype(int)  # wrong on images 0-7
    result = mcnemar_exact(y, a, b)
    assert (result["a_only"], result["b_only"]) == (8, 1)
    assert result["p_value"] == pytest.approx(20 / 512)
    assert mcnemar_exact(y, a, a) == {"a_only": 0, "b_only": 0, "p_value": 1.0}


def test_identical_models_differ_by_nothing() -> None:
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    for metric in ("accuracy", "balanced_accuracy"):
        d = paired_bootstrap(metric, y, p, p, resamples=300)
        assert (d.difference, d.low, d.high, d.verdict) == (0.0, 0.0, 0.0, NO_DIFFERENCE)


def test_a_clear_gain_and_a_clear_loss() -> None:
    """A answers 200 images right; B misses 60 of them: +0.30 accuracy, far outside resampling noise."""
    y = np.arange(200) % 5
    a, b = y.copy(), y.copy()
    b[:60] = (b[:60] + 1) % 5
    d = paired_bootstrap("accuracy", y, a, b, resamples=1000)
    assert d.difference == pytest.approx(0.30) and d.verdict == BETTER and 0 < d.low < 0.30 < d.high
    assert paired_bootstrap("accuracy", y, b, a, resamples=1000).verdict == WORSE
    assert paired_bootstrap("balanced_accuracy", y, a, b, resamples=1000).verdict == BETTER


def test_a_small_difference_on_few_images_is_noise() -> None:
    """2 images of 100 apart (98 % against 96 %): within the noise of 100 test images."""
    y = np.zeros(100, dtype=int)
    a, b = y.copy(), y.copy()
    a[:2], b[:4] = 1, 1
    d = paired_bootstrap("accuracy", y, a, b, resamples=2000)
    assert d.difference == pytest.approx(0.02) and d.verdict == NO_DIFFERENCE and d.low <= 0 <= d.high


def test_the_interval_agrees_with_scipys_paired_percentile_bootstrap() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 400)
    a = np.where(rng.random(400) < 0.8, y, (y + 1) % 3)
    b = np.where(rng.random(400) < 0.7, y, (y + 2) % 3)
    ours = paired_bootstrap("accuracy", y, a, b, resamples=20000, seed=3)
    theirs = stats.bootstrap(
        ((a == y).astype(float), (b == y).astype(float)), lambda x, z: np.mean(x) - np.mean(z), paired=True,
        n_resamples=20000, method="percentile", confidence_level=0.95, random_state=5,
    ).confidence_interval  # fmt: skip
    assert ours.low == pytest.approx(theirs.low, abs=0.006) and ours.high == pytest.approx(theirs.high, abs=0.006)


def test_the_vectorised_balanced_accuracy_is_the_metric_on_each_resample() -> None:
    """Balanced accuracy as evaluation/metrics.py defines it: the mean recall over the classes present
    in the (resampled) labels, a class absent from a resample left out."""
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(50), np.ones(30), np.full(3, 2)].astype(int)  # class 2 rare: absent from some resamples
    p = np.where(rng.random(y.size) < 0.7, y, (y + 1) % 3)
    index = rng.integers(0, y.size, size=(40, y.size))
    fast = _resampled("balanced_accuracy", y, p == y, index)
    slow = [metric_value("balanced_accuracy", y[i], p[i]) for i in index]
    assert np.allclose(fast, slow)
    assert any(2 not in y[i] for i in index)  # the rare class is missing from at least one resample
    # by hand: recalls 1.0, 0.5 and an absent class -> 0.75, not (1.0 + 0.5 + 0) / 3
    assert metric_value("balanced_accuracy", np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0])) == 0.75


def test_no_labelled_image_gives_no_verdict() -> None:
    d = paired_bootstrap("accuracy", np.zeros(0, int), np.zeros(0, int), np.zeros(0, int))
    assert math.isnan(d.difference) and d.verdict == NO_DIFFERENCE


def test_an_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="no paired bootstrap for metric 'auroc'"):
        paired_bootstrap("auroc", np.zeros(3, int), np.zeros(3, int), np.zeros(3, int))
