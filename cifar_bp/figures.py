"""The pictures TensorBoard shows beside the curves: gradient flow, confusion matrix, inputs.

Each function returns a matplotlib `Figure` drawn on the Agg canvas (no display, no pyplot
state); `render` turns one into the HWC uint8 array `SummaryWriter.add_image` takes.
matplotlib is imported here only, so the CLI starts without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def render(fig: Figure) -> np.ndarray:
    """The figure's pixels as an H×W×3 uint8 array."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())  # type: ignore[attr-defined]
    return np.ascontiguousarray(rgba[..., :3])


def short_name(param: str) -> str:
    """`model1.conv1.weight` reads `conv1.weight` on a crowded axis."""
    return param.removeprefix("model1.")


def gradient_flow(
    names: Sequence[str], mean_abs: Sequence[float], max_abs: Sequence[float], title: str
) -> Figure:
    """Mean and max |grad| per parameter, input to output, on a log axis: a vanishing
    gradient falls to the left, an exploding one climbs off the top."""
    fig = new_figure(8, 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    means, maxes = np.asarray(mean_abs, dtype=float), np.asarray(max_abs, dtype=float)
    positive = np.concatenate([means[means > 0], maxes[maxes > 0]])
    # A gradient of exactly 0 has no place on a log axis: mark it a decade below the rest.
    floor = positive.min() / 10 if positive.size else 1e-12
    ax.vlines(x, np.maximum(means, floor), np.maximum(maxes, floor), colors="0.8", linewidth=6)
    ax.plot(x, np.where(maxes > 0, maxes, np.nan), "v", color="tab:red", label="max |g|")
    ax.plot(x, np.where(means > 0, means, np.nan), "o-", color="tab:blue", label="mean |g|")
    zero = means <= 0
    if zero.any():
        ax.plot(x[zero], np.full(zero.sum(), floor), "x", color="black", ms=9, label="all zero")
    ax.set_yscale("log")
    ax.set_xticks(x, [short_name(n) for n in names], rotation=35, ha="right")
    ax.set_xlabel("parameter (input → output)")
    ax.set_ylabel("|gradient|")
    ax.set_title(title)
    ax.grid(True, which="major", axis="y", alpha=0.4)
    ax.legend(loc="best")
    return fig


def shown_indices(
    matrix: Sequence[Sequence[int]], classes: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Rows: the data's classes. Columns: those, then any further network output that was
    predicted (a folder of 3 classes still has a 10-output network). Plain Python: the
    terminal table uses it too."""
    true_used = [i for i, row in enumerate(matrix) if any(row)]
    rows = list(range(max(len(classes), max(true_used, default=-1) + 1)))
    predicted = [j for j in range(len(matrix[0]) if matrix else 0) if any(r[j] for r in matrix)]
    return rows, rows + [j for j in predicted if j >= len(rows)]


def label_of(index: int, classes: Sequence[str]) -> str:
    return classes[index] if index < len(classes) else f"output {index}"


def confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> Figure:
    """Counts, true class down, prediction across; colour is the share of the true class."""
    full = np.asarray(matrix, dtype=np.int64)
    rows, cols = shown_indices(matrix, classes)
    counts = full[np.ix_(rows, cols)]
    share = counts / np.maximum(full[rows].sum(1, keepdims=True), 1)
    fig = new_figure(max(4.5, 1.8 + 0.62 * len(cols)), max(3.5, 1.4 + 0.55 * len(rows)))
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(counts):
        if count:
            colour = "white" if share[row, col] > 0.5 else "black"
            ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(len(cols)), [label_of(c, classes) for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [label_of(r, classes) for r in rows])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(full.sum())
    accuracy = np.trace(full) / total if total else 0.0
    ax.set_title(f"{title}: accuracy {accuracy:.4f} ({total} images)")
    return fig


def image_grid(
    images: np.ndarray, labels: Sequence[int], classes: Sequence[str], title: str, cols: int = 8
) -> Figure:
    """N×H×W×3 pixels in [0, 1] tiled into one picture, each tile labelled with its class.

    One axes with one tiled image: 32 separate subplots take seconds to draw on a CPU.
    """
    n, side = len(images), images.shape[1]
    # Tiles 2 pixels apart across, with room for a label above each.
    rows, width, height = max(1, -(-n // cols)), side + 2, side + 9
    tiled = np.ones((rows * height, cols * width, 3))
    for i, image in enumerate(np.clip(images, 0, 1)):
        top, left = (i // cols) * height + 8, (i % cols) * width + 1
        tiled[top : top + side, left : left + side] = image
    fig = new_figure(1.3 * cols, 1.6 * rows + 0.5)
    ax = fig.add_subplot()
    ax.imshow(tiled, interpolation="nearest")
    for i, label in enumerate(labels):
        name = classes[label] if 0 <= label < len(classes) else str(label)
        x, y = (i % cols) * width + width / 2, (i // cols) * height + 7
        ax.text(x, y, name, ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.axis("off")
    return fig
