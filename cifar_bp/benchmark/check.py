"""The GPU check behind benchmarks/gpu_check.sh: the benchmark's variants, `cifar-bp train`'s
default path timed epoch by epoch with its evaluation, and the targets, in one table.

    python -m cifar_bp.benchmark.check --device cuda       # what gpu_check.sh runs

It exits 1 when the host waits for the GPU inside a training step (torch's CUDA sync debug
mode, from the loader making the batch to the end of train_step), naming the line that did:
in any variant (a few untimed steps; float16's GradScaler included), or anywhere in the
real trainer's steps. Each part is printed as it ends, so a run stopped by its time limit
keeps its figures.
The targets are printed next to the figures, not enforced: a miss is a finding, not a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from cifar_bp.benchmark.report import WIDE
from cifar_bp.benchmark.runner import BenchOptions, run_benchmark

TARGET_IMAGES_PER_S = 200_000  # training images/s at the fastest batch size (one H100)
TARGET_RATIO = 30.0  # × the tutorial loop (a) on the same GPU
TARGET_EPOCH_S = 0.5  # one 50,000-image epoch with its evaluation, after warm-up
# compile@512 against b@512: whether compiling pays once the batch is large.
VARIANTS = "a,b,c,d,compile,fp16,c@2048,c@8192,d@512,b@512,compile@512"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    opts = BenchOptions(args.device, args.images, args.repeats, args.variants.split(","),
                        sync_debug=True)  # fmt: skip
    report = run_benchmark(opts)
    print_check(report, [])  # each part as it ends: a run cut short by its time limit keeps it
    trains = []
    for batch in args.train_batches:
        trains.append(train_epochs(device, batch, args))
        print_train(trains[-1])
    print_check(report, trains)
    print(f"total {time.perf_counter() - started:.0f} s")
    return sync_verdict(report, trains)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cifar_bp.benchmark.check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default=VARIANTS)
    # 25,000 images × 2 timed epochs: the whole check fits in about 4 minutes on one H200.
    p.add_argument("--images", type=int, default=25_000, help="synthetic images per variant")
    p.add_argument("--repeats", type=int, default=2, help="timed epochs per variant")
    p.add_argument("--train-size", type=int, default=50_000)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--train-epochs", type=int, default=3, help="the first one warms up")
    p.add_argument("--train-batches", type=int, nargs="+", default=[64, 512, 4096])
    return p.parse_args(argv)


class EpochClock:
    """A train Reporter that times each epoch from its start to the end of its evaluation."""

    def __init__(self) -> None:
        self.started, self.seconds, self.train_seconds, self.eval_seconds = 0.0, [], [], []

    def note(self, message: str) -> None:
        print(message, flush=True)

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.started = time.perf_counter()

    def progress(self, done: int, loss: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        # Evaluation, the checkpoint and the TensorBoard flush all happen before this call.
        self.seconds.append(time.perf_counter() - self.started)
        self.train_seconds.append(metrics["train/epoch_seconds"])  # the steps alone
        self.eval_seconds.append(sum(v for k, v in metrics.items() if k.endswith("/eval_seconds")))


def train_epochs(device: torch.device, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """`cifar-bp train` with configs/default.yaml (precision and compile on auto) on
    synthetic images, in this process, through the real trainer."""
    from cifar_bp.config import resolve_config
    from cifar_bp.hardware import resolve_auto
    from cifar_bp.trainer import train

    # Evaluation batches at least as large as the training ones: the default's 6 test-time
    # views of 10,000 images, scored for two weight sets, are 120 forward passes at 1,000.
    sets = [f"data.train_size={args.train_size}", f"data.test_size={args.test_size}",
            "data.source=synthetic", "log.histograms=false",
            f"train.eval_batch_size={max(1000, batch)}"]  # fmt: skip
    syncs: list[str] = []
    with tempfile.TemporaryDirectory() as logdir, watched_trainer(device, syncs):
        flags = {"device": str(device), "epochs": args.train_epochs, "logdir": logdir,
                 "batch_size": batch}  # fmt: skip
        cfg = resolve_config(None, flags, sets)
        resolved, lines = resolve_auto(cfg)
        clock = EpochClock()
        wall = time.perf_counter()
        result = train(cfg, clock)
        wall = time.perf_counter() - wall
    warm = clock.seconds[1:] or clock.seconds
    warm_train = clock.train_seconds[1:] or clock.train_seconds
    warm_eval = clock.eval_seconds[1:] or clock.eval_seconds
    return {
        "batch_size": batch, "resolved": lines, "wall_s": wall, "settings": settings(resolved),
        "first_epoch_s": clock.seconds[0], "epoch_with_eval_s": statistics.median(warm),
        "steps_s": statistics.median(warm_train), "eval_s": statistics.median(warm_eval),
        "images_per_s": args.train_size / statistics.median(warm_train),
        "first_images_per_s": args.train_size / clock.train_seconds[0],
        "test_accuracy": result.metrics.get("test/accuracy"),
        "host_syncs": len(syncs) if device.type == "cuda" else None, "first_sync": syncs[:1],
        "steps": result.global_step,
    }  # fmt: skip


@contextlib.contextmanager
def watched_trainer(device: torch.device, found: list[str]) -> Iterator[None]:
    """The real trainer, with CUDA's sync debug mode on from the loader making each training
    batch to the end of its train_step. Log points, evaluation and checkpoints read back by
    design and are not watched. On a CPU nothing is watched."""
    from cifar_bp import trainer
    from cifar_bp.benchmark.loops import sync_watch
    from cifar_bp.data import DeviceLoader

    if device.type != "cuda":
        yield
        return
    step, epoch = trainer.train_step, DeviceLoader.epoch

    def watched_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        with sync_watch() as caught:
            norms = step(*args, **kwargs)
        found.extend(caught)
        return norms

    def watched_epoch(self: DeviceLoader, *args: Any, **kwargs: Any) -> Iterator[Any]:
        batches = iter(epoch(self, *args, **kwargs))
        while True:
            with sync_watch() as caught:
                batch = next(batches, None)
            found.extend(caught if self.train else [])
            if batch is None:
                return
            yield batch

    trainer.train_step, DeviceLoader.epoch = watched_step, watched_epoch
    try:
        yield
    finally:
        trainer.train_step, DeviceLoader.epoch = step, epoch


def settings(cfg: Any) -> str:
    from cifar_bp.benchmark.loops import describe

    t = cfg.train
    precision = t.amp_dtype if t.amp else "float32"
    text = describe(True, precision, t.grad_scaler, cfg.model.channels_last, t.compile,
                    cfg.optim.name)  # fmt: skip
    return text.replace(" engine", "") + " (auto)"


def print_check(report: dict[str, Any], trains: list[dict[str, Any]]) -> None:
    from rich.console import Console

    from cifar_bp.benchmark.report import notes
    from cifar_bp.report import table

    out = Console(highlight=False, width=WIDE + 20)
    columns = ["variant", "settings", "batch", "img/s", "× (a)", "GFLOP/s", "% peak",
               "1st epoch img/s", "epoch+eval s", "host syncs", "target"]  # fmt: skip
    rows = [bench_row(key, v, report) for key, v in report["variants"].items()]
    rows += [train_row(t, trains) for t in trains]
    title = f"GPU check on {report.get('gpu') or report['cpu']}: one table, medians after warm-up"
    out.print(table(title, columns, rows))
    for line in notes(report):
        if " in a run: " not in line:  # the JSON of `cifar-bp bench` has the overrides
            out.print(line, soft_wrap=True)
    for t in trains:
        print_train(t)


def print_train(t: dict[str, Any]) -> None:
    print(f"train at batch {t['batch_size']}: " + "; ".join(t["resolved"]), flush=True)
    print(f"  its epoch: {epoch_parts(t)}", flush=True)


def epoch_parts(t: dict[str, Any]) -> str:
    """Where an epoch's time went (medians after warm-up), so a miss says what to fix."""
    rest = t["epoch_with_eval_s"] - t["steps_s"] - t["eval_s"]
    return (f"steps {t['steps_s']:.3f} s + evaluation {t['eval_s']:.3f} s + checkpoint, "
            f"TensorBoard and figures {rest:.3f} s = {t['epoch_with_eval_s']:.3f} s")  # fmt: skip


