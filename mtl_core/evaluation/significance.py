"""Is a per-task difference between two models real, or noise of the test split?

Both models answer the same test images, so the comparison is paired:

* `paired_bootstrap`: the difference of a metric (model A minus model B, accuracy or balanced accuracy)
  on the test split, with a percentile confidence interval from resampling the test images with
  replacement (the same resample for both models, `resamples` times, seeded). Balanced accuracy is
  computed as evaluation/metrics.py computes it: the mean recall over the classes present in the
  (resampled) labels.
* `mcnemar_exact`: McNemar's exact test for accuracy (Edwards 1948 / the exact binomial form): of the
  images exactly one model gets right, under "no difference" each is A's with probability 1/2; the
  two-sided p-value of the split observed (scipy.stats.binomtest).

`verdict` reads the interval: `better` when it lies above 0, `worse` when below, else `no significant
difference`. The compare stage flags negative transfer, and the `compare.select` policy judges a
solution, by the verdict, not by the sign of the raw difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no significant difference"
METRICS = ("accuracy", "balanced_accuracy")
"""The metrics a bootstrap can compute from the predicted classes alone."""


@dataclass(frozen=True)
class Difference:
    """A − B on one metric: the point estimate on the whole test split, its interval, the verdict."""

    metric: str
    a: float
    b: float
    difference: float
    low: float
    high: float
    confidence: float
    resamples: int
    verdict: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def metric_value(metric: str, targets: np.ndarray, predicted: np.ndarray) -> float:
    """Accuracy, or balanced accuracy (mean recall over the classes present in `targets`)."""
    if metric not in METRICS:
        raise ValueError(f"no paired bootstrap for metric {metric!r}; it works on {', '.join(METRICS)}")
    correct = predicted == targets
    if metric == "accuracy":
        return float(correct.mean()) if correct.size else float("nan")
    classes = np.unique(targets)
    return float(np.mean([correct[targets == c].mean() for c in classes])) if classes.size else float("nan")


def _resampled(metric: str, targets: np.ndarray, correct: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The metric on each resample (rows of `index`), vectorised: (B,)."""
    if metric == "accuracy":
        return correct[index].mean(axis=1)
    classes = int(targets.max()) + 1
    rows = np.repeat(np.arange(index.shape[0]), index.shape[1])
    keys = rows * classes + targets[index].ravel()
    size = index.shape[0] * classes
    count = np.bincount(keys, minlength=size).reshape(-1, classes)
    hits = np.bincount(keys, weights=correct[index].ravel().astype(float), minlength=size).reshape(-1, classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(count > 0, hits / np.maximum(count, 1), np.nan)
    return np.nanmean(recall, axis=1)


def verdict(low: float, high: float) -> str:
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return NO_DIFFERENCE


def paired_bootstrap(
    metric: str, targets: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray, resamples: int = 2000,
    confidence: float = 0.95, seed: int = 0, chunk: int = 500,
) -> Difference:  # fmt: skip
    """A − B on `metric` over the test images (`targets`, the labelled ones only), with the percentile
    interval of `resamples` paired bootstrap resamples (seeded: the same answer every time)."""
    targets, a, b = (np.asarray(v, dtype=np.int64) for v in (targets, predicted_a, predicted_b))
    if not (targets.shape == a.shape == b.shape) or targets.ndim != 1:
        raise ValueError(f"targets and both predictions must be 1-d of one length, got {targets.shape}, {a.shape}, {b.shape}")
    value_a, value_b = metric_value(metric, targets, a), metric_value(metric, targets, b)
    if targets.size == 0:
        nan = float("nan")
        return Difference(metric, nan, nan, nan, nan, nan, confidence, 0, NO_DIFFERENCE)
    rng = np.random.default_rng(seed)
    correct_a, correct_b = a == targets, b == targets
    diffs = []
    for start in range(0, resamples, chunk):  # bounded memory: `chunk` x N indices at a time
        index = rng.integers(0, targets.size, size=(min(chunk, resamples - start), targets.size))
        diffs.append(_resampled(metric, targets, correct_a, index) - _resampled(metric, targets, correct_b, index))
    d = np.concatenate(diffs)
    tail = (1.0 - confidence) / 2 * 100
    low, high = (float(v) for v in np.percentile(d, [tail, 100 - tail]))
    return Difference(metric, value_a, value_b, value_a - value_b, low, high, confidence, resamples, verdict(low, high))


def mcnemar_exact(targets: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray) -> dict[str, float | int]:
    """McNemar's exact test of equal accuracy: the images only A gets right (`a_only`), only B
    (`b_only`), and the two-sided binomial p-value of that split under p = 1/2 (1.0 without any)."""
    from scipy.stats import binomtest

    targets = np.asarray(targets)
    right_a, right_b = np.asarray(predicted_a) == targets, np.asarray(predicted_b) == targets
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": float(p)}
