"""Accuracy on the real CIFAR-10 training images, through the real CLI.

Unpacks the shared JPEG archive (once) outside the repository, then trains each recipe with
`data.source: folder` and 5,000 held-out validation images, and prints validation accuracy
and times read back from each run's TensorBoard events.

    python benchmarks/accuracy.py --archive ../shared/data/cifar10-jpeg-train.tar.gz
    python benchmarks/accuracy.py --root /tmp/cifar10-jpeg --only default,quick

Nothing derived from the archive is written inside the repository: the images, the decode
cache and the runs all live under --workdir (default: the system temp directory).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
# name → (config file, extra --set items). val_size 5000 = the held-out validation split.
RECIPES = {
    "article": ("configs/article.yaml", []),
    # The tutorial's own budget (10 epochs), tuned for accuracy.
    "default": ("configs/default.yaml", []),
    # The 4-epoch recipe that fits about 4 minutes on a 2-core CPU.
    "quick": ("configs/quick.yaml", []),
    # Beyond the tutorial: a ReLU after each conv and linear1, on the 4-epoch recipe.
    "quick+relu": ("configs/quick.yaml", ["model.activation=relu"]),
}
# Columns of the printed table, after the recipe name and the epoch count.
ACCURACIES = ("val_accuracy", "live_accuracy", "best_val_accuracy")
TIMES = ("train_seconds", "wall_seconds")


def unpack(archive: Path, workdir: Path) -> Path:
    root = workdir / "cifar10-jpeg"
    if not (root / "train").is_dir():
        print(f"unpacking {archive} into {root} ...", flush=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    return root


def train(name: str, data_root: Path, workdir: Path, more: list[str]) -> dict[str, float]:
    config, extra = RECIPES[name]
    logdir = workdir / "runs"
    run_name = f"{name.replace('+', '-')}-{time.strftime('%H%M%S')}"
    sets = ["data.source=folder", f"data.root={data_root}", "data.val_size=5000",
            f"data.cache_dir={workdir / 'cache'}", "train.device=cpu", *extra, *more]  # fmt: skip
    cmd = [sys.executable, "-m", "cifar_bp", "train", "--config", str(ROOT / config), "-q",
           "--logdir", str(logdir), "--run-name", run_name]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    return summarize(logdir / run_name, wall)


def summarize(run_dir: Path, wall: float) -> dict[str, float]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()

    def series(tag: str) -> list[float]:
        return [e.value for e in acc.Scalars(tag)]

    val = series("val/accuracy")
    tags = acc.Tags()["scalars"]
    live = series("val/accuracy_live") if "val/accuracy_live" in tags else [float("nan")]
    return {
        "epochs": len(val),
        "val_accuracy": val[-1],
        "live_accuracy": live[-1],  # with a weight average: the live weights' accuracy
        "best_val_accuracy": max(val),
        "train_seconds": sum(series("train/epoch_seconds")),
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archive", type=Path, default=ROOT.parent / "shared/data/cifar10-jpeg-train.tar.gz"
    )
    parser.add_argument("--root", type=Path, help="an already unpacked folder (has train/)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cifar-bp-accuracy"
    )
    parser.add_argument("--only", default=",".join(RECIPES), help="comma-separated recipes")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[],
        help="an extra --set for every recipe, e.g. train.amp=false (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data_root = args.root or unpack(args.archive, args.workdir)
    rows = []
    for name in args.only.split(","):
        print(f"training {name} ...", flush=True)
        rows.append((name, train(name, data_root, args.workdir, args.sets)))
    columns = ("recipe", "epochs", "val acc", "live", "best", "train s", "wall s")
    print("\n" + f"{columns[0]:<14}" + "".join(f"{c:>9}" for c in columns[1:]))
    for name, r in rows:
        cells = [r["epochs"], *(f"{r[k]:.4f}" for k in ACCURACIES), *(f"{r[k]:.1f}" for k in TIMES)]
        print(f"{name:<14}" + "".join(f"{c:>9}" for c in cells))


if __name__ == "__main__":
    main()
