"""Train/val/test splits: stratified on the labels, grouped, or the manifest's own; and their checks.

* `stratified_split`: rows are stratified on the joint label of all tasks, so every task's class balance
  carries over to each split. Within each stratum, rows are shuffled with the seed and laid on a circle
  starting at a random (seeded) offset; a row's position picks its split. Each stratum then gets its
  fractions to within one row, and tiny strata are not all pushed into the first split.
* `grouped_split` (data.split.group_column): every group (a person, a patient, a product) goes whole to
  one split, so no split sees another's subject. Groups are placed largest first (ties in a seeded
  order), each into the split where it brings the class counts of every task, and the split's size,
  closest to their targets; `split_balance` reports how close that came.
* `parse_split`: the manifest's own `split` column, when it has one.
* `shared_keys`: the keys (file content hashes, groups) found in more than one split, for the leakage
  check that the data report states.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
"""Accepted values of a manifest's `split` column (case-insensitive) and the split each one means."""


def parse_split(value: str) -> str | None:
    """The split a manifest cell names, or None if it names none."""
    return SPLIT_VALUES.get(value.strip().lower())


def _stratum_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def stratified_split_codes(
    codes: np.ndarray, vocab: list[list[str]], fractions: dict[str, float], seed: int
) -> np.ndarray:
    """Split index (into `fractions`' order) per row of integer label codes (N, T), -1 for a missing label.

    The stratum of a row is keyed by its label strings (vocab[t][code], "" when missing), so the result
    depends only on the rows' labels and order within a stratum, not on which other strata exist or on
    the order classes were first seen: adding rows of a new class does not reshuffle the others.
    """
    names = list(fractions)
    bounds = np.cumsum([fractions[n] for n in names])
    bounds[-1] = 1.0 + 1e-9
    out = np.empty(len(codes), dtype=np.int8)
    if len(codes) == 0:
        return out
    uniques, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(uniques) + 1))
    for k, combo in enumerate(uniques):
        key = "\x1f".join(vocab[t][c] if c >= 0 else "" for t, c in enumerate(combo))
        positions = order[starts[k] : starts[k + 1]]
        rng = np.random.default_rng(_stratum_seed(seed, key))
        perm = rng.permutation(len(positions))
        offset = rng.random()
        q = ((np.arange(len(positions)) + offset) / len(positions)) % 1.0
        out[positions[perm]] = np.searchsorted(bounds, q, side="right")
    return out


def stratified_split(labels: pd.DataFrame, fractions: dict[str, float], seed: int) -> list[str]:
    """Assign each row a split name; same labels + fractions + seed -> same assignment."""
    names = list(fractions)
    columns = [pd.factorize(labels[c].astype(str).reset_index(drop=True), sort=False) for c in labels]
    codes = np.stack([c for c, _ in columns], axis=1) if columns else np.zeros((len(labels), 0), np.int64)
    vocab = [list(u) for _, u in columns]
    which = stratified_split_codes(codes, vocab, fractions, seed)
    return [names[w] for w in which]


