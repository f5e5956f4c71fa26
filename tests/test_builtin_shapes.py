"""The built-in shapes generator: determinism, manifest schema, and that the labels match the pixels."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl_core.data.builtin.shapes import (
    COLOR_REFERENCE_RGB,
    SHAPE_TASKS,
    generate_shapes,
    render_example,
    render_mask,
    sample_spec,
    shape_vertices,
)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _quadrant(x: float, y: float, size: int) -> str:
    return ("top" if y < size / 2 else "bottom") + "_" + ("left" if x < size / 2 else "right")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """150 images at 64 px, shared by the tests that only read them."""
    out = tmp_path_factory.mktemp("shapes")
    csv_path = generate_shapes(out, num_images=150, image_size=64, seed=7)
    return out, _rows(csv_path)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", num_images=40, image_size=48, seed=3)
    b = generate_shapes(tmp_path / "b", num_images=40, image_size=48, seed=3)
    assert a.read_bytes() == b.read_bytes()
    for row in _rows(a):
        assert (a.parent / row["path"]).read_bytes() == (b.parent / row["path"]).read_bytes()

    c = generate_shapes(tmp_path / "c", num_images=40, image_size=48, seed=4)
    differs = c.read_bytes() != a.read_bytes() or any(
        not np.array_equal(_pixels(a.parent / r["path"]), _pixels(c.parent / r["path"])) for r in _rows(a)
    )
    assert differs
    # Labels are not merely permuted noise: a different seed changes most rows.
    same = sum(ra == rc for ra, rc in zip(_rows(a), _rows(c), strict=True))
    assert same < 10


def test_image_i_does_not_depend_on_num_images(tmp_path: Path) -> None:
    """Per-image RNGs: a shorter run is an exact prefix of a longer one."""
    short = generate_shapes(tmp_path / "short", num_images=15, image_size=40, seed=11)
    long = generate_shapes(tmp_path / "long", num_images=45, image_size=40, seed=11)
    assert _rows(long)[:15] == _rows(short)
    for row in _rows(short):
        assert np.array_equal(_pixels(short.parent / row["path"]), _pixels(long.parent / row["path"]))


def test_csv_schema_paths_and_label_values(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "not" / "yet" / "there"
    csv_path = generate_shapes(out, num_images=30, image_size=40, seed=0)
    assert csv_path == out / "labels.csv"

    with csv_path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == ["path", "shape", "color", "size", "position"]
    assert list(SHAPE_TASKS) == header[1:]
    assert [len(v) for v in SHAPE_TASKS.values()] == [5, 6, 3, 4]

    rows = _rows(csv_path)
    assert len(rows) == 30
    assert [r["path"] for r in rows] == [f"images/{i:06d}.png" for i in range(30)]
    for row in rows:
        with Image.open(out / row["path"]) as im:
            assert im.format == "PNG"
            assert im.mode == "RGB"
            assert im.size == (40, 40)
        for task, classes in SHAPE_TASKS.items():
            assert row[task] in classes


def test_png_pixels_and_csv_match_the_recomputable_spec(generated: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = generated
    for i, row in enumerate(rows[:40]):
        spec, pixels = render_example(7, i, 64)
        assert spec == sample_spec(7, i, 64)
        assert spec.labels == {task: row[task] for task in SHAPE_TASKS}
        assert np.array_equal(_pixels(out / row["path"]), pixels)


def test_position_label_matches_spec_and_pixels(generated: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = generated
    size = 64
    for i, row in enumerate(rows):
        spec = sample_spec(7, i, size)
        # Ground truth: centre strictly inside the labelled quadrant, clear of the midlines.
        assert _quadrant(spec.cx, spec.cy, size) == row["position"]
        assert min(abs(spec.cx - size / 2), abs(spec.cy - size / 2)) >= 0.05 * size
        # Whole shape inside the image.
        for x, y in shape_vertices(spec):
            assert 0 < x < size and 0 < y < size

        # The drawn shape agrees: the strongly saturated pixels (only the foreground is saturated;
        # background and distractors are near-grey) are centred on the spec's centre.
        px = _pixels(out / row["path"]).astype(np.int16)
        saturated = (px.max(axis=2) - px.min(axis=2)) > 90
        ys, xs = np.nonzero(saturated)
        assert len(xs) >= 10, f"row {i}: foreground not found"
        mx, my = xs.mean() + 0.5, ys.mean() + 0.5
        assert abs(mx - spec.cx) < 1.5 and abs(my - spec.cy) < 1.5, (i, mx, my, spec)
        assert _quadrant(mx, my, size) == row["position"]
        assert not saturated[0].any() and not saturated[-1].any()
        assert not saturated[:, 0].any() and not saturated[:, -1].any()


def test_mean_colour_inside_shape_is_nearest_the_labelled_reference(
    generated: tuple[Path, list[dict[str, str]]],
) -> None:
    out, rows = generated
    names = list(COLOR_REFERENCE_RGB)
    refs = np.array([COLOR_REFERENCE_RGB[n] for n in names], dtype=float)
    assert set(names) == set(SHAPE_TASKS["color"])
    for i, row in enumerate(rows):
        mask = render_mask(sample_spec(7, i, 64), 64)
        assert mask.sum() >= 5
        mean = _pixels(out / row["path"])[mask].astype(float).mean(axis=0)
        nearest = names[int(np.argmin(np.linalg.norm(refs - mean, axis=1)))]
        assert nearest == row["color"], (i, mean, row["color"])


def test_size_classes_are_separable_by_area() -> None:
    """Per shape, every small mask is smaller than every medium one, and medium than large."""
    areas: dict[tuple[str, str], list[int]] = {}
    for i in range(300):
        spec = sample_spec(1, i, 64)
        areas.setdefault((spec.shape, spec.size), []).append(int(render_mask(spec, 64).sum()))
    for shape in SHAPE_TASKS["shape"]:
        small, medium, large = (areas[(shape, s)] for s in SHAPE_TASKS["size"])
        assert max(small) < min(medium) and max(medium) < min(large), shape


def test_every_class_of_every_task_is_well_represented(tmp_path: Path) -> None:
    rows = _rows(generate_shapes(tmp_path, num_images=600, image_size=32, seed=5))
    for task, classes in SHAPE_TASKS.items():
        counts = Counter(r[task] for r in rows)
        assert set(counts) == set(classes), task
        expected = len(rows) / len(classes)
        assert min(counts.values()) > 0.6 * expected, (task, counts)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_images": 0}, "num_images"),
        ({"num_images": -5}, "num_images"),
        ({"image_size": 31}, "image_size"),
        ({"image_size": 0}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise_before_writing(tmp_path: Path, kwargs: dict[str, int], match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        generate_shapes(out, **{"num_images": 5, "image_size": 32, **kwargs})
    assert not out.exists()


# ------------------------------------------------------------------ builtin:shape_attributes (40 yes/no)


def test_shape_attributes_label_the_same_images_with_forty_yes_no_columns(generated, tmp_path: Path) -> None:
    """The same pixels as `shapes` with the same seed; each attribute read off the four labels by hand."""
    from mtl_core.data.builtin import BUILTIN_DATASETS
    from mtl_core.data.builtin.attributes import ATTRIBUTES

    shapes_dir, shapes_rows = generated
    csv_path = BUILTIN_DATASETS["shape_attributes"](tmp_path / "attrs", 150, 64, 7)
    with csv_path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    rows = _rows(csv_path)
    assert header == ["path", *ATTRIBUTES] and len(header) == 41 and len(rows) == 150
    for plain, attrs in zip(shapes_rows, rows, strict=True):
        assert attrs["path"] == plain["path"]
        assert (csv_path.parent / attrs["path"]).read_bytes() == (shapes_dir / plain["path"]).read_bytes()
        expected = {
            "is_" + plain["shape"]: "yes", "is_" + plain["color"]: "yes", "is_" + plain["size"]: "yes",
            "at_" + plain["position"]: "yes",
            "in_top_half": "yes" if plain["position"] in ("top_left", "top_right") else "no",
            "in_left_half": "yes" if plain["position"] in ("top_left", "bottom_left") else "no",
            "triangle_and_yellow": "yes" if (plain["shape"], plain["color"]) == ("triangle", "yellow") else "no",
            "red_and_top_left": "yes" if (plain["color"], plain["position"]) == ("red", "top_left") else "no",
            "circle_or_magenta": "yes" if plain["shape"] == "circle" or plain["color"] == "magenta" else "no",
            "large_or_bottom_right": "yes" if plain["size"] == "large" or plain["position"] == "bottom_right" else "no",
        }  # fmt: skip
        assert {k: attrs[k] for k in expected} == expected
        one_vs_rest = [k for k in ATTRIBUTES if k.startswith(("is_", "at_"))]
        assert sum(attrs[k] == "yes" for k in one_vs_rest) == 4  # one class of each factor
    rates = {k: sum(r[k] == "yes" for r in rows) / len(rows) for k in ATTRIBUTES}
    assert 0 < min(rates.values()) < 0.1 and 0.4 < max(rates.values()) <= 0.65  # rare to even, as documented
