"""Building a run: device, precision, model, optimizer, schedule, loss, weight average, data,
run folder and tracker.

Everything a training run needs is built here, once, from the resolved `Config`; the
`auto` settings (device, precision, compile) are turned into concrete choices here too, each
with the reason it was chosen, so that `train` and `config show` report the same thing.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from cifar_bp import checkpoint as ckpt
from cifar_bp.checkpoint import Position
from cifar_bp.config import Config, OptimConfig, TrainConfig
from cifar_bp.data import Dataset, DeviceLoader, load_dataset
from cifar_bp.distributed import World, init_process_group, world_from_env
from cifar_bp.engine import Machinery, Meters, WeightAverage, check_trainable
from cifar_bp.errors import CliError, UsageError
from cifar_bp.losses import build_loss
from cifar_bp.model import build_model
from cifar_bp.resume import Start, check_resume_data
from cifar_bp.rundir import (
    RunLock,
    check_owner,
    create_run_dir,
    new_run_id,
    plan_run_dir,
    write_identity,
)
from cifar_bp.tracking import Tracker

# cuBLAS needs a fixed workspace to be deterministic (see torch.use_deterministic_algorithms).
CUBLAS_WORKSPACE = ":4096:8"


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"train.device={spec}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"train.device={spec}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    return device


def pick_device(cfg: Config, world: World) -> torch.device:
    device = resolve_device(cfg.train.device)
    if world.active and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)  # one GPU per local rank
    return device


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    return frozenset()


@dataclass(frozen=True)
class Capabilities:
    """What the hardware does natively; tests pass fakes to cover every machine."""

    cuda_bf16: bool
    cpu_bf16: bool

    @classmethod
    def detect(cls, device: torch.device | None = None) -> Capabilities:
        """The CUDA answer is for `device` (the current GPU if None), and only asked when it
        is a GPU: a CPU run must not initialise CUDA."""
        cuda = False
        if device is None or device.type == "cuda":
            # Tensor cores with bf16 arrived with compute capability 8.0 (Ampere); older
            # GPUs report bf16 as supported through emulation, which is slower than float16.
            cuda = torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
        return cls(cuda_bf16=cuda, cpu_bf16=bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}))


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: plain float32), whether a GradScaler runs, and why."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: bool
    reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]

    def describe(self) -> str:
        what = "float32" if self.dtype is None else f"{self.name} autocast"
        return f"precision: {what}{' + GradScaler' * self.scaler} ({self.reason})"


def resolve_precision(
    cfg: TrainConfig, device: torch.device, caps: Capabilities | None = None
) -> Precision:
    """`train.amp` auto/true/false and `train.amp_dtype` auto/bfloat16/float16, resolved.

    auto: bfloat16 on a GPU that supports it, else float16 with a GradScaler; on the CPU,
    bfloat16 only where the CPU computes it natively (emulated bf16 is slower than float32).
    """
    cuda = device.type == "cuda"
    where = "CUDA" if cuda else "CPU"
    if cfg.amp is False:
        return _precision(cfg, device, None, f"{where}, train.amp false")
    if cfg.amp_dtype == "float16" and not cuda:
        raise UsageError(
            "train.amp_dtype=float16 needs CUDA (the CPU has no float16 autocast for training): "
            "use bfloat16, or train.amp=false"
        )
    if cfg.amp_dtype != "auto":
        dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
        return _precision(cfg, device, dtype, f"{where}, train.amp_dtype {cfg.amp_dtype}")
    caps = caps or Capabilities.detect(device)
    if cuda:
        native = caps.cuda_bf16
        dtype = torch.bfloat16 if native else torch.float16
        why = "GPU supports bf16" if native else "GPU lacks bf16"
    elif cfg.amp is True or caps.cpu_bf16:
        dtype = torch.bfloat16
        why = "native bf16" if caps.cpu_bf16 else "no native bf16, forced by train.amp true"
    else:
        return _precision(cfg, device, None, "CPU without native bf16, auto")
    return _precision(
        cfg, device, dtype, f"{where}, {why}, {'auto' if cfg.amp == 'auto' else 'amp on'}"
    )


def _precision(
    cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None, reason: str
) -> Precision:
    # float16's narrow range needs loss scaling; bfloat16 has float32's exponent range.
    scaler = cfg.grad_scaler is True or (cfg.grad_scaler == "auto" and dtype == torch.float16)
    return Precision(device, dtype, scaler, reason)


def resolve_compile(cfg: TrainConfig, device: torch.device) -> tuple[bool, str]:
    """`train.compile` auto: on for CUDA (kernel fusion pays there), off on the CPU, where
    compiling this net measured no gain (see the README's speed table)."""
    if cfg.compile != "auto":
        return bool(cfg.compile), f"train.compile {str(cfg.compile).lower()}"
    if device.type == "cuda":
        return True, "CUDA, auto"
    return False, "CPU, auto"


def make_deterministic(device: torch.device) -> None:
    """Bitwise-reproducible kernels (`train.deterministic`), at some cost in speed on CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False


def resolve_auto(cfg: Config, world: World | None = None) -> tuple[Config, list[str]]:
    """The config with every `auto` replaced by what this machine gets, and why (one line
    each): what `config show` prints and what `train` announces."""
    device = pick_device(cfg, world or World())
    precision = resolve_precision(cfg.train, device)
    compiled, compile_why = resolve_compile(cfg.train, device)
    train = cfg.train.model_copy(
        update={"device": str(device), "amp": precision.dtype is not None,
                "amp_dtype": precision.name if precision.dtype is not None else cfg.train.amp_dtype,
                "grad_scaler": precision.scaler, "compile": compiled}
    )  # fmt: skip
    lines = [f"device: {device}", precision.describe(), f"compile: {compiled} ({compile_why})"]
    return cfg.model_copy(update={"train": train}), lines


def build_optimizer(
    cfg: OptimConfig, named: list[tuple[str, nn.Parameter]]
) -> torch.optim.Optimizer:
    """The optimizer; a value torch.optim rejects is reported as the config key's fault."""
    params = [p for _, p in named]
    make: Callable[[], torch.optim.Optimizer]
    if cfg.name == "sgd":
        make = lambda: torch.optim.SGD(  # noqa: E731
            params, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    elif cfg.name == "muon":
        from cifar_bp.muon import Muon, muon_groups

        make = lambda: Muon(  # noqa: E731
            muon_groups(named), cfg.lr, cfg.momentum, cfg.nesterov, cfg.betas, cfg.weight_decay
        )
    else:
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        make = lambda: cls(params, cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)  # noqa: E731
    try:
        return make()
    except (ValueError, TypeError, RuntimeError) as err:
        raise UsageError(f"optim ({cfg.name}): torch.optim rejected the settings: {err}") from None


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Schedules step once per batch, over the whole run."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_pct,
            cycle_momentum=cfg.name == "sgd" and cfg.momentum > 0,
        )  # fmt: skip
    return None


def build_machinery(cfg: Config, device: torch.device, world: World, steps: int) -> Machinery:
    """Model, optimizer, schedule, scaler, loss and weight average for `steps` per epoch."""
    precision = resolve_precision(cfg.train, device)
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
    if resolve_compile(cfg.train, device)[0]:
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
        average=WeightAverage(model, decay) if decay is not None else None,
    )


