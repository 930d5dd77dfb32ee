"""Throughput: the tutorial's training loop against this engine, side by side, on one machine.

Every variant trains the reference net on the same in-memory synthetic CIFAR-sized images,
in a process of its own (its peak memory is then its own), taking turns epoch by epoch: one
untimed warm-up epoch each (compilation, cuDNN autotuning, caches), then `repeats` timed
epochs each, of which the median images/s is the variant's figure.

(a) is what a user of the tutorial would write: a Dataset returning a PIL image per index,
`ToTensor`, a `DataLoader`, a float32 NCHW model and `loss.item()` every step.
(b) is `cifar-bp train`'s own loop (DeviceLoader + train_step) at the tutorial's batch of 64
in float32, with configs/default.yaml's data recipe (normalization and augmentation: more
work per image than (a) does). (c) is the engine with the fastest settings for the device.
The engine variants take the tutorial's optimizer (plain SGD, lr 0.01, no schedule, no
weight average), so every variant does the same arithmetic per step and the figures
compare the loops, not the optimizers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import nn

from cifar_bp.config import resolve_config
from cifar_bp.data import DeviceLoader, Split, synthetic_split
from cifar_bp.distributed import World
from cifar_bp.engine import Meters, resolve_device, train_step
from cifar_bp.errors import CliError, UsageError
from cifar_bp.model import ReferenceNet
from cifar_bp.trainer import build_machinery, pick_device

TUTORIAL_BATCH = 64  # images per step in the tutorial's DataLoader
TUTORIAL_LR = 0.01  # the tutorial's SGD step size
# Images per variant when --images is not given: enough for several seconds per timed epoch.
DEFAULT_IMAGES = {"cpu": 4096, "cuda": 16384}


@dataclass(frozen=True)
class Variant:
    """One way to train: the tutorial's loop, or the engine with these settings."""

    key: str
    label: str
    batch_size: int = 64  # images per step
    engine: bool = True
    channels_last: bool = True
    amp_dtype: str | None = None  # "bfloat16" or "float16" autocast; None = float32
    compile: bool = False

    def overrides(self) -> list[str]:
        """The `--set` items that give `cifar-bp train` these settings."""
        sets = {"train.batch_size": self.batch_size, "model.channels_last": self.channels_last,
                "train.amp": self.amp_dtype is not None, "train.compile": self.compile,
                "optim.name": "sgd", "optim.lr": TUTORIAL_LR, "optim.momentum": 0.0,
                "optim.nesterov": False, "optim.scheduler": "none", "train.ema_decay": "null",
                "train.eval_flip": False}  # fmt: skip
        if self.amp_dtype:
            sets["train.amp_dtype"] = self.amp_dtype
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items()]

    def describe(self) -> str:
        """Short enough for a table cell: loop, precision, layout, compile."""
        precision = {None: "fp32", "bfloat16": "bf16", "float16": "fp16+scaler"}[self.amp_dtype]
        layout = "NHWC" if self.channels_last else "NCHW"
        loop = "engine" if self.engine else "tutorial"
        return f"{loop} {precision} {layout}" + (" compiled" if self.compile else "")


# The fastest engine settings per device type; `--variants b,nchw,bs256,bf16,compile`
# re-measures each setting's effect on another machine.
FAST = {
    # An idle 2-core AMD EPYC without avx512_bf16, 2 threads: fp32 channels_last ~820-840 img/s
    # at every batch size, NCHW ~700, bf16 autocast ~45-87 (emulated), torch.compile ~695 after
    # 15-30 s of compiling. So configs/default.yaml (batch 64, fp32, channels_last) is fastest.
    "cpu": Variant("c", "fastest for the CPU", batch_size=64),
    # Tensor cores: bf16 autocast (fp32's exponent range, so no GradScaler), NHWC for cuDNN,
    # and a batch large enough to keep the GPU busy between kernel launches.
    "cuda": Variant("c", "fastest for the GPU", batch_size=512, amp_dtype="bfloat16"),
}


