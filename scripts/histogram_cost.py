"""What the weight and gradient histograms cost, as a share of a training epoch on this CPU.

At the default (log.histograms_every_n_steps: 0) a run writes them once per epoch. This
times the real training step of configs/default.yaml (the default batch size, on synthetic
images of CIFAR-10's shape) and the real `Tracker.histograms` call, and prints

    histograms once per epoch = H ms / (S ms per step x N steps) = P % of an epoch

    python scripts/histogram_cost.py [--steps 40] [--repeats 20]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from cifar_bp.config import resolve_config
from cifar_bp.data import DeviceLoader, load_dataset
from cifar_bp.distributed import World
from cifar_bp.engine import Meters, train_step
from cifar_bp.hardware import choose_hardware
from cifar_bp.setup import build_machinery
from cifar_bp.tracking import Tracker

CIFAR_TRAIN_IMAGES = 50_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps timed")
    parser.add_argument("--repeats", type=int, default=20, help="histogram calls timed")
    args = parser.parse_args()
    batch = resolve_config(None, {}, []).train.batch_size
    images = batch * (args.steps + 10)  # synthetic images of CIFAR-10's shape: no download
    sets = ["data.source=synthetic", f"data.train_size={images}", "data.test_size=64"]
    cfg = resolve_config(None, {"device": "cpu"}, sets)
    world = World(rank=0, size=1, local_rank=0)
    hardware = choose_hardware(cfg, world)
    device = hardware.device
    data = load_dataset(cfg.data, cfg.train.seed)
    loader = DeviceLoader(data.train, cfg.data, cfg.train.batch_size, device, train=True, seed=0)
    per_epoch = math.ceil(CIFAR_TRAIN_IMAGES / cfg.train.batch_size)
    m = build_machinery(cfg, hardware, world, per_epoch)
    meters = Meters(device)
    batches = iter(loader.epoch(0))
    for _ in range(10):  # warm-up: first-call allocations and kernel choice
        train_step(m, *next(batches), meters)
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step(m, *next(batches), meters)
    step_s = (time.perf_counter() - started) / args.steps
    named = list(m.plain.named_parameters())
    with tempfile.TemporaryDirectory() as folder:
        tracker = Tracker(Path(folder), purge_step=1)
        tracker.histograms(named, 0)  # warm-up
        started = time.perf_counter()
        for i in range(args.repeats):
            tracker.histograms(named, i + 1)
        hist_s = (time.perf_counter() - started) / args.repeats
        figures_s = time_figures(tracker, [n for n, _ in named])
        tracker.close()
    epoch_s = step_s * per_epoch
    print(f"config: configs/default.yaml on {device} (batch {cfg.train.batch_size}, "
          f"{per_epoch} steps an epoch, {torch.get_num_threads()} threads)")  # fmt: skip
    print(f"the epoch's two figures (gradient flow, confusion matrix) = {figures_s * 1e3:.0f} ms "
          f"= {100 * figures_s / epoch_s:.3f} % of an epoch")  # fmt: skip
    share = 100 * hist_s / epoch_s
    print(f"histograms once per epoch = {hist_s * 1e3:.1f} ms / ({step_s * 1e3:.1f} ms per step "
          f"x {per_epoch} steps = {epoch_s:.1f} s) = {share:.3f} % of an epoch")  # fmt: skip


def time_figures(tracker: Tracker, names: list[str]) -> float:
    """One gradient-flow figure and one confusion matrix, drawn and written (after a warm-up
    that imports matplotlib)."""
    matrix = [[50 if i == j else 3 for j in range(10)] for i in range(10)]
    classes = tuple(str(i) for i in range(10))
    values = [1e-3 * (i + 1) for i in range(len(names))]
    tracker.gradient_flow(names, values, values, 0)
    started = time.perf_counter()
    tracker.gradient_flow(names, values, [10 * v for v in values], 1)
    tracker.confusion("test", matrix, classes, 1)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
