"""A training run, in the order it happens: `train` builds the run and loops over epochs;
`train_one_epoch` runs the steps; evaluation, logging and saving are one call away each.

The per-step work is `engine.train_step`. Between steps nothing waits for the device except
at log points (every `log.every_n_steps`), where the meters are read back once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from cifar_bp import checkpoint as ckpt
from cifar_bp.config import Config
from cifar_bp.data import DeviceLoader, Split
from cifar_bp.engine import evaluate, train_step
from cifar_bp.errors import Diverged
from cifar_bp.resume import Start
from cifar_bp.run import Run
from cifar_bp.setup import build_run
from cifar_bp.signals import StopRequest

SUMMED = ("loss_sum", "steps", "seen", "correct", "image_loss_sum", "loss_images")  # over ranks


class Reporter(Protocol):
    """What the terminal is told; the CLI supplies rich, plain or quiet implementations."""

    def note(self, message: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...
    def progress(self, done: int, loss: float, images_per_s: float) -> None: ...
    def epoch_end(self, epoch: int, metrics: dict[str, float], seconds: float) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    stopped_by: str | None = None  # "SIGINT"/"SIGTERM" when interrupted
    global_step: int = 0
    world_size: int = 1
    final_loss: float | None = None  # train loss of the last logged window
    final_loss_per_image: float | None = None  # the same summed per image (mean or sum alike)
    grad_norm_means: dict[str, float] = field(default_factory=dict)
    completed: bool = False  # stopped by a signal, but only after the last epoch was saved


@dataclass
class Window:
    """What the loop accumulates between log points (host side)."""

    started: float = field(default_factory=time.perf_counter)
    images: int = 0
    final_loss: float | None = None
    final_loss_per_image: float | None = None
    norm_sums: torch.Tensor | None = None  # per-parameter ‖g‖ summed over log points
    norm_count: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # of the last completed epoch


def train(
    cfg: Config, reporter: Reporter, start: Start | None = None, force: bool = False
) -> RunResult:
    """Build the run, then: for each epoch, train, evaluate, log and checkpoint."""
    run = build_run(cfg, start or Start(cfg), force)
    resolved = run.hardware.apply(cfg)  # `auto` as resolved, for what TensorBoard shows
    try:
        with run.lock, StopRequest(run.world) as stop:
            for note in run.data.notes:
                reporter.note(note)
            if not run.resumed:
                start_tensorboard(run, resolved)
            # In HParams from the start, so a run that diverges or is stopped is listed too.
            run.tracker.hparams(resolved)
            window = Window()
            while run.pos.epoch < cfg.train.epochs:
                reporter.epoch_start(run.pos.epoch + 1, cfg.train.epochs, len(run.train_loader),
                                     run.pos.step_in_epoch)  # fmt: skip
                started = time.perf_counter()
                stopped = train_one_epoch(run, reporter, stop, window)
                run.elapsed += time.perf_counter() - started
                if stopped:  # a signal: the checkpoint is saved, report and go
                    run.tracker.hparams(resolved, "STATUS_UNKNOWN")  # neither ended nor failed
                    return result(run, window, stopped_by=stop.name)
                window.metrics = end_epoch(run, window, time.perf_counter() - started)
                reporter.epoch_end(run.pos.epoch, window.metrics, time.perf_counter() - started)
                if stop.requested(run.m.device):  # it came during evaluation or the save
                    return stopped_at_epoch_end(run, reporter, window, stop.name, resolved)
            run.tracker.hparams(resolved, "STATUS_SUCCESS")
            return result(run, window)
    except Diverged:
        run.tracker.hparams(resolved, "STATUS_FAILURE")
        raise
    finally:
        run.tracker.close()


def stopped_at_epoch_end(
    run: Run, reporter: Reporter, window: Window, signal_name: str | None, resolved: Config
) -> RunResult:
    """A signal during an epoch's evaluation or checkpoint: that checkpoint is whole, so stop
    there. After the last epoch the run is complete, and the exit code still says why."""
    done = run.pos.epoch >= run.cfg.train.epochs
    if done:
        reporter.note(
            f"{signal_name} came as the last epoch ended: the run is complete and "
            f"{run.run_dir / 'last.pt'} holds it (resuming it would train nothing more)"
        )
    run.tracker.hparams(resolved, "STATUS_SUCCESS" if done else "STATUS_UNKNOWN")
    out = result(run, window, stopped_by=signal_name)
    out.completed = done
    return out


def train_one_epoch(run: Run, reporter: Reporter, stop: StopRequest, window: Window) -> bool:
    """Train one epoch (or its remainder); True when a signal asked us to stop."""
    pos, cfg = run.pos, run.cfg
    steps = len(run.train_loader)
    # The rate counts steps only: evaluation and the checkpoint since the last log point
    # are not training time (they made each epoch's first point a fraction of the rest).
    window.started, window.images = time.perf_counter(), 0
    batches = run.train_loader.epoch(pos.epoch, pos.step_in_epoch, pos.global_step)
    for images, labels in batches:
        norms = train_step(run.m, images, labels, run.meters)
        pos.advance()
        window.images += len(labels) * run.world.size
        if run.m.device.type == "cpu":
            # CPU work is synchronous, so checking every step costs nothing and stops a
            # divergence after exactly max_nonfinite_steps; CUDA checks at log points.
            check_health(run, run.meters.read())
        last_of_epoch = pos.step_in_epoch == steps
        at_log_point = pos.global_step % cfg.log.every_n_steps == 0 or last_of_epoch
        if at_log_point:
            log_window(run, reporter, window, norms)
        if at_histogram_point(run, last_of_epoch):
            run.tracker.histograms(finite_params(run), pos.global_step)
        # Under DDP, agreeing on a stop is a collective: on CUDA do it only where we sync
        # anyway; on the CPU (gloo) it is cheap enough for every step.
        cheap = not run.world.active or run.m.device.type == "cpu"
        if (at_log_point or cheap) and stop.requested(run.m.device):
            if not at_log_point:
                log_window(run, reporter, window, norms)  # keep the partial window's points
            save(run)
            return True
        every = cfg.train.checkpoint_every_n_steps
        if every and pos.global_step % every == 0 and not last_of_epoch:
            read_meters(run)  # never save diverged weights over a good checkpoint
            save(run)
    return False


def end_epoch(run: Run, window: Window, seconds: float) -> dict[str, float]:
    """Evaluate, log the epoch's metrics and figures, and checkpoint (last.pt, best.pt)."""
    values = read_meters(run)
    metrics = {"train/accuracy": values["correct"] / max(values["seen"], 1)}
    metrics["train/epoch_seconds"] = seconds
    step, classes = run.pos.global_step, run.data.classes
    for name, split in (("val", run.data.val), ("test", run.data.test)):
        if split is not None:
            clock = time.perf_counter()
            scores = evaluate_split(run, split)  # ends in a read-back, so the clock is true
            metrics[f"{name}/eval_seconds"] = time.perf_counter() - clock
            metrics[f"{name}/loss"] = scores["loss"]
            metrics[f"{name}/accuracy"] = scores["accuracy"]
            if "accuracy_live" in scores:  # what the weight average buys over the live weights
                metrics[f"{name}/accuracy_live"] = scores["accuracy_live"]
            run.tracker.confusion(name, scores["confusion"], classes, step)
    run.tracker.scalars(metrics, step, run.pos.epoch + 1)
    flow = gradient_flow(run)
    if flow is not None:
        run.tracker.gradient_flow(run.m.names, *flow, step)
    run.pos.next_epoch()
    run.meters.values["seen"].zero_()
    run.meters.values["correct"].zero_()
    monitored = metrics.get("val/accuracy", metrics.get("test/accuracy", -math.inf))
    improved = monitored > run.best
    run.best = max(run.best, monitored)
    save(run)
    if improved:
        save(run, "best.pt")
    run.tracker.flush()
    return metrics


