"""Built-in synthetic "shapes" dataset: one coloured shape on a cluttered background, four tasks.

Why synthetic: the pipeline needs a dataset that is always available (no download), reproducible
bit-for-bit from a seed, and genuinely multi-task. Every image holds exactly one foreground shape whose
shape, colour, size and quadrant are four independent labels with different class counts (5, 6, 3, 4);
all four depend on finding the same object, so a shared backbone has something to share.

To keep the tasks from being trivial, each image gets a low-contrast gradient + texture background,
a few muted grey distractor strokes and blobs (never confusable with the saturated colour classes),
a random rotation of the shape and per-pixel Gaussian noise.

Every image is drawn from its own RNG, seeded by ``SeedSequence([seed, index, stream])``, so image
``i`` is the same whatever ``num_images`` is, and ``sample_spec`` can recompute an image's ground truth
(centre, radius, angle, colour) without rendering it.
"""

from __future__ import annotations

import colorsys
import csv
import math
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOR_REFERENCE_RGB",
    "SHAPE_TASKS",
    "ShapeSpec",
    "generate_shapes",
    "render_alpha",
    "render_example",
    "render_mask",
    "sample_spec",
    "shape_vertices",
]

# Task -> class names, in manifest column order (after `path`). Class counts differ on purpose.
SHAPE_TASKS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "color": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "size": ("small", "medium", "large"),
    "position": ("top_left", "top_right", "bottom_left", "bottom_right"),
}

# Nominal (unjittered) RGB of each colour class; hues 60 degrees apart so jittered samples stay separable.
COLOR_REFERENCE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
_COLOR_HUE_DEG = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}

# Circumradius as a fraction of image_size; +-_SIZE_JITTER keeps the three ranges disjoint.
_SIZE_RADIUS = {"small": 0.09, "medium": 0.14, "large": 0.20}
_SIZE_JITTER = 0.07
_EDGE_PAD = 0.03  # min gap between the shape's circumcircle and the image border (fraction of size)
_MID_MARGIN = 0.06  # min distance of the centre from the midlines, so the quadrant label is unambiguous

_HUE_JITTER_DEG = 12.0
_STREAM_SPEC, _STREAM_PIXELS = 0, 1


@dataclass(frozen=True)
class ShapeSpec:
    """Ground truth of one image: its labels plus the geometry needed to re-render its mask.

    Coordinates are continuous pixels: the image spans [0, image_size] on both axes, y pointing down.
    """

    index: int
    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float  # circumradius in pixels: the whole shape lies within this distance of (cx, cy)
    angle: float  # rotation in degrees
    rgb: tuple[int, int, int]  # the jittered foreground colour actually drawn

    @property
    def labels(self) -> dict[str, str]:
        return {task: getattr(self, task) for task in SHAPE_TASKS}


def _seed_index(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def _check_size(image_size: int) -> int:
    image_size = operator.index(image_size)
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (shapes are unrecognisable below that), got {image_size}")
    return image_size


def _check_seed(seed: int) -> int:
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


def sample_spec(seed: int, index: int, image_size: int) -> ShapeSpec:
    """Draw image ``index``'s labels and geometry; pure, so tests can check ground truth without pixels."""
    seed, image_size, index = _check_seed(seed), _check_size(image_size), operator.index(index)
    rng = _seed_index(seed, index, _STREAM_SPEC)
    shape, color, size, position = (names[int(rng.integers(len(names)))] for names in SHAPE_TASKS.values())

    s = float(image_size)
    radius = _SIZE_RADIUS[size] * s * float(rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER))
    # Centre along each axis: inside the image with the whole circumcircle, and clear of the midline.
    lo, hi = radius + _EDGE_PAD * s, s / 2 - _MID_MARGIN * s
    u, v = rng.uniform(lo, hi, size=2)
    cx = float(s - u) if position.endswith("right") else float(u)
    cy = float(s - v) if position.startswith("bottom") else float(v)
    angle = float(rng.uniform(0.0, 360.0))

    hue = (_COLOR_HUE_DEG[color] + rng.uniform(-_HUE_JITTER_DEG, _HUE_JITTER_DEG)) % 360.0
    sat, val = rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)
    r, g, b = colorsys.hsv_to_rgb(hue / 360.0, sat, val)
    rgb = (round(r * 255), round(g * 255), round(b * 255))
    return ShapeSpec(index, shape, color, size, position, cx, cy, radius, angle, rgb)


