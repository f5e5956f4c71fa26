"""Do the predicted probabilities mean what they say? Expected calibration error and temperature scaling.

* `expected_calibration_error`: the test images are put into `bins` equal-width bins of their top
  predicted probability (confidence); ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b| (Guo, Pleiss,
  Sun & Weinberger 2017, eq. 3; Naeini et al. 2015). 15 equal-width bins, as Guo et al.
* `fit_temperature`: the one scalar T > 0 per task that minimises the negative log-likelihood of the
  validation split's labels under softmax(logits / T) (Guo et al. 2017, "temperature scaling"): it does
  not change any argmax (accuracy, balanced accuracy, the confusion matrix stay as they are), only how
  sure the probabilities are. Found by a bounded 1-d search over log T (scipy's `minimize_scalar`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 15
T_BOUNDS = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """Logits up to a constant per row (what temperature scaling needs) from probabilities."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))


@dataclass(frozen=True)
class Reliability:
    """Per equal-width confidence bin: how many images, their mean confidence, their accuracy."""

    edges: np.ndarray  # (bins + 1,)
    count: np.ndarray  # (bins,)
    confidence: np.ndarray  # (bins,) NaN where empty
    accuracy: np.ndarray  # (bins,) NaN where empty
    ece: float

    def as_dict(self) -> dict[str, list[float | None] | float]:
        clean = lambda a: [None if not np.isfinite(v) else float(v) for v in a]  # noqa: E731
        return {"edges": clean(self.edges), "count": [int(c) for c in self.count], "confidence": clean(self.confidence),
                "accuracy": clean(self.accuracy), "ece": self.ece}  # fmt: skip


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = BINS) -> Reliability:
    """The reliability table and ECE of `probs` (N, C) against `targets` (N,), labelled samples only."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    if len(targets) == 0:
        empty = np.full(bins, np.nan)
        return Reliability(edges, np.zeros(bins, dtype=int), empty, empty, float("nan"))
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(float)
    # bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 joins the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=confidence, minlength=bins) / count
        acc = np.bincount(which, weights=correct, minlength=bins) / count
    ece = float(np.nansum(count / len(targets) * np.abs(acc - conf)))
    return Reliability(edges, count, conf, acc, ece)


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = BINS) -> float:
    return reliability(probs, targets, bins).ece


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `targets` under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(targets)), targets].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature that minimises the NLL of `targets` (labelled samples only); 1.0 without any."""
    from scipy.optimize import minimize_scalar

    targets = np.asarray(targets)
    if len(targets) == 0:
        return 1.0
    lo, hi = np.log(T_BOUNDS)
    result = minimize_scalar(lambda log_t: nll(logits, targets, float(np.exp(log_t))), bounds=(lo, hi), method="bounded",
                             options={"xatol": 1e-6})  # fmt: skip
    return float(np.exp(result.x))
