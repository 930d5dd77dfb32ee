"""What `inspect-grads --logdir` writes: one TensorBoard sub-run per loss, the table's numbers
as scalars and every gradient's values as a histogram, in a folder made before the
inspection runs, so that a folder that cannot be made is one line up front."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from cifar_bp.errors import CliError
from cifar_bp.grads import Inspection, Pass


@contextlib.contextmanager
def tensorboard_dir(logdir: Path | None) -> Iterator[Path | None]:
    """The --logdir folder for this inspection, created before the inspection runs: a
    folder that cannot be created is one line up front, not a traceback after all the
    tables. Removed again if the inspection fails while it is still empty."""
    if logdir is None:
        yield None
        return
    from cifar_bp.compare import plan_parent
    from cifar_bp.rundir import check_logdir

    check_logdir(logdir)
    parent = plan_parent(logdir, "inspect", None)
    try:
        parent.mkdir(parents=True)
    except OSError as err:
        raise CliError(f"cannot create {parent} (--logdir): {err.strerror or err}") from None
    try:
        yield parent
    except BaseException:
        with contextlib.suppress(OSError):
            parent.rmdir()  # only if empty: what was written stays
        raise


def write_tensorboard(inspection: Inspection, parent: Path) -> None:
    """One sub-run per loss under `parent` (from `tensorboard_dir`), so TensorBoard overlays
    them: the table's numbers as scalars and every gradient's values as a histogram. A full
    disk or a folder that cannot be written is one line (exit 1)."""
    try:
        with quiet_writer_threads():
            for p in inspection.passes:
                write_pass(p, parent / f"{p.loss}-{p.reduction}")
    except OSError as err:
        shutil.rmtree(parent, ignore_errors=True)  # this inspection's own, and half-written
        raise CliError(
            f"cannot write TensorBoard events in {parent} (--logdir): {err.strerror or err}; "
            "nothing was kept"
        ) from None


def write_pass(p: Pass, where: Path) -> None:
    from cifar_bp.tracking import Tracker

    tracker = Tracker(where)
    try:
        scalars = {f"grad_norm/{s.name}": s.norm for s in p.after}
        scalars |= {f"grad_to_weight/{s.name}": s.grad_to_weight for s in p.after}
        scalars["grad_norm/total"] = p.total_norm
        if p.loss_value is not None:
            scalars["loss"] = p.loss_value
        tracker.scalars(scalars, 0)
        assert tracker.writer is not None
        for name, grad in p.grads.items():
            tracker.writer.add_histogram(f"grads/{name}", grad.float().cpu(), 0)
        tracker.writer.flush()  # a write that failed in the writer's thread is raised here
    finally:
        tracker.close()  # joins the writer's thread


@contextlib.contextmanager
def quiet_writer_threads() -> Iterator[None]:
    """On a full disk TensorBoard's writer thread dies printing its traceback, and the main
    thread raises the same error, reported in one line: keep the thread's copy quiet."""
    previous, before = threading.excepthook, set(threading.enumerate())
    threading.excepthook = lambda args: (
        None if issubclass(args.exc_type, OSError) else previous(args)
    )
    try:
        yield
    finally:
        for thread in set(threading.enumerate()) - before:  # a dying writer reports last
            thread.join(timeout=2)
        threading.excepthook = previous
