"""Building a run, once, from the resolved `Config`: model, optimizer, schedule, loss,
weight average, data, run folder and tracker (the device and precision come from
`hardware.py`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cifar_bp import checkpoint as ckpt
from cifar_bp.config import Config, OptimConfig
from cifar_bp.data import DeviceLoader, load_dataset
from cifar_bp.distributed import World, init_process_group, world_from_env
from cifar_bp.engine import Machinery, Meters, WeightAverage, check_trainable, describe_views
from cifar_bp.errors import CliError, UsageError, first_line
from cifar_bp.hardware import Hardware, choose_hardware, make_deterministic
from cifar_bp.losses import build_loss, unused_settings
from cifar_bp.model import build_model
from cifar_bp.resume import Start, check_resume_data
from cifar_bp.run import Position, Run
from cifar_bp.rundir import (
    RunLock,
    check_owner,
    create_run_dir,
    new_run_id,
    plan_run_dir,
    write_identity,
)
from cifar_bp.tracking import Tracker


def build_optimizer(
    cfg: OptimConfig, named: list[tuple[str, nn.Parameter]]
) -> torch.optim.Optimizer:
    """The optimizer; a value torch.optim rejects is reported as the config key's fault."""
    params = [p for _, p in named]
    # On CUDA the fused kernels also let GradScaler skip its per-step read-back of found-inf
    # (Muon takes the flag on the device too: muon.Muon._step_supports_amp_scaling).
    fused = bool(params) and params[0].is_cuda
    make: Callable[[], torch.optim.Optimizer]
    if cfg.name == "sgd":
        make = lambda: torch.optim.SGD(  # noqa: E731
            params, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay, fused=fused or None,
        )  # fmt: skip
    elif cfg.name == "muon":
        from cifar_bp.muon import Muon, muon_groups

        make = lambda: Muon(  # noqa: E731
            muon_groups(named), cfg.lr, cfg.momentum, cfg.nesterov, cfg.betas, cfg.weight_decay
        )
    else:
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        make = lambda: cls(  # noqa: E731
            params, cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None
        )
    try:
        return make()
    except (ValueError, TypeError, RuntimeError) as err:
        raise UsageError(f"optim ({cfg.name}): torch.optim rejected the settings: {err}") from None


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Schedules step once per batch, over the whole run (a run under 4 steps keeps its lr)."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.scheduler == "onecycle" and total_steps >= 4:
        # Each phase needs more than one step (OneCycleLR divides by its length), which a
        # tiny run's warm-up fraction may not give: widen it to the least that works.
        pct = min(max(cfg.warmup_pct, 1.5 / total_steps), 1 - 1.5 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct,
            cycle_momentum=cfg.name == "sgd" and cfg.momentum > 0,
        )  # fmt: skip
    return None


def build_machinery(cfg: Config, hardware: Hardware, world: World, steps: int) -> Machinery:
    """Model, optimizer, schedule, scaler, loss and weight average for `steps` per epoch."""
    device, precision = hardware.device, hardware.precision
    if cfg.train.deterministic:
        make_deterministic(device)
    elif device.type == "cuda":
        # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.train.seed)  # same seed → same initial weights on every rank
    model = build_model(cfg.model, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim, named)
    decay = cfg.train.ema_decay
    net = world.wrap(model, device)
    if hardware.compiled:
        net = torch.compile(net)
    scaler = torch.amp.GradScaler(
        device.type, init_scale=cfg.train.init_scale, enabled=precision.scaler
    )
    return Machinery(
        model=net,
        plain=model,
        loss_fn=build_loss(cfg.loss).to(device),
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.optim, optimizer, steps * cfg.train.epochs),
        scaler=scaler,
        precision=precision,
        grad_clip=cfg.optim.grad_clip,
        params=[p for _, p in named],
        names=[n for n, _ in named],
        average=WeightAverage(model, decay) if decay is not None else None,
    )