def grouped_split(
    codes: np.ndarray, num_classes: list[int], groups: np.ndarray, fractions: dict[str, float], seed: int
) -> np.ndarray:
    """Split index per row such that rows of one group (integer ids, `groups`) share a split.

    Greedy: groups in order of size (largest first, ties in a seeded random order) each go to the split
    that minimises sum_f w_f (count_f - target_f)^2 after adding it, over every (task, class) count and the
    split's size, with target_f = fraction x total_f, w_f = 1 / total_f for a class and T / N for the size
    (the size weighs as much as all T tasks together).
    """
    n, n_tasks = codes.shape
    frac = np.array(list(fractions.values()), dtype=np.float64)
    offsets = np.concatenate([[0], np.cumsum(num_classes)]).astype(np.int64)
    n_features = int(offsets[-1]) + 1  # + the size
    size_f = n_features - 1
    features = np.where(codes >= 0, codes + offsets[:-1], -1)
    totals = np.bincount(features[features >= 0], minlength=n_features).astype(np.float64)
    totals[size_f] = n
    weights = np.where(totals > 0, 1.0 / np.maximum(totals, 1.0), 0.0)
    weights[size_f] = max(n_tasks, 1) / max(n, 1)
    # plain Python floats: a group touches T + 1 counts in each of 3 splits, where numpy's per-call cost
    # dominates (200,000 single-row groups: 2 s instead of 7 s with numpy)
    target = (frac[:, None] * totals[None, :]).tolist()
    current = [[0.0] * n_features for _ in frac]
    w = weights.tolist()
    splits = range(len(frac))

    n_groups = int(groups.max()) + 1 if n else 0
    sizes = np.bincount(groups, minlength=n_groups)
    rng = np.random.default_rng(seed)
    group_order = np.lexsort((rng.permutation(n_groups), -sizes))
    rows_by_group = np.argsort(groups, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    choice = np.empty(n_groups, dtype=np.int8)
    for g in group_order.tolist():
        rows = rows_by_group[starts[g] : starts[g + 1]]
        f = features[rows].reshape(-1)
        counts: dict[int, float] = {}
        for feature in f.tolist():
            if feature >= 0:
                counts[feature] = counts.get(feature, 0.0) + 1.0
        counts[size_f] = float(len(rows))
        best, best_delta = 0, float("inf")
        for s in splits:
            cur, tgt = current[s], target[s]
            delta = sum(w[k] * (x * x + 2.0 * x * (cur[k] - tgt[k])) for k, x in counts.items())
            if delta < best_delta:
                best, best_delta = s, delta
        cur = current[best]
        for k, x in counts.items():
            cur[k] += x
        choice[g] = best
    out = choice[groups] if n else np.empty(0, dtype=np.int8)
    return out


def split_balance(
    codes: np.ndarray, tasks: list[str], vocab: list[list[str]], which: np.ndarray, fractions: dict[str, float]
) -> dict:
    """Achieved split fractions, and the largest gap between a class's share in a split and overall.

    Shares are over a task's labelled rows; the gap is in percentage points of that split's rows.
    """
    names = list(fractions)
    n = len(which)
    sizes = np.bincount(which, minlength=len(names))
    worst = {"task": None, "class": None, "split": None, "share_in_split": 0.0, "share_overall": 0.0, "deviation": 0.0}
    for t, task in enumerate(tasks):
        labelled = codes[:, t] >= 0
        k = len(vocab[t])
        table = np.zeros((len(names), k), dtype=np.int64)
        np.add.at(table, (which[labelled], codes[labelled, t]), 1)
        overall = table.sum(axis=0) / max(int(labelled.sum()), 1)
        for s, split in enumerate(names):
            total = table[s].sum()
            if total == 0:
                continue
            gaps = np.abs(table[s] / total - overall)
            c = int(np.argmax(gaps))
            if gaps[c] > worst["deviation"]:
                worst = {
                    "task": task, "class": vocab[t][c], "split": split,
                    "share_in_split": round(float(table[s, c] / total), 4),
                    "share_overall": round(float(overall[c]), 4),
                    "deviation": round(float(gaps[c]), 4),
                }  # fmt: skip
    return {
        "fractions_target": {s: fractions[s] for s in names},
        "fractions": {s: round(float(sizes[i] / max(n, 1)), 4) for i, s in enumerate(names)},
        "largest_class_share_deviation": worst,
    }


def shared_keys(keys: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Indices into np.unique(keys) of the keys whose rows are in more than one split."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    _, key_id = np.unique(keys, return_inverse=True)
    key_id = key_id.reshape(-1).astype(np.int64)
    pairs = np.unique(key_id * 8 + which.astype(np.int64))
    return np.flatnonzero(np.bincount(pairs // 8) > 1)
