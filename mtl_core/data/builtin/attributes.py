"""Built-in "shape_attributes" dataset: the shapes images with 40 yes/no attributes instead of 4 tasks.

Why: users with face attributes (CelebA's 40), product tags or lists of findings have tens of binary,
imbalanced label columns. This dataset shows that case without a user CSV: the same images as
`builtin:shapes` (same seed, same pixels), each labelled with 40 attributes derived from its four
factors, with positive rates from 3.3 % to 50 %:

* 18 one-vs-rest attributes, one per class of each factor (`is_circle`, `is_red`, `is_small`,
  `at_top_left`, ...): 16.7-33 %;
* 2 halves of the image (`in_top_half`, `in_left_half`): 50 %;
* 10 conjunctions of two factors (`triangle_and_yellow`, `red_and_top_left`, ...): 3.3-8.3 %, where a
  model that always answers "no" scores 92-97 % accuracy;
* 10 disjunctions (`circle_or_magenta`, `large_or_bottom_right`, ...): 33-50 %.

The attributes are related by construction (`is_red`, `red_and_top_left`, `triangle_or_red` share the
colour), so task groupings and clustered relation heatmaps have structure to find. Values are "no" and
"yes" (so "yes" is class 1, the positive class of AUROC and average precision).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mtl_core.data.builtin.shapes import SHAPE_TASKS, Mapper, ShapeSpec, generate_shapes

Predicate = Callable[[dict[str, str]], bool]


def _is(factor: str, value: str) -> Predicate:
    return lambda labels: labels[factor] == value


def _factor_of(value: str) -> str:
    (factor,) = [f for f, values in SHAPE_TASKS.items() if value in values]
    return factor


def _both(a: str, b: str) -> Predicate:
    fa, fb = _factor_of(a), _factor_of(b)
    return lambda labels: labels[fa] == a and labels[fb] == b


def _either(a: str, b: str) -> Predicate:
    fa, fb = _factor_of(a), _factor_of(b)
    return lambda labels: labels[fa] == a or labels[fb] == b


_ONE_VS_REST: dict[str, Predicate] = {
    **{f"is_{v}": _is(f, v) for f in ("shape", "color", "size") for v in SHAPE_TASKS[f]},
    **{f"at_{v}": _is("position", v) for v in SHAPE_TASKS["position"]},
}
_HALVES: dict[str, Predicate] = {
    "in_top_half": lambda labels: labels["position"].startswith("top"),
    "in_left_half": lambda labels: labels["position"].endswith("left"),
}
_CONJUNCTIONS = [
    ("triangle", "yellow"), ("circle", "blue"), ("square", "magenta"), ("star", "green"), ("cross", "cyan"),
    ("red", "top_left"), ("blue", "bottom_right"), ("large", "top_right"), ("small", "bottom_left"), ("star", "large"),
]  # fmt: skip
_DISJUNCTIONS = [
    ("circle", "magenta"), ("square", "cyan"), ("triangle", "red"), ("star", "blue"), ("cross", "green"),
    ("yellow", "small"), ("large", "bottom_right"), ("green", "top_left"), ("circle", "small"), ("triangle", "star"),
]  # fmt: skip

ATTRIBUTES: dict[str, Predicate] = {
    **_ONE_VS_REST,
    **_HALVES,
    **{f"{a}_and_{b}": _both(a, b) for a, b in _CONJUNCTIONS},
    **{f"{a}_or_{b}": _either(a, b) for a, b in _DISJUNCTIONS},
}
"""Attribute name -> whether an image with these four labels has it, in manifest column order."""


def attribute_labels(spec: ShapeSpec) -> list[str]:
    """The manifest row's labels: "yes" or "no" for each attribute, in ATTRIBUTES order."""
    labels = spec.labels
    return ["yes" if has(labels) else "no" for has in ATTRIBUTES.values()]


def generate_shape_attributes(
    out_dir: Path, num_images: int = 6000, image_size: int = 64, seed: int = 0, mapper: Mapper | None = None
) -> Path:
    """Write the shapes images and `labels.csv` with one yes/no column per attribute; the manifest's path."""
    return generate_shapes(out_dir, num_images, image_size, seed, mapper, columns=list(ATTRIBUTES), labeler=attribute_labels)