def bench_row(key: str, v: dict[str, Any], report: dict[str, Any]) -> list[str]:
    engines = [x for x in report["variants"].values() if x["engine"]]
    fastest = max(engines, key=lambda x: x["images_per_s"], default=None)
    target = ""
    if fastest is v:
        met = v["images_per_s"] >= TARGET_IMAGES_PER_S
        target = f"≥{TARGET_IMAGES_PER_S:,} img/s: {'met' if met else 'MISSED'}"
        if v["ratio"] is not None:
            met = v["ratio"] >= TARGET_RATIO
            target += f"; ≥{TARGET_RATIO:.0f}× (a): {'met' if met else 'MISSED'}"
    syncs = "-" if v["host_syncs"] is None else f"{v['host_syncs']} in {v['sync_steps']} steps"
    return [
        f"{key} {v['label']}", v["settings"], str(v["batch_size"]), f"{v['images_per_s']:,.0f}",
        "-" if v["ratio"] is None else f"{v['ratio']:.1f}×", f"{v['gflops']:,.0f}",
        f"{v['peak_share']:.1%}", f"{v['first_images_per_s']:,.0f}", "-", syncs, target,
    ]  # fmt: skip


def train_row(t: dict[str, Any], trains: list[dict[str, Any]]) -> list[str]:
    best = min(trains, key=lambda x: x["epoch_with_eval_s"])
    target = ""
    if best is t:
        met = t["epoch_with_eval_s"] < TARGET_EPOCH_S
        target = f"<{TARGET_EPOCH_S} s per epoch: {'met' if met else 'MISSED'}"
    return [
        "train: cifar-bp train", t["settings"], str(t["batch_size"]),
        f"{t['images_per_s']:,.0f}", "-", "-", "-", f"{t['first_images_per_s']:,.0f}",
        f"{t['epoch_with_eval_s']:.2f} (1st {t['first_epoch_s']:.1f})",
        "-" if t["host_syncs"] is None else f"{t['host_syncs']} in {t['steps']} steps", target,
    ]  # fmt: skip


def sync_verdict(report: dict[str, Any], trains: Sequence[dict[str, Any]] = ()) -> int:
    """1 when any watched step made the host wait, with or without a GradScaler: the fused
    SGD and Adam kernels and Muon take the scaler's found-inf flag on the device."""
    watched = [(f"train at batch {t['batch_size']}", t["host_syncs"], t["steps"],
                (t["first_sync"] or [None])[0]) for t in trains]  # fmt: skip
    watched += [(key, v["host_syncs"], v["sync_steps"], v["first_sync"])
                for key, v in report["variants"].items()]  # fmt: skip
    failed = False
    for name, syncs, steps, first in watched:
        if syncs:
            print(f"HOST SYNC INSIDE THE STEP: ({name}) {syncs} syncs in {steps} steps, "
                  f"first at {first}", file=sys.stderr)  # fmt: skip
            failed = True
    if report["device"].startswith("cuda") and not failed:
        print("sync check passed: no host sync inside a training step")
    return 1 if failed else 0


if __name__ == "__main__":  # the guard matters: the variants' processes re-import this file
    sys.exit(main())
