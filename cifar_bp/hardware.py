"""What this machine gets: the device, the precision, compile and determinism.

The `auto` settings are turned into concrete choices here, each with the reason it was
chosen, so that `train` announces and `config show` prints the same thing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import cache

import torch

from cifar_bp.config import Config, TrainConfig
from cifar_bp.distributed import World
from cifar_bp.errors import UsageError

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


def scoring_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """The precision a run trained in, to score its checkpoint as its logs did; a float16
    run scored on a CPU (which has no float16 autocast) gets what `auto` picks there."""
    if cfg.amp is not False and cfg.amp_dtype == "float16" and device.type != "cuda":
        cfg = cfg.model_copy(update={"amp": "auto", "amp_dtype": "auto"})
    return resolve_precision(cfg, device)


def _precision(
    cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None, reason: str
) -> Precision:
    # float16's narrow range needs loss scaling; bfloat16 has float32's exponent range.
    scaler = cfg.grad_scaler is True or (cfg.grad_scaler == "auto" and dtype == torch.float16)
    return Precision(device, dtype, scaler, reason)


def resolve_compile(cfg: TrainConfig, device: torch.device) -> tuple[bool, str]:
    """`train.compile` auto: off everywhere it was measured. On an H200 (torch 2.11,
    benchmarks/gpu_check.sh) the compiled step trained 16% slower than the eager one at the
    tutorial's batch of 64 (13,579 against 16,189 images/s) and its first epoch took 29 s
    instead of 6 s; on the CPU it measured no gain either (docs/experiments.md). `cifar-bp
    bench --variants b,compile` measures it again on another machine."""
    if cfg.compile != "auto":
        return bool(cfg.compile), f"train.compile {str(cfg.compile).lower()}"
    if device.type == "cuda":
        return False, "CUDA, auto: measured slower on an H200"
    return False, "CPU, auto"


def make_deterministic(device: torch.device) -> None:
    """Bitwise-reproducible kernels (`train.deterministic`), at some cost in speed on CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class Hardware:
    """What this machine gets for a config: the device, the precision and compile."""

    device: torch.device
    precision: Precision
    compiled: bool
    compile_why: str
    amp_dtype: str  # what train.amp true would autocast to here, even where amp is off

    def lines(self) -> list[str]:
        """One line each, with the reason: what `config show` prints at its top."""
        return [f"device: {self.device}", self.precision.describe(),
                f"compile: {self.compiled} ({self.compile_why})"]  # fmt: skip

    def apply(self, cfg: Config) -> Config:
        """`cfg` with every `auto` replaced by these choices."""
        p = self.precision
        train = cfg.train.model_copy(
            update={"device": str(self.device), "amp": p.dtype is not None,
                    "amp_dtype": self.amp_dtype,
                    "grad_scaler": p.scaler, "compile": self.compiled}
        )  # fmt: skip
        return cfg.model_copy(update={"train": train})


def choose_hardware(cfg: Config, world: World) -> Hardware:
    """Resolve device, precision and compile once; float16 on a CPU is refused here."""
    device = pick_device(cfg, world)
    precision = resolve_precision(cfg.train, device)
    return Hardware(device, precision, *resolve_compile(cfg.train, device),
                    amp_dtype=autocast_dtype(cfg.train, device, precision))  # fmt: skip


def autocast_dtype(cfg: TrainConfig, device: torch.device, precision: Precision) -> str:
    """train.amp_dtype resolved: the dtype in use, or the one `train.amp: true` would pick
    here, so that `config show` prints no `auto` even for a float32 run."""
    if precision.dtype is not None:
        return precision.name
    if cfg.amp_dtype != "auto":
        return cfg.amp_dtype
    return resolve_precision(cfg.model_copy(update={"amp": True}), device).name


def resolve_auto(cfg: Config, world: World | None = None) -> tuple[Config, list[str]]:
    """The config with every `auto` replaced by what this machine gets, and why (one line
    each): what `config show` prints."""
    hardware = choose_hardware(cfg, world or World())
    return hardware.apply(cfg), hardware.lines()
