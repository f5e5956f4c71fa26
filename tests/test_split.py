import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from mtl_core.data.split import stratified_split
from mtl_core.paths import ProjectPaths

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _labels(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.choice(["x", "y", "z"], n), "b": rng.choice(["p", "q"], n)})


def test_same_seed_same_split_and_other_seed_differs():
    labels = _labels(600)
    first = stratified_split(labels, FRACTIONS, seed=1)
    assert first == stratified_split(labels, FRACTIONS, seed=1)
    assert first != stratified_split(labels, FRACTIONS, seed=2)


def test_each_stratum_gets_its_fractions_within_one_row():
    labels = _labels(900)
    split = pd.Series(stratified_split(labels, FRACTIONS, seed=0))
    for _, group in labels.groupby(["a", "b"]):
        n = len(group)
        counts = split[group.index].value_counts()
        for name, frac in FRACTIONS.items():
            assert abs(counts.get(name, 0) - frac * n) <= 1, (name, n, counts.to_dict())


def test_whole_split_fractions_and_class_balance():
    labels = _labels(2000, seed=3)
    split = np.array(stratified_split(labels, FRACTIONS, seed=0))
    for name, frac in FRACTIONS.items():
        assert abs((split == name).mean() - frac) < 0.01
        # per-task class proportions carry over to every split
        for col in labels:
            overall = labels[col].value_counts(normalize=True)
            part = labels[col][split == name].value_counts(normalize=True)
            assert (part - overall).abs().max() < 0.03


def test_tiny_strata_are_not_all_in_train():
    # 200 strata of one row each: a naive "first rows go to train" would put all of them in train
    labels = pd.DataFrame({"a": [f"c{i}" for i in range(200)]})
    split = np.array(stratified_split(labels, FRACTIONS, seed=0))
    assert 10 < (split == "test").sum() < 50


def test_train_val_and_test_never_share_an_image(trained_project: Path) -> None:
    """Leakage check on the ingested built-in data: no path, no file content and no preprocessed image
    is in two splits (the counts alone would not show three test rows pointing at training images)."""
    paths = ProjectPaths(trained_project)
    manifest = pd.read_csv(paths.manifest)
    assert set(manifest["split"]) == {"train", "val", "test"}
    where: dict[str, set[str]] = {}
    for row in manifest.itertuples():
        file = (trained_project / row.path).resolve()
        for key in (str(file), hashlib.sha256(file.read_bytes()).hexdigest()):
            where.setdefault(key, set()).add(row.split)
    shared = {k: s for k, s in where.items() if len(s) > 1}
    assert not shared, f"{len(shared)} images in more than one split, e.g. {next(iter(shared.items()))}"
    cached: dict[bytes, str] = {}
    for split in ("train", "val", "test"):
        for image in np.load(paths.images_cache(split)):
            digest = hashlib.sha256(image.tobytes()).digest()
            assert cached.setdefault(digest, split) == split, f"a {split} image is also in {cached[digest]}"