@dataclass
class Run:
    """Everything a training run holds between steps; built once, by `build_run`."""

    cfg: Config
    world: World
    data: Dataset
    data_identity: str
    m: Machinery
    train_loader: DeviceLoader
    tracker: Tracker
    run_dir: Path
    run_id: str
    names: list[str]  # parameter names, in the order of m.params
    pos: Position
    meters: Meters
    lock: contextlib.AbstractContextManager
    best: float = -math.inf
    elapsed: float = 0.0  # training seconds over all sessions of this run
    resumed: bool = False


def build_run(cfg: Config, start: Start, force: bool = False) -> Run:
    """Validate and build everything; only then create (or lock) the run directory."""
    check_trainable(cfg)
    world = world_from_env()
    device = pick_device(cfg, world)
    # Reject float16-on-CPU before any slow work, and say what was chosen and why.
    announced = [resolve_precision(cfg.train, device).describe()]
    if resolve_compile(cfg.train, device)[0]:
        announced.append(f"compile: on ({resolve_compile(cfg.train, device)[1]})")
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
    m = build_machinery(cfg, device, world, len(loader))
    meters = Meters(device)
    pos, run_id = Position(), new_run_id()
    if start.payload is not None:
        pos, run_id = resume_state(start, m, meters, len(loader) * cfg.train.epochs, cfg, world)
    run_dir, lock = claim_run_dir(cfg, start, run_id, world, force, notes)
    data.notes = notes
    names = [name for name, p in m.plain.named_parameters() if p.requires_grad]
    tracker = open_tracker(run_dir if world.is_main else None, pos.global_step + 1)
    run = Run(cfg, world, data, identity, m, loader, tracker, run_dir, run_id, names, pos,
              meters, lock, resumed=start.payload is not None)  # fmt: skip
    if start.payload is not None:
        run.best = start.payload.get("best_metric", -math.inf)
        run.elapsed = start.payload.get("elapsed", 0.0)
    return run