def _unit_outline(shape: str) -> np.ndarray:
    """Outline of ``shape`` centred at 0 with circumradius exactly 1, as an (n, 2) array."""
    if shape == "circle":
        t = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "square":
        t = np.deg2rad(45.0 + 90.0 * np.arange(4))
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "triangle":
        t = np.deg2rad(-90.0 + 120.0 * np.arange(3))
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "star":
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)
    elif shape == "cross":
        w = 0.3
        pts = np.array(
            [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1),
             (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)],
            dtype=float,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPE_TASKS['shape']}")
    return pts / np.max(np.hypot(pts[:, 0], pts[:, 1]))


_UNIT_OUTLINES = {name: _unit_outline(name) for name in SHAPE_TASKS["shape"]}


def shape_vertices(spec: ShapeSpec, scale: float = 1.0) -> list[tuple[float, float]]:
    """Polygon of the rotated shape in pixel coordinates (times ``scale``, for supersampled canvases)."""
    a = math.radians(spec.angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = (_UNIT_OUTLINES[spec.shape] @ rot.T) * spec.radius + (spec.cx, spec.cy)
    return [(float(x), float(y)) for x, y in pts * scale]


def _supersample(image_size: int) -> int:
    # 4x antialiasing at the default size; less for big images, where drawing cost grows quadratically.
    return 4 if image_size <= 128 else 2 if image_size <= 256 else 1


def render_alpha(spec: ShapeSpec, image_size: int) -> np.ndarray:
    """Antialiased coverage of the foreground shape, float32 (H, W) in [0, 1]; exactly what is composited."""
    image_size = _check_size(image_size)
    ss = _supersample(image_size)
    canvas = Image.new("L", (image_size * ss, image_size * ss), 0)
    ImageDraw.Draw(canvas).polygon(shape_vertices(spec, ss), fill=255)
    if ss > 1:
        canvas = canvas.reduce(ss)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def render_mask(spec: ShapeSpec, image_size: int, threshold: float = 0.5) -> np.ndarray:
    """Boolean (H, W) mask of pixels whose shape coverage is at least ``threshold``."""
    return render_alpha(spec, image_size) >= threshold


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """Low-contrast tinted gradient plus smooth texture, float32 (s, s, 3) in 0..255."""
    base = rng.uniform(70.0, 180.0)
    tint = rng.uniform(-8.0, 8.0, size=3)  # near-grey: never mistakable for a saturated colour class
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    theta = rng.uniform(0.0, 2 * math.pi)
    grad = (xx * math.cos(theta) + yy * math.sin(theta)) * rng.uniform(10.0, 40.0)
    cells = int(rng.integers(3, 9))
    coarse = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((s, s), Image.Resampling.BICUBIC))
    lum = base + grad + texture * rng.uniform(3.0, 10.0)
    return np.clip(lum[..., None] + tint, 0.0, 255.0).astype(np.float32)


def _draw_distractors(rng: np.random.Generator, s: int, bg_level: float) -> tuple[np.ndarray, np.ndarray]:
    """A few muted grey strokes and blobs: (premultiplied rgb (s, s, 3), alpha (s, s)) as float32."""
    ss = _supersample(s)
    rgb = Image.new("RGB", (s * ss, s * ss), (0, 0, 0))
    alpha = Image.new("L", (s * ss, s * ss), 0)
    d_rgb, d_a = ImageDraw.Draw(rgb), ImageDraw.Draw(alpha)
    for _ in range(int(rng.integers(2, 6))):
        offset = rng.uniform(25.0, 60.0) * (1 if rng.random() < 0.5 else -1)
        if not 20.0 <= bg_level + offset <= 235.0:
            offset = -offset
        grey = np.clip(bg_level + offset + rng.uniform(-8.0, 8.0, size=3), 0, 255)
        color = tuple(int(c) for c in grey)
        if rng.random() < 0.55:  # stroke
            (x0, y0), (x1, y1) = rng.uniform(0, s, size=(2, 2)) * ss
            width = max(1, round(rng.uniform(0.015, 0.035) * s * ss))
            xy = [(float(x0), float(y0)), (float(x1), float(y1))]
            d_rgb.line(xy, fill=color, width=width)
            d_a.line(xy, fill=255, width=width)
        else:  # blob
            cx, cy = rng.uniform(0, s, size=2)
            rx, ry = rng.uniform(0.02, 0.06, size=2) * s
            box = [float((cx - rx) * ss), float((cy - ry) * ss), float((cx + rx) * ss), float((cy + ry) * ss)]
            d_rgb.ellipse(box, fill=color)
            d_a.ellipse(box, fill=255)
    if ss > 1:
        rgb, alpha = rgb.reduce(ss), alpha.reduce(ss)
    return np.asarray(rgb, dtype=np.float32), np.asarray(alpha, dtype=np.float32)[..., None] / 255.0


