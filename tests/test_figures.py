"""The report figures: a task keeps its colour across train and val curves; an n/a cell says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from mtl_core.figures.curves import grid_shape, plot_training_curves, training_curves_figure
from mtl_core.evaluation.task_relations import error_correlation, error_correlation_gaps
from mtl_core.figures.task_matrix import task_matrix_figure
from mtl_core.tasks import MISSING_LABEL

TASKS = ["shape", "color", "size", "position"]


def _history(epochs: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    data = {"epoch": range(1, epochs + 1)}
    for split in ("train", "val"):
        for t in TASKS:
            data[f"{split}/{t}/loss"] = rng.random(epochs)
            data[f"{split}/{t}/accuracy"] = rng.random(epochs)
    return pd.DataFrame(data)


def test_one_panel_per_task_with_one_colour_for_its_train_and_val_curves(tmp_path: Path):
    fig = training_curves_figure(_history(), TASKS)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == TASKS  # one panel per task, in order
    colours = set()
    for ax, task in zip(panels, TASKS, strict=True):
        twin = [o for o in fig.axes if o is not ax and o.bbox.bounds == ax.bbox.bounds]  # the loss axis
        lines = {line.get_label(): line for a in (ax, *twin) for line in a.get_lines()}
        assert set(lines) == {f"{task} ({s})" for s in ("train", "val")} | {f"{task} loss ({s})" for s in ("train", "val")}
        task_colours = {to_hex(line.get_color()) for line in lines.values()}
        assert len(task_colours) == 1, task_colours  # train and val, loss and accuracy alike
        colours |= task_colours
        assert lines[f"{task} (train)"].get_linestyle() == "--" and lines[f"{task} (val)"].get_linestyle() == "-"
        assert list(lines[f"{task} (val)"].get_ydata()) == list(_history()[f"val/{task}/accuracy"])
    assert len(colours) == len(TASKS)  # tasks apart
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["train", "val", "loss (right axis)"]  # the line style once, no task legend
    plot_training_curves(_history(), TASKS, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_forty_tasks_fill_a_grid_of_small_panels_of_a_readable_size():
    tasks = [f"attr_{i:02d}" for i in range(40)]
    assert grid_shape(40) == (7, 6) and grid_shape(4) == (2, 2) and grid_shape(1) == (1, 1) and grid_shape(7) == (3, 3)
    rng = np.random.default_rng(0)
    history = pd.DataFrame({"epoch": [1, 2], **{f"{s}/{t}/{m}": rng.random(2) for s in ("train", "val") for t in tasks for m in ("loss", "accuracy")}})
    fig = training_curves_figure(history, tasks)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()] == tasks
    width, height = fig.get_size_inches()
    assert width <= 14 and height <= 15  # 1,380 x 1,400 px at the saved 100 dpi
    assert sum(not ax.get_visible() for ax in fig.axes) == 2  # the grid's two spare cells are hidden


def _texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.texts)


def test_an_na_cell_of_the_error_correlation_says_why():
    """`color` makes no error and `size` has one labelled test image: their cells are n/a, and the
    figure says so under the matrix; a matrix without n/a has no such note."""
    n = 12
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, (n, len(TASKS)))
    targets[1:, 2] = MISSING_LABEL  # size: one labelled image
    probs = {t: rng.random((n, 3)) for t in TASKS}
    probs["color"][np.arange(n), targets[:, 1]] = 9.0  # every color answer right
    for t in ("shape", "position"):  # some right, some wrong
        k = TASKS.index(t)
        probs[t][: n // 2][np.arange(n // 2), targets[: n // 2, k]] = 9.0
        probs[t][n // 2 :][np.arange(n - n // 2), (targets[n // 2 :, k] + 1) % 3] = 9.0

    matrix = error_correlation(probs, targets, TASKS)
    assert np.isnan(matrix[1]).all() and np.isnan(matrix[2]).all() and not np.isnan(matrix[0, 3])
    gaps = error_correlation_gaps(probs, targets, TASKS)
    assert gaps == ["color: no error on its 12 test images", "size: 1 labelled test image"]
    fig = task_matrix_figure(matrix, TASKS, "errors", na_note=["a correlation needs errors that vary", *gaps])
    note = _texts(fig)
    assert note.startswith("n/a: a correlation needs errors that vary") and all(g in note for g in gaps)
    assert sum(t.get_text() == "n/a" for t in fig.axes[0].texts) == int(np.isnan(matrix).sum())

    assert "n/a" in _texts(task_matrix_figure(np.full((2, 2), np.nan), ["a", "b"], "not measured"))  # a default why
    assert _texts(task_matrix_figure(np.eye(2), ["a", "b"], "all measured")) == ""


def test_a_forty_task_heatmap_is_capped_in_size_without_cell_numbers():
    from mtl_core.figures.task_matrix import ANNOTATE_MAX_TASKS, MAX_MATRIX_INCHES

    tasks = [f"attr_{i:02d}" for i in range(40)]
    rng = np.random.default_rng(0)
    m = np.clip(rng.normal(0, 0.4, (40, 40)), -1, 1)
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    m[3, 5] = m[5, 3] = np.nan
    fig = task_matrix_figure(m, tasks, "forty")
    width, height = fig.get_size_inches()
    assert width <= MAX_MATRIX_INCHES + 4 and height <= MAX_MATRIX_INCHES + 4  # not 1.1 in a cell: 46 in
    assert len(fig.axes[0].texts) == 0  # no numbers in 1,600 cells
    assert "grey, n/a" in _texts(fig) and "hierarchical clustering" in _texts(fig)
    small = task_matrix_figure(m[:4, :4], tasks[:4], "four")
    assert len(small.axes[0].texts) == 16 and ANNOTATE_MAX_TASKS >= 4  # a few tasks keep their numbers


def test_the_confusion_grid_has_one_panel_per_task_coloured_by_row_share(tmp_path: Path):
    """Forty two-class tasks in one figure of small multiples; a cell's colour is its share of the true
    class, its text the count: a head that always answers "no" on 90 no / 10 yes reads 1.0 and 0.0."""
    from mtl_core.figures.confusion import confusion_grid_figure, plot_confusion_grid, row_shares

    tasks = [f"attr_{i:02d}" for i in range(40)]
    confusions = {t: np.array([[90, 0], [10, 0]]) if i == 0 else np.array([[40, 10], [5, 45]]) for i, t in enumerate(tasks)}
    classes = {t: ["no", "yes"] for t in tasks}
    assert row_shares(np.array([[90, 0], [10, 0]])).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert row_shares(np.array([[0, 0], [1, 3]])).tolist() == [[0.0, 0.0], [0.25, 0.75]]  # empty row: 0
    fig = confusion_grid_figure(confusions, classes)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == tasks
    assert [t.get_text() for t in panels[0].texts] == ["90", "0", "10", "0"]
    assert np.allclose(panels[0].images[0].get_array(), [[1.0, 0.0], [1.0, 0.0]])
    width, height = fig.get_size_inches()
    assert width <= 12.5 and height <= 11  # 7 columns x 6 rows of ~1.57-inch panels
    plot_confusion_grid(confusions, classes, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_a_few_tasks_get_large_panels_whole_class_names_and_a_title_that_fits(tmp_path: Path):
    """The built-in dataset's four tasks: panels of 2.8 inches, not 1.55; `bottom_left` and `bottom_right`
    written out (they were both "bottom"), a long name cut with an ellipsis; the title inside the figure."""
    from PIL import Image

    from mtl_core.figures.confusion import confusion_grid_figure, plot_confusion_grid

    classes = {"shape": ["circle", "square"], "position": ["bottom_left", "bottom_right", "a_very_long_class_name"]}
    confusions = {"shape": np.array([[3, 1], [0, 4]]), "position": np.eye(3, dtype=int) * 5}
    fig = confusion_grid_figure(confusions, classes)
    assert fig.get_size_inches()[0] >= 2 * 2.8
    position = next(ax for ax in fig.axes if ax.get_title() == "position")
    assert [t.get_text() for t in position.get_yticklabels()] == ["bottom_left", "bottom_right", "a_very_long_c…"]
    plot_confusion_grid(confusions, classes, tmp_path / "grid.png")
    fig.canvas.draw()
    title = fig.get_suptitle() and fig._suptitle.get_window_extent()
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width  # not clipped at the sides
    with Image.open(tmp_path / "grid.png") as image:
        assert image.size[0] >= 600 and image.size[1] >= 350
