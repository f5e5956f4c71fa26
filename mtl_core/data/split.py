"""Deterministic stratified train/val/test split for multi-label-column data.

Rows are stratified on the joint label of all tasks, so every task's class balance carries over to each
split. Within each stratum, rows are shuffled with the seed and laid on a circle starting at a random
(seeded) offset; a row's position picks its split. Each stratum then gets its fractions to within one
row, and tiny strata are not all pushed into the first split.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def _stratum_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def stratified_split(labels: pd.DataFrame, fractions: dict[str, float], seed: int) -> list[str]:
    """Assign each row a split name; same labels + fractions + seed -> same assignment.

    The result depends only on the rows' labels and order within a stratum, not on which other strata
    exist, so adding rows of a new class does not reshuffle the others.
    """
    names = list(fractions)
    bounds = np.cumsum([fractions[n] for n in names])
    bounds[-1] = 1.0 + 1e-9
    keys = labels.astype(str).agg("\x1f".join, axis=1).reset_index(drop=True)
    out = np.empty(len(labels), dtype=object)
    for key, idx in keys.groupby(keys, sort=True).groups.items():
        positions = np.asarray(idx)
        rng = np.random.default_rng(_stratum_seed(seed, key))
        order = rng.permutation(len(positions))
        offset = rng.random()
        q = ((np.arange(len(positions)) + offset) / len(positions)) % 1.0
        which = np.searchsorted(bounds, q, side="right")
        out[positions[order]] = [names[w] for w in which]
    return out.tolist()