def render_example(seed: int, index: int, image_size: int) -> tuple[ShapeSpec, np.ndarray]:
    """Spec and uint8 RGB pixels (H, W, 3) of image ``index``; what ``generate_shapes`` writes."""
    spec = sample_spec(seed, index, image_size)
    rng = _seed_index(seed, index, _STREAM_PIXELS)
    s = image_size
    img = _background(rng, s)
    d_rgb, d_alpha = _draw_distractors(rng, s, float(img.mean()))
    img = img * (1.0 - d_alpha) + d_rgb  # distractors first, so the foreground occludes them
    fg_alpha = render_alpha(spec, s)[..., None]
    img = img * (1.0 - fg_alpha) + np.asarray(spec.rgb, dtype=np.float32) * fg_alpha
    img += rng.normal(0.0, rng.uniform(3.0, 9.0), size=img.shape).astype(np.float32)
    return spec, np.clip(np.rint(img), 0, 255).astype(np.uint8)


def shape_labels(spec: ShapeSpec) -> list[str]:
    """The manifest row's labels of the shapes dataset: its four tasks, in SHAPE_TASKS order."""
    return [getattr(spec, task) for task in SHAPE_TASKS]


Labeler = Callable[[ShapeSpec], list[str]]
"""spec -> the label cells of its manifest row (a module-level function: it goes to worker processes)."""


def _write_images(args: tuple[Path, int, int, int, int, int, Labeler]) -> list[list[str]]:
    """Render and save images start..end-1 (in a worker process); their manifest rows."""
    out_dir, start, end, image_size, seed, width, labeler = args
    rows = []
    for i in range(start, end):
        spec, pixels = render_example(seed, i, image_size)
        rel = f"images/{i:0{width}d}.png"
        Image.fromarray(pixels, mode="RGB").save(out_dir / rel, format="PNG", compress_level=1)
        rows.append([rel, *labeler(spec)])
    return rows


Mapper = Callable[[Callable[[tuple], list[list[str]]], Iterable[tuple], int], Iterable[list[list[str]]]]
"""mapper(fn, chunks, num_images) -> fn(chunk) for each chunk, in order (e.g. over a process pool)."""


def generate_shapes(
    out_dir: Path, num_images: int = 6000, image_size: int = 64, seed: int = 0, mapper: Mapper | None = None,
    *, columns: Sequence[str] = tuple(SHAPE_TASKS), labeler: Labeler = shape_labels,
) -> Path:
    """Write ``out_dir/images/<id>.png`` and ``out_dir/labels.csv`` (path + one column per task).

    Deterministic: the same (num_images, image_size, seed) gives a byte-identical CSV and identical
    pixels, and image ``i`` does not depend on ``num_images``, nor on how ``mapper`` spreads the chunks of
    images (the ingest stage passes its process pool; None renders them in this process). Returns the
    CSV path. `columns` and `labeler` give the label columns another dataset of the same images
    writes (`attributes.generate_shape_attributes`).
    """
    num_images = operator.index(num_images)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    image_size, seed = _check_size(image_size), _check_seed(seed)

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(num_images - 1)))
    step = max(16, min(256, -(-num_images // 32)))  # about 32 chunks of work, for a mapper's pool
    chunks = ((out_dir, a, min(a + step, num_images), image_size, seed, width, labeler) for a in range(0, num_images, step))
    if mapper is None:
        mapper = lambda fn, items, total: map(fn, items)  # noqa: E731
    # Write-then-rename so an interrupted run never leaves a truncated manifest behind.
    csv_path = out_dir / "labels.csv"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["path", *columns])
            for rows in mapper(_write_images, chunks, num_images):
                writer.writerows(rows)
    except BaseException:  # a full disk, a stop: no half-written temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, csv_path)
    return csv_path