def catalogue(device_type: str, compile_fast: bool = False) -> dict[str, Variant]:
    """(a), (b), (c), and variants that change one setting of (b), for searching (c)."""
    fast = FAST[device_type]
    return {
        "a": Variant("a", "tutorial loop", TUTORIAL_BATCH, engine=False, channels_last=False),
        "b": Variant("b", "engine, as train runs it", TUTORIAL_BATCH),
        "c": replace(fast, compile=fast.compile or compile_fast),
        "nchw": Variant("nchw", "(b) in NCHW", channels_last=False),
        "bs256": Variant("bs256", "(b) at batch 256", batch_size=256),
        "bs1024": Variant("bs1024", "(b) at batch 1024", batch_size=1024),
        "bf16": Variant("bf16", "(b) in bf16", amp_dtype="bfloat16"),
        "fp16": Variant("fp16", "(b) in fp16 (CUDA only)", amp_dtype="float16"),
        "compile": Variant("compile", "(b) compiled", compile=True),
    }


@dataclass
class BenchOptions:
    device: str = "auto"
    images: int | None = None  # synthetic images per variant; None = DEFAULT_IMAGES
    repeats: int = 5  # timed epochs per variant, after one warm-up epoch
    variants: list[str] = field(default_factory=lambda: ["a", "b", "c"])
    compile_fast: bool = False  # add torch.compile to (c)
    sync_debug: bool = False  # CUDA: count host syncs inside the timed steps of engine variants


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Measure the chosen variants side by side; ratios are to (a) when it ran."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", opts.device):
        raise UsageError(f"--device {opts.device}: use auto, cpu, cuda or cuda:N")
    device = resolve_device(opts.device)
    table = catalogue(device.type, opts.compile_fast)
    keys = list(dict.fromkeys(key.strip() for key in opts.variants if key.strip()))
    if not keys or any(key not in table for key in keys):
        raise UsageError(f"--variants {','.join(opts.variants)}: choose from {', '.join(table)}")
    if (opts.images is not None and opts.images < 1) or opts.repeats < 1:
        raise UsageError("--images and --repeats must be at least 1")
    images = opts.images or DEFAULT_IMAGES[device.type]
    load_before = os.getloadavg()
    epochs = opts.repeats + 1  # one warm-up epoch, then the timed ones
    jobs = {key: (table[key], str(device), images, epochs, opts.sync_debug) for key in keys}
    results, env = take_turns(jobs, opts.repeats)
    base = results["a"]["images_per_s"] if "a" in results else None
    for result in results.values():
        result["ratio"] = result["images_per_s"] / base if base else None
    return {
        **env,
        "images": images,
        "repeats": opts.repeats,
        "warmup_epochs": 1,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "variants": results,
    }


