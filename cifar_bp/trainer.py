"""A whole training run: set-up, the epoch loop, evaluation, checkpoints and stopping.

The per-step work is `engine.train_step`; this module decides when to log, evaluate,
save and stop, and keeps a run resumable at every one of those points.
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
from cifar_bp.data import Dataset, DeviceLoader, load_dataset
from cifar_bp.distributed import World, init_process_group, unwrap, world_from_env
from cifar_bp.engine import (
    Machinery,
    Meters,
    WeightAverage,
    amp_dtype,
    build_optimizer,
    build_scheduler,
    check_trainable,
    evaluate,
    make_scaler,
    resolve_device,
    train_step,
)
from cifar_bp.errors import CliError
from cifar_bp.losses import build_loss
from cifar_bp.model import build_model
from cifar_bp.resume import Position, rng_state, set_rng_state
from cifar_bp.signals import StopRequest
from cifar_bp.tracking import Tracker, create_run_dir, plan_run_dir


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
    grad_norm_means: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """Everything a run holds between steps."""

    cfg: Config
    world: World
    data: Dataset
    m: Machinery
    train_loader: DeviceLoader
    tracker: Tracker
    run_dir: Path
    names: list[str]
    pos: Position
    meters: Meters
    best: float = -math.inf
    elapsed: float = 0.0
    norm_sums: torch.Tensor | None = None
    norm_count: int = 0


def build_machinery(cfg: Config, device: torch.device, world: World, steps: int) -> Machinery:
    torch.manual_seed(cfg.train.seed)  # same seed → same initial weights on every rank
    model = build_model(cfg.model, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = build_optimizer(cfg.optim, named)
    decay = cfg.train.ema_decay
    average = WeightAverage(model, decay) if decay is not None else None
    net = world.wrap(model, device)
    if cfg.train.compile:
        net = torch.compile(net)
    return Machinery(
        model=net,
        loss_fn=build_loss(cfg.loss).to(device),
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.optim, optimizer, steps * cfg.train.epochs),
        scaler=make_scaler(cfg.train, device),
        device=device,
        dtype=amp_dtype(cfg.train, device),
        grad_clip=cfg.optim.grad_clip,
        params=params,
        average=average,
        eval_flip=cfg.train.eval_flip,
    )


def pick_device(cfg: Config, world: World) -> torch.device:
    device = resolve_device(cfg.train.device)
    if world.active and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)  # one GPU per local rank
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    return device


def setup(cfg: Config, resume: dict[str, Any] | None, run_dir: Path | None) -> Run:
    """Validate and build everything; only then create the run directory."""
    check_trainable(cfg)
    world = world_from_env()
    device = pick_device(cfg, world)
    amp_dtype(cfg.train, device)  # reject float16-on-CPU before any slow work
    init_process_group(world, device)
    # Rank 0 first: a folder source is then decoded and cached once, not once per rank.
    data = world.main_first(lambda: load_dataset(cfg.data, cfg.train.seed))
    loader = DeviceLoader(
        data.train, cfg.data, cfg.train.batch_size, device, train=True, seed=cfg.train.seed,
        rank=world.rank, world=world.size, channels_last=cfg.model.channels_last,
    )  # fmt: skip
    if len(loader) == 0:
        raise CliError(f"the train split ({len(data.train)} images) is smaller than one batch")
    m = build_machinery(cfg, device, world, len(loader))
    pos = Position()
    meters = Meters(device)
    if resume is not None:
        pos = restore(resume, m, meters, len(loader), cfg, world)
    else:
        run_dir = plan_run_dir(cfg) if world.is_main else Path(cfg.log.logdir)
    assert run_dir is not None
    if world.is_main and resume is None:
        create_run_dir(run_dir, cfg)
    tracker = Tracker(run_dir if world.is_main else None, purge_step=pos.global_step + 1)
    if resume is None:
        tracker.config_text(cfg)
    names = [name for name, p in unwrap_model(m).named_parameters() if p.requires_grad]
    run = Run(cfg, world, data, m, loader, tracker, run_dir, names, pos, meters)
    if resume is not None:
        run.best = resume.get("best_metric", -math.inf)
        run.elapsed = resume.get("elapsed", 0.0)
    return run


def unwrap_model(m: Machinery) -> torch.nn.Module:
    return unwrap(getattr(m.model, "_orig_mod", m.model))


def restore(
    payload: dict[str, Any], m: Machinery, meters: Meters, steps: int, cfg: Config, world: World
) -> Position:
    """Put model, optimizer, scheduler, scaler, meters and RNGs back where they were."""
    ckpt.load_model_state(unwrap_model(m), payload["model"], Path("checkpoint"))
    pos = Position(payload["epoch"], payload["step_in_epoch"], payload["global_step"])
    saved_world = payload.get("world_size", 1)
    if saved_world != world.size and pos.step_in_epoch:
        # Mid-epoch positions count global batches; re-count them for this many processes.
        images = pos.step_in_epoch * cfg.train.batch_size * saved_world
        pos.step_in_epoch = images // (cfg.train.batch_size * world.size)
    # A forced change of optim.* must take effect: the saved state would restore the old lr.
    same_optim = payload["config"].get("optim") == cfg.optim.model_dump(mode="json")
    if same_optim:
        m.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        m.scaler.load_state_dict(payload["scaler"])
    if m.average is not None:
        if payload.get("average"):
            m.average.load_state_dict(payload["average"])
        else:  # averaging switched on at resume: start the average from the live weights
            m.average.model.load_state_dict(unwrap_model(m).state_dict())
    if m.scheduler is not None:
        if same_optim and payload.get("schedule_steps") == steps * cfg.train.epochs:
            m.scheduler.load_state_dict(payload["scheduler"])
        else:  # epochs or schedule changed: recompute the schedule up to this step
            for _ in range(pos.global_step):
                m.scheduler.step()
    for name, value in payload.get("meters", {}).items():
        if name in meters.values:
            meters.values[name].copy_(value)
    set_rng_state(payload["rng"], m.device)
    return pos


def payload(run: Run) -> dict[str, Any]:
    m = run.m
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "model": unwrap_model(m).state_dict(),
        "optimizer": m.optimizer.state_dict(),
        "scheduler": m.scheduler.state_dict() if m.scheduler is not None else None,
        "schedule_steps": len(run.train_loader) * run.cfg.train.epochs,
        "scaler": m.scaler.state_dict(),
        "average": m.average.state_dict() if m.average is not None else None,
        "epoch": run.pos.epoch,
        "step_in_epoch": run.pos.step_in_epoch,
        "global_step": run.pos.global_step,
        "world_size": run.world.size,
        "data_order": {"seed": run.cfg.train.seed, **run.pos.as_dict()},
        "rng": rng_state(m.device),
        "meters": {k: v.detach().cpu() for k, v in run.meters.values.items()},
        "best_metric": run.best,
        "elapsed": run.elapsed,
        "config": run.cfg.model_dump(mode="json"),
        "classes": list(run.data.classes),
    }


def save(run: Run, name: str = "last.pt") -> Path:
    """Rank 0 writes; every rank waits so none races ahead of a half-written file."""
    path = run.run_dir / name
    if run.world.is_main:
        ckpt.save_atomic(payload(run), path)
    run.world.barrier()
    return path


def train(
    cfg: Config,
    reporter: Reporter,
    resume: dict[str, Any] | None = None,
    run_dir: Path | None = None,
) -> RunResult:
    run = setup(cfg, resume, run_dir)
    try:
        with StopRequest(run.world) as stop:
            return fit(run, reporter, stop)
    finally:
        run.tracker.close()


def fit(run: Run, reporter: Reporter, stop: StopRequest) -> RunResult:
    cfg, pos = run.cfg, run.pos
    result = RunResult(run.run_dir, run.run_dir / "last.pt", world_size=run.world.size)
    for note in run.data.notes:
        reporter.note(note)
    steps = len(run.train_loader)
    metrics: dict[str, float] = {}
    while pos.epoch < cfg.train.epochs:
        reporter.epoch_start(pos.epoch + 1, cfg.train.epochs, steps, pos.step_in_epoch)
        started = time.perf_counter()
        stopped = run_epoch(run, reporter, stop)
        run.elapsed += time.perf_counter() - started
        if stopped:
            result.stopped_by = stop.name
            break
        metrics = end_epoch(run, reporter, time.perf_counter() - started)
    result.metrics = metrics or last_metrics(run)
    result.seconds, result.global_step = run.elapsed, pos.global_step
    result.grad_norm_means = mean_norms(run)
    if result.stopped_by is None:
        run.tracker.hparams(cfg, result.metrics)
    run.tracker.flush()
    return result


def run_epoch(run: Run, reporter: Reporter, stop: StopRequest) -> bool:
    """Train one epoch (or its remainder); True when a signal asked us to stop."""
    pos, every = run.pos, run.cfg.log.every_n_steps
    window_start, window_images = time.perf_counter(), 0
    batches = run.train_loader.epoch(pos.epoch, pos.step_in_epoch, pos.global_step)
    for images, labels in batches:
        norms = train_step(run.m, images, labels, run.meters)
        pos.advance()
        if run.m.device.type == "cpu":
            # CPU work is synchronous, so checking every step costs nothing and stops a
            # divergence after exactly max_nonfinite_steps; CUDA checks at log points.
            check_health(run, run.meters.read())
        window_images += len(labels) * run.world.size
        last_of_epoch = pos.step_in_epoch == len(run.train_loader)
        at_log_point = pos.global_step % every == 0 or last_of_epoch
        if at_log_point:
            rate = window_images / max(time.perf_counter() - window_start, 1e-9)
            log_window(run, reporter, norms, rate)
            window_start, window_images = time.perf_counter(), 0
        # Under DDP, agreeing on a stop is a collective: on CUDA do it only where we sync
        # anyway; on the CPU (gloo) it is cheap enough for every step.
        cheap = not run.world.active or run.m.device.type == "cpu"
        if (at_log_point or cheap) and stop.requested(run.m.device):
            if not at_log_point:
                log_window(run, reporter, norms, 0.0)  # keep the partial window's points
            save(run)
            return True
        n = run.cfg.train.checkpoint_every_n_steps
        if n and pos.global_step % n == 0 and not last_of_epoch:
            read_meters(run)  # never save diverged weights over a good checkpoint
            save(run)
    return False


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
        raise diverged(run, values)


SUMMED = ("loss_sum", "steps", "seen", "correct")


def log_window(run: Run, reporter: Reporter, norms: torch.Tensor, rate: float) -> None:
    """Metrics since the last read-back go to TensorBoard and the progress display."""
    values = read_meters(run)
    scalars: dict[str, float] = {"train/lr": run.m.optimizer.param_groups[0]["lr"]}
    if rate > 0:
        scalars["train/images_per_s"] = rate
    if run.m.scaler.is_enabled():  # logged even when every step of the window was skipped
        scalars["amp/scale"] = run.m.scaler.get_scale()
        scalars["amp/skipped_steps"] = values["skipped"]
    if values["steps"] > 0:  # only finite steps count towards the loss and the norms
        scalars["train/loss"] = values["loss_sum"] / values["steps"]
        scalars.update(norm_scalars(run, norms))
        reporter.progress(run.pos.step_in_epoch, scalars["train/loss"], rate)
    run.tracker.scalars(scalars, run.pos.global_step)
    run.meters.reset_window()


def norm_scalars(run: Run, norms: torch.Tensor) -> dict[str, float]:
    if not run.cfg.log.grad_norms:
        return {}
    norms = norms.detach()
    run.norm_sums = norms.clone() if run.norm_sums is None else run.norm_sums + norms
    run.norm_count += 1
    values = norms.tolist()
    out = {"grad_norm/total": math.sqrt(sum(v * v for v in values))}
    out.update({f"grad_norm/{name}": v for name, v in zip(run.names, values, strict=True)})
    return out


def mean_norms(run: Run) -> dict[str, float]:
    if run.norm_sums is None:
        return {}
    means = (run.norm_sums / run.norm_count).tolist()
    return dict(zip(run.names, means, strict=True))


def diverged(run: Run, values: dict[str, float]) -> CliError:
    first = int(values["streak_start"])
    kept = run.run_dir / "last.pt"
    keep = (
        f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint was saved"
    )
    return CliError(
        f"training diverged: the loss or gradient norm was non-finite for "
        f"{int(values['max_streak'])} consecutive steps from step {first}; {keep}. "
        f"Try a lower learning rate (optim.lr is {run.cfg.optim.lr:g}) or set optim.grad_clip"
    )


def end_epoch(run: Run, reporter: Reporter, seconds: float) -> dict[str, float]:
    """Evaluate, log the epoch's metrics, and checkpoint (last.pt, and best.pt if better)."""
    values = read_meters(run)
    metrics = {"train/accuracy": values["correct"] / max(values["seen"], 1)}
    metrics["train/epoch_seconds"] = seconds
    for split_name, split in (("val", run.data.val), ("test", run.data.test)):
        if split is not None:
            loader = eval_loader(run, split)
            result = evaluate(run.m, loader.epoch(0))
            metrics[f"{split_name}/loss"] = result.loss
            metrics[f"{split_name}/accuracy"] = result.accuracy
            if run.m.average is not None:  # what the average buys over the live weights
                live = evaluate(run.m, loader.epoch(0), live=True)
                metrics[f"{split_name}/accuracy_live"] = live.accuracy
    run.tracker.scalars(metrics, run.pos.global_step)
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
    reporter.epoch_end(run.pos.epoch, metrics, seconds)
    return metrics


def eval_loader(run: Run, split: Any) -> DeviceLoader:
    """Every rank scores the whole split (it is small), so all ranks agree without a reduce.

    One loader per split and epoch: with a weight average, both weight sets read the same
    device copy of the split.
    """
    return DeviceLoader(
        split, run.cfg.data, run.cfg.train.eval_batch_size, run.m.device, train=False,
        channels_last=run.cfg.model.channels_last,
    )  # fmt: skip


def last_metrics(run: Run) -> dict[str, float]:
    return {"train/global_step": float(run.pos.global_step)}