def evaluate_split(run: Run, split: Split) -> dict[str, Any]:
    """Score the weight average where there is one (and the live weights beside it).

    Every rank scores the whole split (it is small), so all ranks agree without a reduce;
    one loader serves both weight sets.
    """
    m, cfg = run.m, run.cfg
    loader = DeviceLoader(
        split, cfg.data, cfg.train.eval_batch_size, m.device, train=False,
        channels_last=cfg.model.channels_last,
    )  # fmt: skip
    model = m.average.model if m.average is not None else m.model
    views = (cfg.train.eval_flip, cfg.train.eval_shift)
    scored = evaluate(model, m.loss_fn, loader.epoch(0), m.precision, *views)
    out = {"loss": scored.loss, "accuracy": scored.accuracy, "confusion": scored.confusion}
    if m.average is not None:
        live = evaluate(m.model, m.loss_fn, loader.epoch(0), m.precision, *views)
        out["accuracy_live"] = live.accuracy
    return out


# --- Logging ------------------------------------------------------------------------------


def start_tensorboard(run: Run, resolved: Config) -> None:
    """Once per new run: the config, the model graph, a batch as the net sees it, the layout."""
    run.tracker.config_text(resolved, run.hardware.lines())
    images, labels = next(iter(run.train_loader.epoch(0)))
    run.tracker.run_start(run.m.plain, images, labels, run.data.classes, run.cfg,
                          run.m.scaler.is_enabled())  # fmt: skip


