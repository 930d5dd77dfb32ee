"""Accuracy on the real CIFAR-10 training images, through the real CLI.

Unpacks the shared JPEG archive (once) outside the repository, then trains each recipe with
`data.source: folder` and 5,000 held-out validation images, and prints validation accuracy
and times read back from each run's TensorBoard events.

    python benchmarks/accuracy.py --archive ../shared/data/cifar10-jpeg-train.tar.gz
    python benchmarks/accuracy.py --root /tmp/cifar10-jpeg --only default,quick
    # a sweep on a GPU: variants of the default, two seeds each, eight runs at a time
    python benchmarks/accuracy.py --device cuda --jobs 8 --seeds 0,1 --only default \
        --try ls0=loss.label_smoothing=0 --try b64=train.batch_size=64,optim.lr=0.0015

Nothing derived from the archive is written inside the repository: the images, the decode
cache and the runs all live under --workdir (default: the system temp directory).
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


def train(name: str, seed: int, data_root: Path, args: argparse.Namespace) -> dict[str, float]:
    config, extra = RECIPES[name]
    logdir = args.workdir / "runs"
    run_name = f"{name.replace('+', '-').replace('=', '-')}-s{seed}-{time.strftime('%H%M%S')}"
    sets = ["data.source=folder", f"data.root={data_root}", "data.val_size=5000",
            f"data.cache_dir={args.workdir / 'cache'}", f"train.device={args.device}",
            f"train.seed={seed}", *args.sets, *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "cifar_bp", "train", "--config", str(ROOT / config), "-q",
           "--logdir", str(logdir), "--run-name", run_name]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    started = time.perf_counter()
    # Parallel jobs keep quiet; a failed run's own error still reaches stderr.
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL if args.jobs > 1 else None)
    wall = time.perf_counter() - started
    return summarize(logdir / run_name, wall)


def effective_seed(seed: int, sets: list[str]) -> int:
    """The train.seed a run gets: a --set or --try item of it wins over --seeds."""
    for item in reversed(sets):
        key, _, value = item.partition("=")
        if key.strip() == "train.seed":  # anything but digits is the CLI's to refuse
            return int(value) if value.strip().isdigit() else seed
    return seed


def add_variants(tries: list[str]) -> list[str]:
    """`--try NAME=KEY=VALUE,KEY=VALUE`: the default recipe with those --set items, as NAME."""
    names = []
    for item in tries:
        name, _, sets = item.partition("=")
        if not name or "=" not in sets:
            sys.exit(f"--try {item!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
        RECIPES[name] = ("configs/default.yaml", sets.split(","))
        names.append(name)
    return names


def prime_cache(data_root: Path, workdir: Path) -> None:
    """Decode the images once, before parallel runs would each decode them."""
    from cifar_bp.config import DataConfig
    from cifar_bp.folder import load_folder

    load_folder(DataConfig(source="folder", root=str(data_root), cache_dir=str(workdir / "cache")))


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
        help="an extra --set for every run, e.g. train.amp=false (repeatable; a recipe's or "
        "--try's own items win)",
    )  # fmt: skip
    parser.add_argument("--try", dest="tries", action="append", default=[],
                        help="NAME=KEY=VALUE[,KEY=VALUE...]: a variant of the default recipe "
                        "(repeatable; runs after --only's recipes)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="train.device for every run")
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (for a GPU)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data_root = args.root or unpack(args.archive, args.workdir)
    names = [n for n in args.only.split(",") if n] + add_variants(args.tries)
    seeds = [int(s) for s in args.seeds.split(",")]
    # One run per recipe and seed it really trains with (a --try may fix train.seed).
    runs = list(dict.fromkeys((n, effective_seed(s, [*args.sets, *RECIPES[n][1]]))
                              for n, s in itertools.product(names, seeds)))  # fmt: skip
    if args.jobs > 1:
        prime_cache(data_root, args.workdir)

    def one(run: tuple[str, int]) -> tuple[str, int, dict[str, float]]:
        print(f"training {run[0]} (seed {run[1]}) ...", flush=True)
        try:
            result = train(*run, data_root, args)
        except subprocess.CalledProcessError as err:  # one failed run must not hide the rest
            print(f"{run[0]} (seed {run[1]}) failed: exit {err.returncode}", flush=True)
            return (*run, {})
        print(f"{run[0]} (seed {run[1]}): val {result['val_accuracy']:.4f}", flush=True)
        return (*run, result)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = [row for row in pool.map(one, runs) if row[2]]
    columns = ("recipe", "seed", "epochs", "val acc", "live", "best", "train s", "wall s")
    width = max(14, *(len(n) + 2 for n in names))
    print("\n" + f"{columns[0]:<{width}}" + "".join(f"{c:>9}" for c in columns[1:]))
    for name, seed, r in rows:
        cells = [seed, r["epochs"], *(f"{r[k]:.4f}" for k in ACCURACIES),
                 *(f"{r[k]:.1f}" for k in TIMES)]  # fmt: skip
        print(f"{name:<{width}}" + "".join(f"{c:>9}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
