"""Built-in datasets, generated deterministically from a seed (never downloaded).

Each generator writes image files plus a CSV manifest (`path` + one column per task) into a folder,
so a built-in dataset goes through exactly the same ingest path as a user's data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mtl_core.data.builtin.attributes import generate_shape_attributes
from mtl_core.data.builtin.shapes import generate_shapes

# name -> generator(out_dir, num_images, image_size, seed, mapper=None) -> path of the written manifest CSV;
# mapper(fn, chunks, num_images) runs fn on each chunk of images, in order (the ingest stage: a process pool)
BuiltinGenerator = Callable[..., Path]

BUILTIN_DATASETS: dict[str, BuiltinGenerator] = {
    "shapes": generate_shapes,  # 4 tasks with 3-6 classes
    "shape_attributes": generate_shape_attributes,  # the same images, 40 yes/no attributes
}