def log_window(run: Run, reporter: Reporter, window: Window, norms: torch.Tensor) -> None:
    """Metrics since the last read-back go to TensorBoard and the progress display."""
    values = read_meters(run)
    now = time.perf_counter()
    rate = window.images / max(now - window.started, 1e-9)
    window.started, window.images = now, 0
    scalars: dict[str, float] = {"train/lr": run.m.optimizer.param_groups[0]["lr"]}
    if rate > 0:
        scalars["train/images_per_s"] = rate
    if run.m.scaler.is_enabled():  # logged even when every step of the window was skipped
        scalars["amp/scale"] = run.m.scaler.get_scale()
        scalars["amp/skipped_steps"] = values["skipped"]
    if values["steps"] > 0:  # only finite steps count towards the loss and the norms
        loss = values["loss_sum"] / values["steps"]
        scalars["train/loss"] = window.final_loss = loss
        # Summed over the images the loss counted, so a short last batch weighs what it holds.
        per_image = values["image_loss_sum"] / values["loss_images"]
        scalars["train/loss_per_image"] = window.final_loss_per_image = per_image
        scalars.update(norm_scalars(run, window, norms))
        reporter.progress(run.pos.step_in_epoch, loss, rate)
    run.tracker.scalars(scalars, run.pos.global_step, run.pos.epoch + 1)
    run.meters.reset_window()


def norm_scalars(run: Run, window: Window, norms: torch.Tensor) -> dict[str, float]:
    """Per-parameter gradient norms, and their running sums for the run's result."""
    if not run.cfg.log.grad_norms:
        return {}
    norms = norms.detach()
    window.norm_sums = norms.clone() if window.norm_sums is None else window.norm_sums + norms
    window.norm_count += 1
    values = norms.tolist()
    out = {"grad_norm/total": math.sqrt(sum(v * v for v in values))}
    out.update({f"grad_norm/{name}": v for name, v in zip(run.m.names, values, strict=True)})
    return out


def gradient_flow(run: Run) -> tuple[list[float], list[float]] | None:
    """Mean and max |g| per parameter of the epoch's last step (already unscaled), for the
    gradient-flow figure; None without gradient logging, gradients, or finite values."""
    grads = [p.grad for p in run.m.params]
    if not run.cfg.log.grad_norms or any(g is None for g in grads):
        return None
    means = torch.stack([g.abs().mean() for g in grads]).float()
    maxes = torch.stack(torch._foreach_norm(grads, float("inf"))).float()
    if not bool(torch.isfinite(means).all() and torch.isfinite(maxes).all()):
        return None
    return means.tolist(), maxes.tolist()


