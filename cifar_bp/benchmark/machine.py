"""What the machine is and what it can do: its names, versions, memory, and matmul peak.

The peak is what the variants' achieved GFLOP/s are compared with: a large float32 matrix
product (sgemm) is as close to the arithmetic limit as this machine's BLAS gets, with the
same threads the training processes use. It is measured in a process of its own, taking
its turns with the variants, so that both see the same load on a shared machine, and
the best of many samples is kept (a sample that loses its core to another process is slower,
never faster, than the machine).
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from contextlib import suppress
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from cifar_bp.hardware import Capabilities, cpu_flags

PEAK_SIDE = 2048  # the matrices' side: large enough for the BLAS's best blocking
SAMPLES_PER_TURN = 5  # a turn takes about as long as a few of the variants' steps


class PeakLoop:
    """The matmul peak, sampled a few times per turn; answers in GFLOP/s like a variant."""

    def __init__(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> None:
        self.device, self.dtypes = device, dtypes
        gen = torch.Generator().manual_seed(0)
        self.operands = {
            dtype: [torch.randn(PEAK_SIDE, PEAK_SIDE, generator=gen).to(device, dtype)
                    for _ in range(2)]
            for dtype in dtypes
        }  # fmt: skip
        self.samples: dict[torch.dtype, list[float]] = {dtype: [] for dtype in dtypes}
        self.repeats = 1 if device.type == "cpu" else 50  # a GPU needs many per timing
        for dtype in dtypes:
            self._sample(dtype)  # the BLAS's first call sets up its buffers: not a sample

    def epoch(self, index: int) -> float:
        """One turn's samples; the float32 best so far, in GFLOP/s."""
        for _ in range(SAMPLES_PER_TURN):
            for dtype in self.dtypes:
                self.samples[dtype].append(self._sample(dtype))
        return max(self.samples[torch.float32])

    def _sample(self, dtype: torch.dtype) -> float:
        a, b = self.operands[dtype]
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        sync()
        started = time.perf_counter()
        for _ in range(self.repeats):
            torch.mm(a, b)
        sync()
        seconds = time.perf_counter() - started
        return 2 * PEAK_SIDE**3 * self.repeats / seconds / 1e9

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"side": PEAK_SIDE, "threads": torch.get_num_threads()}
        for dtype, runs in self.samples.items():
            name = str(dtype).removeprefix("torch.")
            out[name] = {"best_gflops": max(runs), "median_gflops": _median(runs),
                         "samples": len(runs)}  # fmt: skip
        return out


def peak_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """float32 always; bfloat16 too where the hardware multiplies it natively."""
    caps = Capabilities.detect(device)
    native = caps.cuda_bf16 if device.type == "cuda" else caps.cpu_bf16
    return (torch.float32, torch.bfloat16) if native else (torch.float32,)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def memory(device: torch.device) -> dict[str, float | None]:
    """Peak memory of this process: resident (Linux reports KiB, macOS bytes) and CUDA's."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": rss / 2**10 if sys.platform == "darwin" else rss, "peak_cuda_mb": cuda}


def cpu_name() -> str:
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_native_bf16": bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:  # a GPU machine's own Python, run from the source tree
        return None