def take_turns(
    jobs: dict[str, tuple[Any, ...]], repeats: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each variant in its own spawned process, running one epoch at a time in turns.

    A fresh interpreter per variant makes its peak memory its own, counting all that a
    user's process would (torch included). Taking turns epoch by epoch, with a different
    variant first each round, spreads changes in the machine's load over all variants alike.
    """
    ctx = multiprocessing.get_context("spawn")
    conns: dict[str, Connection] = {}
    procs, finished = [], False
    try:
        for key, args in jobs.items():
            conns[key], child = ctx.Pipe()
            procs.append(ctx.Process(target=_worker, args=(child, *args), daemon=True))
            procs[-1].start()
        for key, conn in conns.items():
            _reply(key, conn)  # every variant is set up before any epoch is timed
        keys, runs = list(jobs), {key: [] for key in jobs}
        for turn in range(repeats + 1):  # turn 0 warms up
            for key in keys[turn % len(keys) :] + keys[: turn % len(keys)]:
                conns[key].send("epoch")
                rate = _reply(key, conns[key])
                runs[key] += [rate] if turn else []
        results, env = {}, {}
        for key, conn in conns.items():
            conn.send("done")
            results[key], env = _reply(key, conn)
            results[key].update(images_per_s=statistics.median(runs[key]))
            results[key]["runs_images_per_s"] = runs[key]
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
    conn: Connection, variant: Variant, device: str, images: int, epochs: int, sync_debug: bool
) -> None:
    """A variant's process: set up, answer one epoch's images/s per request, then a summary."""
    try:
        loop_class = EngineLoop if variant.engine else TutorialLoop
        loop = loop_class(
            variant, synthetic_split(images, seed=0), torch.device(device), epochs, sync_debug
        )
        conn.send(("ok", None))
        epoch = 0
        while conn.recv() == "epoch":
            conn.send(("ok", loop.epoch(epoch)))
            epoch += 1
        summary = {**asdict(variant), "settings": variant.describe(), **loop.summary()}
        summary["overrides"] = variant.overrides() if variant.engine else None
        conn.send(("ok", (summary, environment(loop.device))))
    except KeyboardInterrupt:  # Ctrl-C reaches every process; the parent reports it
        pass
    except Exception as err:
        conn.send(("error", err if isinstance(err, CliError) else traceback.format_exc()))


class EngineLoop:
    """`cifar-bp train`'s loop with configs/default.yaml plus the variant's overrides, its
    lr schedule spread over the `epochs` benchmarked.

    The meters are read back once per epoch (train also reads them every
    log.every_n_steps steps: one small copy) and nothing is written to TensorBoard.
    """

    def __init__(
        self, variant: Variant, split: Split, device: torch.device, epochs: int, sync: bool
    ) -> None:
        flags = {"device": str(device), "epochs": epochs}
        cfg = resolve_config(None, flags, variant.overrides())
        self.device = pick_device(cfg, World())
        self.loader = DeviceLoader(
            split, cfg.data, cfg.train.batch_size, self.device, train=True, seed=cfg.train.seed,
            channels_last=cfg.model.channels_last,
        )  # fmt: skip
        self.m = build_machinery(cfg, self.device, World(), len(self.loader))
        self.meters = Meters(self.device)
        self.sync_debug, self.syncs = sync and self.device.type == "cuda", 0

    def epoch(self, index: int) -> float:
        """One epoch's images/s; host syncs are counted from the second epoch on."""
        started, seen = time.perf_counter(), 0
        batches = self.loader.epoch(index, first_global_step=index * len(self.loader))
        with sync_watch(self.sync_debug and index > 0) as caught:
            for images, labels in batches:
                train_step(self.m, images, labels, self.meters)
                seen += len(labels)
        self.meters.read()  # the epoch's read-back; it also waits for the device to finish
        self.syncs += len(caught)
        return seen / (time.perf_counter() - started)

    def summary(self) -> dict[str, Any]:
        syncs = self.syncs if self.sync_debug else None
        return {"steps_per_epoch": len(self.loader), "host_syncs": syncs, **memory(self.device)}


class TutorialImages(torch.utils.data.Dataset):
    """Like torchvision's CIFAR10: HWC uint8 arrays, one PIL image per index, then ToTensor."""

    def __init__(self, split: Split) -> None:
        from PIL import Image
        from torchvision.transforms import ToTensor

        self.data = split.images.permute(0, 2, 3, 1).numpy()
        self.targets = split.labels.tolist()
        self.to_image, self.transform = Image.fromarray, ToTensor()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.to_image(self.data[index])), self.targets[index]