def build_run(cfg: Config, start: Start, force: bool = False) -> Run:
    """Validate and build everything; only then create (or lock) the run directory."""
    check_trainable(cfg)
    world = world_from_env()
    # Reject float16-on-CPU before any slow work, and say what was chosen and why.
    hardware = choose_hardware(cfg, world)
    device = hardware.device
    announced = [hardware.precision.describe()]
    if hardware.compiled:
        announced.append(f"compile: on ({hardware.compile_why})")
    unused = unused_settings(cfg.loss)
    announced += [unused] if unused else []
    if cfg.train.eval_flip or cfg.train.eval_shift > 0:
        announced.append(f"evaluation: {describe_views(cfg.train.eval_flip, cfg.train.eval_shift)}")
    init_process_group(world, device)
    # Rank 0 first: a folder source is then decoded and cached once, not once per rank.
    data = world.main_first(lambda: load_dataset(cfg.data, cfg.train.seed))
    identity = data.identity()
    notes = announced + list(data.notes)
    if start.payload is not None:
        notes += check_resume_data(start.payload, data.classes, identity, force)
    loader = DeviceLoader(
        data.train, cfg.data, cfg.train.batch_size, device, train=True, seed=cfg.train.seed,
        rank=world.rank, world=world.size, channels_last=cfg.model.channels_last,
    )  # fmt: skip
    if len(loader) == 0:
        raise CliError(f"the train split ({len(data.train)} images) is smaller than one batch")
    m = build_machinery(cfg, hardware, world, len(loader))
    meters = Meters(device)
    pos, run_id = Position(), new_run_id()
    if start.payload is not None:
        pos, run_id = resume_state(start, m, meters, len(loader) * cfg.train.epochs, cfg, world)
    run_dir, lock = claim_run_dir(cfg, start, run_id, world, force, notes, hardware.lines())
    data.notes = notes
    try:
        # A resume keeps the events up to its checkpoint's step; a start, even in the folder
        # of a run stopped before its first checkpoint, drops all of them (step 0 included:
        # that run's graph, config text and input grid are written again).
        purge = pos.global_step + 1 if start.payload is not None else 0
        tracker = open_tracker(run_dir if world.is_main else None, purge, device)
    except BaseException:
        lock.__exit__(None, None, None)  # no training will follow to release it
        raise
    run = Run(cfg, hardware, world, data, identity, m, loader, tracker, run_dir, run_id, pos,
              meters, lock, resumed=start.payload is not None)  # fmt: skip
    if start.payload is not None:
        facts = ckpt.facts_of(start.payload)
        run.best, run.elapsed = facts.best_metric, facts.elapsed
    return run


def resume_state(
    start: Start, m: Machinery, meters: Meters, steps: int, cfg: Config, world: World
) -> tuple[Position, str]:
    """Restore the checkpoint into the freshly built machinery; a damaged one is one line."""
    payload = start.payload
    assert payload is not None and start.checkpoint is not None
    old, facts = ckpt.config_of(payload, start.checkpoint), ckpt.facts_of(payload)
    same_optim = old.get("optim") == cfg.optim.model_dump(mode="json")
    saved = old.get("train", {})
    saved_steps = facts.schedule_steps
    # The saved schedule state fits only the same optimizer, the same length, and the same
    # steps per epoch (a forced batch change can keep the length but not the position).
    same_schedule = (
        same_optim
        and saved_steps == steps
        and saved_steps // max(saved.get("epochs", 1), 1) == steps // cfg.train.epochs
    )
    try:
        pos = ckpt.restore(payload, m, meters, same_optim, same_schedule, start.checkpoint)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CliError(
            f"{start.checkpoint}: the checkpoint is damaged or incomplete ({type(err).__name__}: "
            f"{first_line(err, 200)}); resume from another checkpoint or start a new run"
        ) from None
    saved_batch = saved.get("batch_size", cfg.train.batch_size)
    saved_world = facts.world_size
    if (saved_batch, saved_world) != (cfg.train.batch_size, world.size) and pos.step_in_epoch:
        # Mid-epoch positions count batches: re-count the images seen in today's batches.
        images = pos.step_in_epoch * saved_batch * saved_world
        pos.step_in_epoch = images // (cfg.train.batch_size * world.size)
    if not same_schedule:
        # Epochs, batch size or optimizer changed: the new schedule, at the same point of
        # the run (never past its end: a run already complete trains no further).
        per_epoch = steps // cfg.train.epochs
        for _ in range(min(pos.epoch * per_epoch + pos.step_in_epoch, steps)):
            m.step_schedule()
    return pos, facts.run_id or new_run_id()


def claim_run_dir(
    cfg: Config,
    start: Start,
    run_id: str,
    world: World,
    force: bool,
    notes: list[str],
    chosen: list[str],
) -> tuple[Path, contextlib.AbstractContextManager]:
    """The run's folder, created for a new run (`chosen`: what `auto` became, noted in its
    config.yaml), and its lock, held by the main rank before anything in the folder is
    touched, until the training releases it."""
    if not world.is_main:
        return start.run_dir or Path(cfg.log.logdir), contextlib.nullcontext()
    if start.run_dir is None:
        run_dir = plan_run_dir(cfg)
        create_run_dir(run_dir, cfg, run_id, chosen)
        lock = RunLock(run_dir)
        lock.acquire()
        return run_dir, lock
    run_dir = start.run_dir
    if start.checkpoint is not None:
        notes += check_owner(
            run_dir, start.checkpoint, start.payload and ckpt.facts_of(start.payload).run_id, force
        )
    lock = RunLock(run_dir)
    lock.acquire()  # a second trainer is refused before this folder is touched
    try:
        write_identity(run_dir, run_id)
        notes += [f"removed {n} (left by a killed run)" for n in ckpt.clean_temporaries(run_dir)]
    except OSError as err:
        lock.release()
        raise CliError(f"cannot write in run directory {run_dir}: {err.strerror or err}") from None
    return run_dir, lock


def open_tracker(run_dir: Path | None, purge_step: int, device: torch.device) -> Tracker:
    """TensorBoard's writer; a full disk or an unwritable folder is one line, not a traceback.
    On a GPU, where an epoch can take less time than drawing its figures, a helper process
    draws them."""
    try:
        return Tracker(run_dir, purge_step=purge_step, background_figures=device.type == "cuda")
    except OSError as err:
        raise CliError(
            f"cannot write TensorBoard events in {run_dir}: {err.strerror or err}"
        ) from None
