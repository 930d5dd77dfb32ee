"""`cifar-bp lr-find`: a real sweep on the smoke config, read back from its event files."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from tests.helpers import SMOKE, Cli, scalars

FAST = ("-c", SMOKE, "--batch-size", "16")  # a tiny batch: each step costs milliseconds


def sweep_dirs(logdir: Path) -> list[Path]:
    return sorted(p for p in logdir.iterdir() if p.name.startswith("lr-find-"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """A 30-step sweep into a logdir that already holds a training run."""
    logdir = tmp_path_factory.mktemp("runs")
    existing = logdir / "my-run"
    existing.mkdir()
    (existing / "last.pt").write_bytes(b"precious")
    result = Cli()("lr-find", *FAST, "--steps", "30", "--logdir", logdir, "--json")
    assert result.exit_code == 0, result.output
    return logdir, json.loads(result.stdout), existing


def test_sweep_is_exponential_and_logged(sweep: tuple[Path, dict, Path]) -> None:
    logdir, report, existing = sweep
    (run_dir,) = sweep_dirs(logdir)
    assert report["run_dir"] == str(run_dir)
    assert sorted(p.name for p in existing.iterdir()) == ["last.pt"]
    assert (existing / "last.pt").read_bytes() == b"precious"
    lrs, n = report["lrs"], len(report["lrs"])
    assert 5 <= n <= 30
    assert lrs[0] == pytest.approx(1e-6)
    ratio = (1.0 / 1e-6) ** (1 / 29)
    assert all(b / a == pytest.approx(ratio, rel=1e-9) for a, b in itertools.pairwise(lrs))
    logged = scalars(run_dir)
    for tag in ("lr_find/loss", "lr_find/lr", "lr_find/raw_loss"):
        assert [step for step, _ in logged[tag]] == list(range(n))
        assert all(math.isfinite(value) for _, value in logged[tag])
    assert [v for _, v in logged["lr_find/lr"]] == pytest.approx(lrs, rel=1e-6)
    assert [v for _, v in logged["lr_find/loss"]] == pytest.approx(report["smoothed"], rel=1e-5)
    assert json.loads((run_dir / "lr_find.json").read_text()) == report


def test_smoothing_is_a_bias_corrected_ema(sweep: tuple[Path, dict, Path]) -> None:
    _, report, _ = sweep
    beta, average = report["smoothing_beta"], 0.0
    for i, (loss, smooth) in enumerate(zip(report["losses"], report["smoothed"], strict=True)):
        average = beta * average + (1 - beta) * loss
        assert smooth == pytest.approx(average / (1 - beta ** (i + 1)), rel=1e-9)


def test_suggestion(sweep: tuple[Path, dict, Path]) -> None:
    _, report, _ = sweep
    assert report["rule"] == "steepest descent of the smoothed loss"
    suggestion, lrs, smoothed = report["suggestion"], report["lrs"], report["smoothed"]
    assert 1e-6 <= suggestion <= 1.0 and suggestion in lrs
    low = smoothed.index(min(smoothed))
    assert lrs.index(suggestion) < low  # never the minimum itself: the edge of divergence
    assert report["min_lr"] == lrs[low]


def test_diverging_sweep_stops_early(sweep: tuple[Path, dict, Path], tmp_path: Path) -> None:
    result = Cli()("lr-find", *FAST, "--steps", "30", "--end-lr", "1e4", "--logdir", tmp_path)
    assert result.exit_code == 0, result.output
    (run_dir,) = sweep_dirs(tmp_path)
    report = json.loads((run_dir / "lr_find.json").read_text())
    n = len(report["lrs"])
    assert n < 30 and report["stopped"]
    assert f"stopped after {n} of 30 steps: " in result.stdout
    smoothed = report["smoothed"]
    if "non-finite" not in report["stopped"]:
        assert smoothed[-1] > 4 * min(smoothed) and all(
            s <= 4 * min(smoothed[:-1]) for s in smoothed[:-1]
        )
    assert all(math.isfinite(v) for _, v in scalars(run_dir)["lr_find/loss"])
    assert "LR range test" in result.stdout and f"written to {run_dir}" in result.stdout
    # Same seed, same first batches, same first lr: the same starting point as the fixture's.
    assert report["losses"][:2] == sweep[1]["losses"][:2]


def test_existing_run_name_is_refused(cli: Cli, tmp_path: Path) -> None:
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "events.out.tfevents.1").write_bytes(b"old")
    result = cli("lr-find", *FAST, "--steps", "5", "--logdir", tmp_path, "--run-name", "taken")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {existing} already exists: lr-find never writes into an existing folder; "
        "choose another --run-name\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert [p.name for p in existing.iterdir()] == ["events.out.tfevents.1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--start-lr", "1", "--end-lr", "0.1"), "need 0 < start < end"),
        (("--steps", "2"), "--steps must be between 3 and 10000, got 2"),
    ],
)
def test_bad_options(cli: Cli, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = cli("lr-find", *FAST, *args, "--logdir", tmp_path)
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