def resume_state(
    start: Start, m: Machinery, meters: Meters, steps: int, cfg: Config, world: World
) -> tuple[Position, str]:
    """Restore the checkpoint into the freshly built machinery; a damaged one is one line."""
    payload = start.payload
    assert payload is not None
    same_optim = payload["config"].get("optim") == cfg.optim.model_dump(mode="json")
    try:
        pos = ckpt.restore(payload, m, meters, steps, same_optim)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CliError(
            f"{start.checkpoint}: the checkpoint is damaged or incomplete ({type(err).__name__}: "
            f"{err}); resume from another checkpoint or start a new run"
        ) from None
    saved_world = payload.get("world_size", 1)
    if saved_world != world.size and pos.step_in_epoch:
        # Mid-epoch positions count global batches; re-count them for this many processes.
        images = pos.step_in_epoch * cfg.train.batch_size * saved_world
        pos.step_in_epoch = images // (cfg.train.batch_size * world.size)
    return pos, payload.get("run_id") or new_run_id()


def claim_run_dir(
    cfg: Config, start: Start, run_id: str, world: World, force: bool, notes: list[str]
) -> tuple[Path, contextlib.AbstractContextManager]:
    """The run's folder, created for a new run; locked by the main rank while it trains."""
    if not world.is_main:
        return start.run_dir or Path(cfg.log.logdir), contextlib.nullcontext()
    if start.run_dir is None:
        run_dir = plan_run_dir(cfg)
        create_run_dir(run_dir, cfg, run_id)
        return run_dir, RunLock(run_dir)
    run_dir = start.run_dir
    if start.checkpoint is not None:
        notes += check_owner(
            run_dir, start.checkpoint, start.payload and start.payload.get("run_id"), force
        )
    lock = RunLock(run_dir)
    with lock:  # refuse a second trainer now, before any slow work
        pass
    try:
        write_identity(run_dir, run_id)
    except OSError as err:
        raise CliError(f"cannot write in run directory {run_dir}: {err.strerror or err}") from None
    notes += [f"removed {name} (left by a killed run)" for name in ckpt.clean_temporaries(run_dir)]
    return run_dir, lock


def open_tracker(run_dir: Path | None, purge_step: int) -> Tracker:
    """TensorBoard's writer; a full disk or an unwritable folder is one line, not a traceback."""
    try:
        return Tracker(run_dir, purge_step=purge_step)
    except OSError as err:
        raise CliError(
            f"cannot write TensorBoard events in {run_dir}: {err.strerror or err}"
        ) from None
