"""Running the variants: one spawned process each, taking turns epoch by epoch.

Every variant trains the reference net on the same in-memory synthetic CIFAR-sized images.
A fresh interpreter per variant makes its peak memory its own, counting all that a user's
process would (torch included). Each turn runs one epoch of every variant, a different one
first each time, so that changes in the machine's load fall on all of them alike; the
matmul peak takes its turns too. Turn 0 is every variant's first epoch (compilation, cuDNN
autotuning, oneDNN primitives, allocator growth): reported on its own, then `repeats` timed
epochs, whose median images/s is the variant's figure.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from cifar_bp.benchmark.machine import PeakLoop, environment, peak_dtypes
from cifar_bp.benchmark.variants import Variant, choose, step_cost
from cifar_bp.data import synthetic_split
from cifar_bp.errors import CliError, UsageError
from cifar_bp.hardware import resolve_device
from cifar_bp.model import ReferenceNet

# Images per variant when --images is not given: enough for several seconds per timed epoch.
DEFAULT_IMAGES = {"cpu": 4096, "cuda": 16384}
PEAK = "peak"  # the matmul peak's job among the variants'


@dataclass
class BenchOptions:
    device: str = "auto"
    images: int | None = None  # synthetic images per variant; None = DEFAULT_IMAGES
    repeats: int = 5  # timed epochs per variant, after the first epoch
    variants: list[str] = field(default_factory=lambda: ["a", "b", "c", "d"])
    compile_fast: bool = False  # add torch.compile to (c)
    sync_debug: bool = False  # CUDA: count host syncs inside the engine variants' steps


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Measure the chosen variants and the matmul peak side by side."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", opts.device):
        raise UsageError(f"--device {opts.device}: use auto, cpu, cuda or cuda:N")
    if (opts.images is not None and opts.images < 1) or opts.repeats < 1:
        raise UsageError("--images and --repeats must be at least 1")
    device = resolve_device(opts.device)
    variants = choose(opts.variants, device.type, opts.compile_fast)
    images = opts.images or DEFAULT_IMAGES[device.type]
    load_before = os.getloadavg()
    jobs: dict[str, tuple[Any, ...]] = {
        key: (v, str(device), images, opts.repeats + 1, opts.sync_debug)
        for key, v in variants.items()
    }
    jobs[PEAK] = (None, str(device), 0, 0, False)
    results, env = take_turns(jobs, opts.repeats)
    peak = results.pop(PEAK)
    cost = step_cost(ReferenceNet())
    for result in results.values():
        add_rates(result, results.get("a"), cost.total, peak)
    return {
        **env,
        "images": images,
        "repeats": opts.repeats,
        "first_epochs": 1,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "step_mflop_per_image": {
            k: v / 1e6 for k, v in {**asdict(cost), "total": cost.total}.items()
        },
        "peak": peak,
        "variants": results,
    }


def add_rates(result: dict[str, Any], a: dict | None, flop: float, peak: dict[str, Any]) -> None:
    """GFLOP/s and share of the peak, for the first epoch and the steady state: of the
    float32 peak, and of the peak of the type the variant multiplies in (bfloat16 autocast
    against the bfloat16 peak, where this machine has one to measure)."""
    fp32 = peak["float32"]["best_gflops"]
    own = peak.get(result.get("precision", "float32"))
    own_peak = own["best_gflops"] if isinstance(own, dict) else fp32
    for prefix in ("", "first_"):
        gflops = result[f"{prefix}images_per_s"] * flop / 1e9
        result[f"{prefix}gflops"] = gflops
        result[f"{prefix}peak_share"] = gflops / fp32
        result[f"{prefix}dtype_peak_share"] = gflops / own_peak
    result["ratio"] = result["images_per_s"] / a["images_per_s"] if a else None


def take_turns(
    jobs: dict[str, tuple[Any, ...]], repeats: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each job in its own spawned process; one epoch (or peak turn) each per turn."""
    ctx = multiprocessing.get_context("spawn")
    conns: dict[str, Connection] = {}
    procs, finished = [], False
    try:
        for key, args in jobs.items():
            conns[key], child = ctx.Pipe()
            procs.append(ctx.Process(target=_worker, args=(child, *args), daemon=True))
            procs[-1].start()
        setup = {key: _reply(key, conn) for key, conn in conns.items()}  # all ready first
        keys, runs = list(jobs), {key: [] for key in jobs}
        started = time.perf_counter()
        for turn in range(repeats + 1):
            for key in keys[turn % len(keys) :] + keys[: turn % len(keys)]:
                conns[key].send("epoch")
                runs[key].append(_reply(key, conns[key]))
            # On stderr, so that --json keeps stdout to itself.
            what = "the first epochs" if turn == 0 else f"timed epoch {turn} of {repeats}"
            print(
                f"bench: {what} done for {', '.join(keys)} ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        results, env = {}, {}
        for key, conn in conns.items():
            conn.send("done")
            results[key], env = _reply(key, conn)
            first, *timed = runs[key]
            results[key].update(images_per_s=statistics.median(timed), runs_images_per_s=timed,
                                first_images_per_s=first, setup_s=setup[key])  # fmt: skip
        finished = True
        return results, env
    finally:  # after a failure, stop the other variants' processes at once
        for proc in procs:
            proc.join(timeout=5 if finished else 0)
            if proc.is_alive():
                proc.terminate()


def _reply(key: str, conn: Connection) -> Any:
    try:
        status, value = conn.recv()
    except EOFError:
        raise CliError(f"variant {key}: its process died (out of memory?)") from None
    if status == "error":
        raise value if isinstance(value, CliError) else CliError(f"variant {key}: {value}")
    return value


def _worker(
    conn: Connection, variant: Variant | None, device: str, images: int, epochs: int, sync: bool
) -> None:
    """A job's process: set up, answer one epoch's figure per request, then a summary."""
    try:
        started = time.perf_counter()
        loop = _loop(variant, torch.device(device), images, epochs, sync)
        conn.send(("ok", time.perf_counter() - started))
        epoch = 0
        while conn.recv() == "epoch":
            conn.send(("ok", loop.epoch(epoch)))
            epoch += 1
        summary = loop.summary()
        if variant is not None:
            summary = {**asdict(variant), **summary, "settings": loop.settings}
            summary["overrides"] = variant.overrides() if variant.engine else None
        conn.send(("ok", (summary, environment(torch.device(device)))))
    except KeyboardInterrupt:  # Ctrl-C reaches every process; the parent reports it
        pass
    except Exception as err:
        conn.send(("error", err if isinstance(err, CliError) else traceback.format_exc()))


def _loop(variant: Variant | None, device: torch.device, images: int, epochs: int, sync: bool):
    from cifar_bp.benchmark.loops import EngineLoop, TutorialLoop

    if variant is None:
        return PeakLoop(device, peak_dtypes(device))
    loop_class = EngineLoop if variant.engine else TutorialLoop
    return loop_class(variant, synthetic_split(images, seed=0), device, epochs, sync)
