"""Shared test helpers: run the real CLI and read back real TensorBoard event files."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from cifar_bp.cli import app

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
# A run of two steps an epoch: smoke.yaml on 128 images, scored on 64.
TINY = ["-c", str(SMOKE), "-q", "--set", "data.train_size=128", "--set", "data.test_size=64"]


class Cli:
    """`cli("train", ...)` runs the real Typer app in-process and returns Click's Result."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, env: dict[str, str] | None = None):
        return self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a run directory, as (step, value) pairs."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def only_run(logdir: Path) -> Path:
    runs = [p for p in logdir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def smoke_scalars(
    cli: Cli, logdir: Path, *args: str, sets: tuple[str, ...] = ()
) -> dict[str, list[tuple[int, float]]]:
    """`train --config configs/smoke.yaml --logdir LOGDIR -q ARGS --set S...`, which must
    succeed, and the one run's scalar series."""
    flags = [flag for item in sets for flag in ("--set", item)]
    result = cli("train", "--config", SMOKE, "--logdir", logdir, "-q", *args, *flags)
    assert result.exit_code == 0, result.stderr
    return scalars(only_run(logdir))


def train_run(logdir: Path, name: str, *args: str) -> Path:
    """`train ARGS --logdir LOGDIR --run-name NAME`, which must succeed; the run's folder."""
    result = Cli()("train", *args, "--logdir", logdir, "--run-name", name)
    assert result.exit_code == 0, result.stderr
    return logdir / name
