"""Scale: ingest and preprocess over a process pool give byte-identical outputs to one process, the pool
never queues more than 2 x workers chunks, and a disk too small fails before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtl_core.config import config_from_dict
from mtl_core.data.builtin.shapes import generate_shapes
from mtl_core.data.disk import DiskSpaceError, free_bytes, require_free_space
from mtl_core.stages.ingest import run_ingest
from mtl_core.data.parallel import map_chunks
from mtl_core.stages.preprocess import run_preprocess
from mtl_core.paths import SPLITS, ProjectPaths
from tests.test_ingest import make_faces


def outputs(root: Path) -> dict[str, bytes]:
    paths = ProjectPaths(root)
    files = [paths.manifest, paths.rejected, paths.data_report, paths.tasks_file]
    files += [f(s) for s in SPLITS for f in (paths.images_cache, paths.labels_cache, paths.weights_cache)]
    return {f.name: f.read_bytes() for f in files}


def test_a_pool_of_workers_writes_exactly_what_one_process_writes(tmp_path: Path):
    csv = make_faces(tmp_path, n=300)
    df = pd.read_csv(csv, dtype=str)
    df["person"] = [f"p{i % 70}" for i in range(300)]
    df["w"] = [str(1 + i % 3) for i in range(300)]
    df.loc[9, "path"] = "images/none.png"
    pd.concat([df, df.iloc[:12]]).to_csv(csv, index=False)  # 12 duplicates to merge
    cfg = config_from_dict({
        "data": {"source": str(csv), "split": {"group_column": "person"}, "sample_weight_column": "w"},
        "preprocess": {"image_size": 16},
    })  # fmt: skip
    seen = {}
    for workers in (1, 2):
        run_ingest(cfg, tmp_path, workers=workers)
        run_preprocess(cfg, tmp_path, workers=workers)
        seen[workers] = outputs(tmp_path)
    assert seen[1] == seen[2]
    paths = ProjectPaths(tmp_path)
    manifest = pd.read_csv(paths.manifest)
    assert len(manifest) == 299
    for s in SPLITS:  # every row's pixels, resized here with Pillow itself
        part = manifest[manifest["split"] == s].reset_index(drop=True)
        images = np.load(paths.images_cache(s))
        assert len(images) == len(part)
        for k in range(len(part)):
            with Image.open(tmp_path / part.loc[k, "path"]) as im:
                expected = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
            np.testing.assert_array_equal(images[k], expected)
        np.testing.assert_array_equal(np.load(paths.weights_cache(s)), part["w"].astype(np.float32))


def test_builtin_images_rendered_by_a_pool_are_the_same_files(tmp_path: Path):
    def pool(fn, chunks, total):
        return map_chunks(fn, chunks, total=total, desc="generate", workers=2, size=lambda c: c[2] - c[1])

    one = generate_shapes(tmp_path / "one", 300, 32, 5)
    two = generate_shapes(tmp_path / "two", 300, 32, 5, mapper=pool)  # 19 chunks over 2 workers
    assert one.read_bytes() == two.read_bytes() and len(one.read_text().splitlines()) == 301
    for rel in pd.read_csv(one)["path"]:
        assert (one.parent / rel).read_bytes() == (two.parent / rel).read_bytes()


def test_map_chunks_keeps_at_most_two_chunks_per_worker_in_flight():
    pulled = 0

    def chunks():
        nonlocal pulled
        for i in range(50):
            pulled += 1
            yield [i, i + 1]

    results = map_chunks(sum, chunks(), total=100, desc="test", workers=2)
    first = next(results)
    assert first == 1 and pulled == 4  # 2 workers x 2, not all 50
    assert [first, *results] == [2 * i + 1 for i in range(50)]  # in input order
    assert list(map_chunks(sum, ([i] for i in range(5)), total=5, desc="test", workers=1)) == [0, 1, 2, 3, 4]


def test_free_space_check_names_both_sizes(tmp_path: Path):
    free = free_bytes(tmp_path)
    require_free_space(tmp_path / "not" / "yet", 1, "a file")  # a folder to be made: its parent's disk
    with pytest.raises(DiskSpaceError, match=r"the image cache needs [\d.]+ [KMGT]?B, and only [\d.]+ [KMGT]?B is free"):
        require_free_space(tmp_path, free + 10**12, "the image cache")
    require_free_space(tmp_path, free + 10**12, "the image cache", reclaimed=2 * 10**12)  # replacing bigger files


def test_builtin_dataset_too_big_for_the_disk_fails_before_writing(tiny_project: Path):
    cfg = config_from_dict({"data": {"builtin": {"num_images": 10**9}}})
    with pytest.raises(DiskSpaceError, match=r"the built-in dataset \(1000000000 images\) needs 12.4 TB"):
        run_ingest(cfg, tiny_project)
    assert not (tiny_project / "data" / "builtin" / "shapes").exists()


def test_image_cache_too_big_for_the_disk_fails_before_writing(tmp_path: Path):
    per_image = 1024 * 1024 * 3
    n = free_bytes(tmp_path) // per_image + 100
    if n > 300_000:
        pytest.skip(f"{free_bytes(tmp_path) / 1e9:.0f} GB free: a manifest that overfills it would be too long")
    paths = ProjectPaths(tmp_path)
    paths.ingested_dir.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "one.png")
    rows = "".join(f"{i + 2},one.png,{'ab'[i % 2]},{SPLITS[i % 3]}\n" for i in range(n))
    paths.manifest.write_text("row,path,t,split\n" + rows)
    cfg = config_from_dict({"preprocess": {"image_size": 1024}})
    with pytest.raises(DiskSpaceError, match=rf"the image cache \({n} images at 1024x1024x3\) needs"):
        run_preprocess(cfg, tmp_path)
    assert not paths.images_cache("train").exists()
    shutil.rmtree(paths.ingested_dir)
