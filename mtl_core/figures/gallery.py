"""Images as figures: a grid of captioned tiles (error galleries, suspected label problems), a reliability
diagram per task, and Grad-CAM heat maps over images (a row per image, a column per task)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TILE_INCHES = 1.6
MAX_COLUMNS = 8


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def tile_grid_figure(
    sections: Sequence[tuple[str, np.ndarray, Sequence[str]]], title: str, empty_note: str = "none"
) -> Figure:
    """One block per section (its heading, images (n, H, W, 3) uint8, a caption per image), tiles in rows
    of at most MAX_COLUMNS; a section without images reads `empty_note`."""
    columns = max([min(len(images), MAX_COLUMNS) for _, images, _ in sections] + [1])
    rows = [max(1, math.ceil(len(images) / MAX_COLUMNS)) for _, images, _ in sections]
    height = sum(rows) * (TILE_INCHES + 0.75) + 0.6
    fig = _figure(max(columns * TILE_INCHES, 4.0), height)
    grid = fig.add_gridspec(sum(rows), columns, hspace=0.5, wspace=0.1, top=1 - 0.55 / height, bottom=0.25 / height, left=0.02, right=0.98)
    fig.suptitle(title, fontsize=10)
    row = 0
    for (heading, images, captions), n_rows in zip(sections, rows):
        if len(images) == 0:
            ax = fig.add_subplot(grid[row, :])
            ax.axis("off")
            ax.set_title(heading, fontsize=9, loc="left")
            ax.text(0.0, 0.5, empty_note, fontsize=8, transform=ax.transAxes)
        for i, (image, caption) in enumerate(zip(images, captions)):
            ax = fig.add_subplot(grid[row + i // MAX_COLUMNS, i % MAX_COLUMNS])
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=6.5)
            if i == 0:
                ax.set_title(heading, fontsize=9, loc="left")
        row += n_rows
    return fig


def save_tile_grid(
    sections: Sequence[tuple[str, np.ndarray, Sequence[str]]], title: str, out: Path, empty_note: str = "none"
) -> None:
    tile_grid_figure(sections, title, empty_note).savefig(out, dpi=100)


def reliability_figure(tables: Mapping[str, Mapping[str, Mapping[str, object]]], title: str) -> Figure:
    """A panel per task: accuracy against confidence per bin (mtl_core/calibration.py `Reliability.as_dict`)
    for the raw (`raw`) and the calibrated (`calibrated`) probabilities, the diagonal a perfectly
    calibrated model follows, and both ECEs in the panel's title."""
    tasks = list(tables)
    cols = min(len(tasks), 4) or 1
    rows = max(1, math.ceil(len(tasks) / cols))
    fig = _figure(cols * 2.8, rows * 2.8 + 0.4)
    fig.suptitle(title, fontsize=10)
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, linestyle="--")
        for kind, colour in (("raw", "tab:red"), ("calibrated", "tab:blue")):
            table = tables[task][kind]
            conf = np.array([np.nan if v is None else v for v in table["confidence"]], dtype=float)
            acc = np.array([np.nan if v is None else v for v in table["accuracy"]], dtype=float)
            seen = np.isfinite(conf)
            ax.plot(conf[seen], acc[seen], marker="o", markersize=3, color=colour, linewidth=1, label=f"{kind} (ECE {table['ece']:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def cam_grid_figure(images: np.ndarray, cams: Mapping[str, np.ndarray], captions: Mapping[str, Sequence[str]], title: str) -> Figure:
    """A row per image: the image, then its Grad-CAM heat map over it for each task (`cams[task]`: (n, H, W)
    in [0, 1]), captioned with the task's answer (`captions[task][i]`)."""
    tasks = list(cams)
    n = len(images)
    fig = _figure((len(tasks) + 1) * TILE_INCHES, max(n, 1) * (TILE_INCHES + 0.35) + 0.5)
    fig.suptitle(title, fontsize=10)
    for i in range(n):
        ax = fig.add_subplot(n, len(tasks) + 1, i * (len(tasks) + 1) + 1)
        ax.imshow(images[i])
        ax.axis("off")
        if i == 0:
            ax.set_title("image", fontsize=8)
        for j, task in enumerate(tasks):
            ax = fig.add_subplot(n, len(tasks) + 1, i * (len(tasks) + 1) + j + 2)
            ax.imshow(images[i])
            ax.imshow(cams[task][i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(captions[task][i], fontsize=6.5)
            if i == 0:
                ax.set_title(task, fontsize=8)
    return fig
