"""Ingest's data report (`data/ingested/data_report.json`): what was read, kept, rejected, merged, and how
the split came out, with the leakage statement checked on what was decided."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from mtl_core.data.ingest_rows import portable_path
from mtl_core.data.manifest import SPLIT_COLUMN
from mtl_core.data.split import split_balance
from mtl_core.paths import SPLITS

NO_LEAK = "no image and no group appears in two splits"


def class_counts(codes: np.ndarray, vocab: list[str], which: np.ndarray) -> dict[str, dict[str, int]]:
    """split -> {class: labelled rows}, classes sorted by name, absent classes left out."""
    out = {}
    for i, name in enumerate(SPLITS):
        counts = np.bincount(codes[(which == i) & (codes >= 0)], minlength=len(vocab))
        out[name] = {vocab[c]: int(counts[c]) for c in sorted(np.flatnonzero(counts), key=lambda c: vocab[c])}
    return out


def data_report(cfg, root, csv_path, mf, scan, a, kept, which, method, classes, rejected, merged, raw_paths) -> dict[str, Any]:
    """data_report.json: what was read, kept, rejected, merged, and how the split came out."""
    data, s, tasks = cfg.data, cfg.data.split, scan.cols.tasks
    codes, groups = a["codes"][kept], a["groups"][kept]
    vocab = [list(v) for v in scan.vocab]
    labelled = codes >= 0
    in_split = [which == i for i in range(len(SPLITS))]
    grouped = scan.cols.group is not None
    fractions = {"train": s.train, "val": s.val, "test": s.test}
    return {
        "source": data.source,
        "manifest": portable_path(csv_path.resolve(), root),
        "encoding": {"codec": mf.encoding, "how": mf.encoding_source},
        "tasks": classes,
        "rows_total": scan.rows_total,
        "rows_kept": len(kept),
        "rows_rejected": len(rejected),
        "rejected_reasons": dict(Counter(r.split(":")[0] for r in rejected["reason"])),
        "split_sizes": {name: int(in_split[i].sum()) for i, name in enumerate(SPLITS)},
        "split": {
            "method": method,
            "source": {
                "column": f"the manifest's '{SPLIT_COLUMN}' column (data.split fractions not used)",
                "grouped": f"data.split fractions, each '{s.group_column}' group whole in one split, seed {s.seed}",
                "stratified": f"data.split fractions, stratified on the joint label of all tasks, seed {s.seed}",
            }[method],
            "group_column": s.group_column,
            "groups": {n: len(np.unique(groups[in_split[i]])) for i, n in enumerate(SPLITS)} if grouped else None,
            **split_balance(codes, tasks, vocab, which, fractions),
        },
        "leakage": {
            "statement": NO_LEAK,
            "checked": True,
            "images": len(np.unique(a["digests"][kept])),
            "groups": len(np.unique(groups)) if grouped else None,
        },
        "duplicates": {
            "rows_merged": sum(len(d.rows) - 1 for d in merged),
            "rows_rejected_conflicting": int(rejected["reason"].str.startswith("conflicting duplicate:").sum()),
            "merged": [
                {"kept_row": int(a["lines"][d.rows[0]]), "merged_rows": [int(a["lines"][i]) for i in d.rows[1:]],
                 "why": d.why, "paths": sorted({raw_paths[i] for i in d.rows})}
                for d in merged
            ],  # fmt: skip
        },
        "class_counts": {t: class_counts(codes[:, k], vocab[k], which) for k, t in enumerate(tasks)},
        "missing_labels": {t: int((~labelled[:, k]).sum()) for k, t in enumerate(tasks)},
        "labelled_counts": {
            t: {n: int((in_split[i] & labelled[:, k]).sum()) for i, n in enumerate(SPLITS)} for k, t in enumerate(tasks)
        },
        "sample_weight_column": data.sample_weight_column,
        "images": {
            "modes": dict(sorted(scan.modes.items())), "exif_oriented": scan.oriented, "scaled_to_8bit": scan.scaled,
        },  # fmt: skip
        "ignored_columns": scan.cols.ignored,
    }
