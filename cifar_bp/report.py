"""What the terminal shows: a rich progress bar on a TTY, plain lines otherwise, or nothing.

Errors always go to stderr as one line (see `cli.app.ErrorMappingGroup`); everything here
goes to stdout.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# markup=False: what is printed holds paths, run names and class names, and a "[v2]" in one
# must print as written, not vanish as a style tag. Styles are given as styles, not markup.
console = Console(highlight=False, markup=False)
err_console = Console(stderr=True, highlight=False, markup=False)


class QuietReporter:
    def note(self, message: str) -> None:
        pass

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        pass

    def progress(self, done: int, loss: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


def silence_stdout() -> None:
    """Point file descriptor 1 at the null device, so no later write (ours, or Python's own
    flush at exit) meets the closed pipe again."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


class PlainReporter(QuietReporter):
    """One line per log point: readable in CI logs, files and `tee`."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.epoch, self.epochs, self.steps = 0, 0, 0

    def note(self, message: str) -> None:
        try:
            print(f"{self.prefix}{message}", flush=True)
        except BrokenPipeError:
            # `cifar-bp train | head -1`: the reader has gone, the run has not. Later output
            # goes nowhere and training goes on to its checkpoints (Ctrl-C still stops it).
            silence_stdout()

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        if done:
            self.note(f"epoch {epoch}/{epochs}: resuming at step {done}/{steps}")

    def progress(self, done: int, loss: float, images_per_s: float) -> None:
        rate = f"  {images_per_s:,.0f} img/s" if images_per_s > 0 else ""
        self.note(
            f"epoch {self.epoch}/{self.epochs} step {done}/{self.steps}  loss {loss:.4f}{rate}"
        )

    def epoch_end(self, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("seconds"))
        self.note(f"epoch {epoch}/{self.epochs} done in {seconds:.1f}s  {shown}")


class RichReporter(PlainReporter):
    """A live progress bar per epoch with step, loss, images/s and ETA."""

    def __init__(self, prefix: str = "") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        super().__init__(prefix)
        self.bar = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} img/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task: Any = None
        self.bar.start()

    def note(self, message: str) -> None:
        self.bar.console.print(f"{self.prefix}{message}")

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        super().epoch_start(epoch, epochs, steps, 0)
        self.task = self.bar.add_task(
            f"{self.prefix}epoch {epoch}/{epochs}", total=steps, completed=done, loss="-", rate="-"
        )

    def progress(self, done: int, loss: float, images_per_s: float) -> None:
        rate = f"{images_per_s:,.0f}" if images_per_s > 0 else "-"
        self.bar.update(self.task, completed=done, loss=f"{loss:.4f}", rate=rate)

    def epoch_end(self, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        self.bar.update(self.task, completed=self.steps)
        super().epoch_end(epoch, metrics, seconds)

    def close(self) -> None:
        self.bar.stop()


class NotesReporter(QuietReporter):
    """--quiet: no progress, but still the notes that explain the figures (such as which
    split was evaluated) or a change of plan (such as a cache that was decoded again)."""

    def note(self, message: str) -> None:
        print(message, flush=True)


def make_reporter(quiet: bool, prefix: str = "", main: bool = True) -> QuietReporter:
    """What one process shows; ranks other than the main one under torchrun show nothing."""
    if not main:
        return QuietReporter()
    if quiet:
        return NotesReporter()
    if sys.stdout.isatty():
        return RichReporter(prefix)
    return PlainReporter(prefix)


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    out = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*(fmt(cell) for cell in row))
    return out


def column_groups(needs: Sequence[int], keys: int, width: int) -> list[list[int]]:
    """The columns after the first `keys`, dealt left to right into groups that each fit in
    `width` beside the key columns, which every group repeats. `needs`: each column's width
    with its padding and border; the table's own last border is the 1 taken off."""
    groups: list[list[int]] = [[]]
    room, used = width - 1 - sum(needs[:keys]), 0
    for i in range(keys, len(needs)):
        if groups[-1] and used + needs[i] > room:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += needs[i]
    return groups


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}"
    return str(value)


def print_run_summary(result: Any, quiet: bool = False) -> None:
    """The end-of-run table: metrics, time, run directory and checkpoint."""
    rows: list[tuple[str, Any]] = [(k, v) for k, v in result.metrics.items()]
    rows += [("global step", result.global_step), ("train time", f"{result.seconds:.1f}s")]
    if result.stopped_by:
        rows.append(("stopped by", result.stopped_by))
    console.print(table("Run summary", ["", "value"], rows))
    # Paths as plain lines: a table column would cut them short on a narrow terminal.
    console.print(f"run directory: {result.run_dir}", soft_wrap=True)
    console.print(f"checkpoint:    {result.checkpoint}", soft_wrap=True)
    # The commands quote their paths, so a folder with a space still pastes into a shell.
    logdir = shlex.quote(str(result.run_dir.parent))
    console.print(f"TensorBoard:   tensorboard --logdir {logdir}", soft_wrap=True)
    if result.stopped_by and not result.completed:  # a complete run has nothing to resume
        launcher = "cifar-bp"
        if result.world_size > 1:  # resume the same way it was launched
            launcher = f"torchrun --nproc_per_node={result.world_size} -m cifar_bp"
        where = shlex.quote(str(result.run_dir))
        console.print(f"resume with: {launcher} train --resume {where}", soft_wrap=True)


def print_evaluation(outcome: Any, as_json: bool) -> None:
    """Per split: loss and accuracy, a per-class table and the confusion table. Works for
    any number of classes up to the network's outputs (a folder may have 3)."""
    if as_json:
        import json

        print(json.dumps(outcome.as_dict(), indent=2))
        return
    console.print(outcome.scoring.describe())
    if getattr(outcome, "scored_folder", None) is not None:
        console.print(
            f"images: {outcome.scored_folder}, labelled by the run's class names", soft_wrap=True
        )
    for split, result in outcome.results.items():
        console.print(f"{split}: loss {result.loss:.4f}  accuracy {result.accuracy:.4f} "
                      f"({result.count} images)")  # fmt: skip
        console.print(_class_table(split, result.confusion, outcome.classes))
        console.print(f"{split} confusion matrix (rows: true class, columns: predicted)")
        console.print(_confusion_table(split, result.confusion, outcome.classes))


def _class_table(split: str, matrix: list[list[int]], classes: list[str]) -> Table:
    from cifar_bp.figures import label_of, shown_indices

    rows = []
    for i in shown_indices(matrix, classes)[0]:
        images = sum(matrix[i])
        accuracy = f"{matrix[i][i] / images:.4f}" if images else "-"
        rows.append((label_of(i, classes), images, matrix[i][i], accuracy))
    return table(f"{split} accuracy per class", ["class", "images", "correct", "accuracy"], rows)


def _confusion_table(split: str, matrix: list[list[int]], classes: list[str]) -> Table:
    """Counts, true class down, prediction across; the diagonal (correct) in bold. No
    vertical rules and five-letter headers: ten classes fit an 80-column terminal."""
    from rich import box

    from cifar_bp.figures import label_of, shown_indices

    rows, cols = shown_indices(matrix, classes)
    out = Table(box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    out.add_column("true", no_wrap=True)
    for j in cols:  # #j: a network output that is none of this data's classes
        out.add_column(classes[j][:5] if j < len(classes) else f"#{j}", justify="right")
    for i in rows:
        cells = [Text(str(matrix[i][j]), style="bold") if i == j else str(matrix[i][j] or ".")
                 for j in cols]  # fmt: skip
        out.add_row(label_of(i, classes), *cells)
    return out
