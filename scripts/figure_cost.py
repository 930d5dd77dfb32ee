"""What the per-epoch figures cost a training epoch, drawn in place or by the helper process.

Runs the real trainer (configs/default.yaml on synthetic images, TensorBoard histograms
off) twice per repeat, once with the figures drawn in place (what a CPU run does) and once
with the helper process (what a CUDA run does), and prints the median time each epoch
spent outside its training steps and its evaluation (figures, checkpoint and TensorBoard),
in the evaluation, and in the steps: on a CPU the helper draws on the cores the next
epoch's steps use.

    python scripts/figure_cost.py [--device cpu] [--train-size 4096] [--epochs 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from cifar_bp import setup
from cifar_bp.benchmark.check import EpochClock
from cifar_bp.config import resolve_config
from cifar_bp.tracking import Tracker
from cifar_bp.trainer import train


def overheads(
    device: str, background: bool, args: argparse.Namespace
) -> list[tuple[float, float, float]]:
    """(seconds outside the steps and the evaluation, of the evaluation, of the steps) for
    each epoch after the first."""

    def tracker(run_dir, purge_step, device):  # the real Tracker, drawing where asked
        return Tracker(run_dir, purge_step=purge_step, background_figures=background)

    setup.open_tracker = tracker
    sets = ["data.source=synthetic", f"data.train_size={args.train_size}",
            f"data.test_size={args.test_size}", "log.histograms=false"]  # fmt: skip
    with tempfile.TemporaryDirectory() as logdir:
        cfg = resolve_config(
            None, {"device": device, "epochs": args.epochs, "logdir": logdir}, sets
        )
        clock = EpochClock()
        clock.note = lambda message: None
        train(cfg, clock)
    parts = zip(clock.seconds[1:], clock.eval_seconds[1:], clock.train_seconds[1:], strict=True)
    return [(total - scoring - steps, scoring, steps) for total, scoring, steps in parts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=4, help="the first is left out")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, in turns")
    args = parser.parse_args()
    seen: dict[str, list[tuple[float, float, float]]] = {"in place": [], "helper process": []}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for name, background in (("in place", False), ("helper process", True)):
            seen[name] += overheads(args.device, background, args)
    for name, epochs in seen.items():
        outside, scoring, steps = ([e[i] * 1000 for e in epochs] for i in (0, 1, 2))
        print(f"figures drawn {name:>14}: {statistics.median(outside):6.0f} ms per epoch "
              f"outside the steps and the evaluation (range {min(outside):.0f}-"
              f"{max(outside):.0f}), evaluation {statistics.median(scoring):.0f} ms, steps "
              f"{statistics.median(steps):.0f} ms (median of {len(epochs)} epochs)")  # fmt: skip
    print(
        f"({args.train_size} synthetic images per epoch, {args.test_size} evaluated, "
        f"on {args.device}; {time.perf_counter() - started:.0f} s in all)"
    )


if __name__ == "__main__":
    main()
