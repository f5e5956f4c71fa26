"""Which given labels does the model contradict with confidence? Confident learning on out-of-sample
predictions (Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR).

For one task, from predicted probabilities p (N, C) of images the model was not trained on and their
given labels ỹ:

* per class j, the threshold t_j = the mean of p_j over the images labelled j (the model's average
  self-confidence on its own class);
* image i counts towards the confident joint at (ỹ_i, j*), where j* is, among the classes whose
  probability reaches their threshold (p_ij ≥ t_j), the one with the highest probability;
* an image whose j* differs from its given label is a suspected label problem; the suggested label is
  j*. Images with no class above its threshold are not counted (no confident opinion).

Suspects are listed most confident first (the probability of the suggested label). A task needs at
least two classes among the labels to compare (`ValueError` otherwise: the caller says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelIssue:
    index: int  # the image's position in the arrays given
    given: int
    suggested: int
    probability: float  # the model's probability of the suggested label
    given_probability: float


def class_thresholds(probs: np.ndarray, given: np.ndarray) -> np.ndarray:
    """t_j: the mean probability of class j over the images labelled j; +inf for a class nobody has."""
    c = probs.shape[1]
    out = np.full(c, np.inf)
    for j in range(c):
        own = given == j
        if own.any():
            out[j] = float(probs[own, j].mean())
    return out


def find_label_issues(probs: np.ndarray, given: np.ndarray) -> list[LabelIssue]:
    """The suspected label problems among the images (labelled ones only), most confident first."""
    probs, given = np.asarray(probs, dtype=np.float64), np.asarray(given, dtype=np.int64)
    present = np.unique(given)
    if len(present) < 2:
        raise ValueError(f"the labels hold {len(present)} class(es); the label-problem search needs two or more")
    thresholds = class_thresholds(probs, given)
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -np.inf)
    best = masked.argmax(axis=1)
    confident = above.any(axis=1)
    issues = [
        LabelIssue(int(i), int(given[i]), int(best[i]), float(probs[i, best[i]]), float(probs[i, given[i]]))
        for i in np.flatnonzero(confident & (best != given))
    ]
    return sorted(issues, key=lambda x: -x.probability)