def finite_params(run: Run) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters whose weights and gradients are finite (a histogram of NaNs is an
    error in TensorBoard; a diverging run is stopped by the health check instead)."""
    out = []
    for name, p in zip(run.m.names, run.m.params, strict=True):
        if bool(torch.isfinite(p).all()) and (p.grad is None or bool(torch.isfinite(p.grad).all())):
            out.append((name, p))
    return out


def at_histogram_point(run: Run, last_of_epoch: bool) -> bool:
    log = run.cfg.log
    if not log.histograms:
        return False
    every = log.histograms_every_n_steps
    return run.pos.global_step % every == 0 if every else last_of_epoch


# --- Health and checkpoints ---------------------------------------------------------------


def read_meters(run: Run) -> dict[str, float]:
    """The host read-back of the device meters, summed over ranks under DDP."""
    values = run.meters.read()
    if run.world.active:
        summed = torch.tensor([values[n] for n in SUMMED], device=run.m.device)
        values.update(zip(SUMMED, run.world.all_sum(summed).tolist(), strict=True))
    check_health(run, values)
    return values


def check_health(run: Run, values: dict[str, float]) -> None:
    if values["max_streak"] >= run.cfg.train.max_nonfinite_steps:
        first = int(values["streak_start"])
        raise diverged(
            run, f"the loss or gradient norm was non-finite for {int(values['max_streak'])} "
            f"consecutive steps from step {first}", first,
        )  # fmt: skip


def diverged(run: Run, what: str, step: int) -> Diverged:
    kept = run.run_dir / "last.pt"
    keep = "no checkpoint was saved"
    if kept.exists():
        step_kept = ckpt.facts_of(ckpt.load_checkpoint(kept)).global_step
        keep = f"the last finite checkpoint {kept} (step {step_kept}) is kept"
    return Diverged(
        f"training diverged: {what}; {keep}. Try a lower learning rate (optim.lr is "
        f"{run.cfg.optim.lr:g}) or set optim.grad_clip",
        step,
    )


def save(run: Run, name: str = "last.pt") -> Path:
    """Rank 0 writes, and only finite weights; every rank waits so none races ahead."""
    path = run.run_dir / name
    if run.world.is_main:
        payload = ckpt.capture(run)
        bad = ckpt.first_nonfinite(payload)
        if bad is not None:
            raise diverged(run, *where_nonfinite(run, bad))
        ckpt.save_atomic(payload, path)
    run.world.barrier()
    return path


def where_nonfinite(run: Run, bad: str) -> tuple[str, int]:
    """What a save found non-finite, and the step it began: the first of the unbroken run of
    non-finite steps that ends here, where there is one (the optimizer state can also
    overflow under finite losses: then the save's own step)."""
    step, values = run.pos.global_step, run.meters.read()
    what = f"{bad} holds inf/NaN values at step {step}"
    if values["streak"] <= 1:  # no earlier non-finite step to name
        return what, step
    first = int(values["streak_start"])  # as check_health names it
    return f"{what}; the loss or gradient norm was non-finite from step {first}", first


def result(run: Run, window: Window, stopped_by: str | None = None) -> RunResult:
    out = RunResult(run.run_dir, run.run_dir / "last.pt", world_size=run.world.size)
    out.stopped_by, out.final_loss = stopped_by, window.final_loss
    out.final_loss_per_image = window.final_loss_per_image
    out.seconds, out.global_step = run.elapsed, run.pos.global_step
    out.metrics = window.metrics or {"train/global_step": float(run.pos.global_step)}
    if window.norm_sums is not None:
        means = (window.norm_sums / window.norm_count).tolist()
        out.grad_norm_means = dict(zip(run.m.names, means, strict=True))
    run.tracker.flush()
    return out