class TutorialLoop:
    """The tutorial's loop as written there: no workers, no pinning, a host sync per step."""

    def __init__(
        self, variant: Variant, split: Split, device: torch.device, epochs: int, sync: bool
    ) -> None:
        torch.manual_seed(0)
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            TutorialImages(split), batch_size=variant.batch_size, shuffle=True
        )
        self.model = ReferenceNet().to(device)
        self.loss_fn = nn.CrossEntropyLoss().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=TUTORIAL_LR)

    def epoch(self, index: int) -> float:
        started, seen = time.perf_counter(), 0
        for imgs, targets in self.loader:
            imgs, targets = imgs.to(self.device), targets.to(self.device)
            loss = self.loss_fn(self.model(imgs), targets)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss.item()  # the tutorial reads the loss back every step
            seen += len(targets)
        return seen / (time.perf_counter() - started)

    def summary(self) -> dict[str, Any]:
        return {"steps_per_epoch": len(self.loader), "host_syncs": None, **memory(self.device)}


@contextmanager
def sync_watch(enabled: bool) -> Iterator[list[warnings.WarningMessage]]:
    """Collect CUDA's warnings about synchronizing operations while enabled (else nothing).

    The first batch of an epoch uploads the epoch's order from the host: one sync per epoch.
    """
    caught: list[warnings.WarningMessage] = []
    if not enabled:
        yield caught
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")
    caught.extend(w for w in seen if "synchroniz" in str(w.message))


def memory(device: torch.device) -> dict[str, float | None]:
    """Peak memory of this process: resident (Linux reports KiB, macOS bytes) and CUDA's."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": rss / 2**10 if sys.platform == "darwin" else rss, "peak_cuda_mb": cuda}


def environment(device: torch.device) -> dict[str, Any]:
    cpu_name, cpu_flags = _cpu()
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name,
        "cpu_native_bf16": bool(cpu_flags & {"avx512_bf16", "amx_bf16"}),
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def _cpu() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags, from /proc/cpuinfo where there is one."""
    fields: dict[str, str] = {}
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    return name, set(fields.get("flags", "").split())


def print_benchmark(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from cifar_bp.report import console, table

    cuda = report["device"].startswith("cuda")
    syncs = any(v["host_syncs"] is not None for v in report["variants"].values())
    columns = ["", "settings", "batch", "img/s", "range", "× (a)", "RSS MB"]
    columns += ["CUDA MB"] * cuda + ["host syncs"] * syncs
    rows = [_row(key, v, cuda, syncs, report["repeats"]) for key, v in report["variants"].items()]
    title = "Training throughput (median images/s), peak memory; one process per variant"
    console.print(table(title, columns, rows))
    console.print(_environment_line(report), soft_wrap=True)
    fast = report["variants"].get("c")
    if fast:
        sets = " ".join(f"--set {item}" for item in fast["overrides"])
        console.print(f"(c) in a run: cifar-bp train {sets}", soft_wrap=True)


def _row(key: str, v: dict[str, Any], cuda: bool, syncs: bool, repeats: int) -> list[str]:
    runs = v["runs_images_per_s"]
    row = [
        key, v["settings"], str(v["batch_size"]), f"{v['images_per_s']:,.0f}",
        f"{min(runs):,.0f}-{max(runs):,.0f}",
        f"{v['ratio']:.2f}×" if v["ratio"] is not None else "-", f"{v['peak_rss_mb']:,.0f}",
    ]  # fmt: skip
    if cuda:
        row.append(f"{v['peak_cuda_mb']:,.0f}")
    if syncs:
        n = v["host_syncs"]
        row.append("-" if n is None else f"{n}/{v['steps_per_epoch'] * repeats} steps")
    return row


def _environment_line(r: dict[str, Any]) -> str:
    load = {t: " ".join(f"{x:.2f}" for x in r["load_average"][t]) for t in ("before", "after")}
    return (
        f"{r.get('gpu') or r['cpu']} ({r['device']}), {r['threads']} threads, CPU native bf16: "
        f"{'yes' if r['cpu_native_bf16'] else 'no'}; torch {r['torch']}, torchvision "
        f"{r['torchvision']}, python {r['python']}. {r['images']} images per variant, 1 warm-up "
        f"+ {r['repeats']} timed epochs each, in turns. Load average (1, 5, 15 min) before: "
        f"{load['before']}, after: {load['after']}"
    )
