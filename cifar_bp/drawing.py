"""Figures for TensorBoard, drawn where they do not hold up training.

A confusion matrix and a gradient-flow chart take about half a second of CPU per epoch to
draw (matplotlib's Agg). Training on a CPU already uses every core, so there they are drawn
in place (about 4% of a 13-s epoch on 2 cores). On an H200 a whole 50,000-image epoch with
its evaluation took 1.0 s, 0.44 s of it outside the steps, about what the drawing costs on
this project's CPUs (0.4-0.55 s). Training there is bound by the
Python thread that launches the kernels (a step of batch 2048 took about as long as one of
512), so a second thread would only take turns with it: a helper process draws the figures,
one at a time, and hands back PNG bytes. The run's own SummaryWriter writes those into its
own event file (a second event file in the run's folder would stop TensorBoard's live
updates of the first).
"""

from __future__ import annotations

import io
import multiprocessing
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any


@dataclass
class Picture:
    """One drawn figure, PNG-encoded, for one tag at one step."""

    tag: str
    step: int
    png: bytes
    height: int
    width: int


def draw(kind: str, args: tuple[Any, ...]) -> tuple[bytes, int, int]:
    """`figures.<kind>(*args)` as PNG bytes and the picture's height and width."""
    from PIL import Image

    from cifar_bp import figures

    pixels = figures.render(getattr(figures, kind)(*args))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), pixels.shape[0], pixels.shape[1]


def _ignore_interrupts() -> None:
    # Ctrl-C is the training process's to handle; the helper finishes what it was given,
    # so an interrupted run still gets the figures it asked for before the interrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Drawer:
    """Draws figures in place, or in one helper process (`background`)."""

    def __init__(self, background: bool) -> None:
        self.background = background
        self.pool: ProcessPoolExecutor | None = None
        self.pending: list[tuple[str, int, str, tuple[Any, ...], Future]] = []

    def submit(self, tag: str, step: int, kind: str, *args: Any) -> None:
        future: Future = Future()
        if self.background:
            try:
                future = self._pool().submit(draw, kind, args)
            except (OSError, RuntimeError):  # no helper process here: draw in place
                self.background = False
        if not self.background:
            future.set_result(draw(kind, args))
        self.pending.append((tag, step, kind, args, future))

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            # spawn: a fork of a process holding CUDA state is not safe to use.
            context = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(1, context, initializer=_ignore_interrupts)
        return self.pool

    def finished(self, wait: bool = False) -> Iterator[Picture]:
        """The pictures drawn so far, in the order asked for (all of them with `wait`)."""
        while self.pending and (wait or self.pending[0][4].done()):
            tag, step, kind, args, future = self.pending.pop(0)
            try:
                png, height, width = future.result()
            except BrokenProcessPool:  # the helper died: draw this one here
                png, height, width = draw(kind, args)
            yield Picture(tag, step, png, height, width)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
