"""Exact duplicates among the manifest's rows: the same file twice (same path), or the same bytes under two
names (same content hash). Why it matters: a duplicate that lands in train and test makes the test
score optimistic, and one image under two labels is a contradiction the model cannot learn.

A set of duplicate rows whose carried columns (every task label, the sample weight, a given split, the
group) all agree is merged into its first row; a set that disagrees anywhere is a conflict, and the
ingest rejects all of its rows with the reason (which of them is right cannot be known).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DuplicateSet:
    rows: list[int]  # indices of the rows holding one image, in manifest order
    same_path: bool  # all of them name the same file (else: the same bytes under different paths)
    differing: list[str]  # carried columns whose values differ; empty: the rows are merged

    @property
    def why(self) -> str:
        return "same path" if self.same_path else "same file content"


def find_duplicates(digests: np.ndarray, path_keys: np.ndarray, columns: dict[str, np.ndarray]) -> list[DuplicateSet]:
    """The sets of two or more rows with the same content digest, each classified.

    digests, path_keys: one fixed-width bytes value per row (a hash of the file and of its path);
    columns: name -> one comparable value per row, for every column the rows must agree on.
    """
    if len(digests) < 2:
        return []
    _, inverse, counts = np.unique(digests, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    dup_rows = np.flatnonzero(counts[inverse] > 1)
    if len(dup_rows) == 0:
        return []
    order = dup_rows[np.argsort(inverse[dup_rows], kind="stable")]  # grouped by digest, manifest order within
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    sets = []
    for rows in np.split(order, bounds):
        differing = [name for name, values in columns.items() if len(np.unique(values[rows])) > 1]
        sets.append(DuplicateSet([int(r) for r in rows], len(np.unique(path_keys[rows])) == 1, differing))
    sets.sort(key=lambda d: d.rows[0])
    return sets
