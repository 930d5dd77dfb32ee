"""`cifar-bp lr-find`: a real sweep on the smoke config, read back from its event files."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_bp.config import resolve_config
from cifar_bp.lrfind import Sweep, SweepOptions, figure, run_sweep
from cifar_bp.report import QuietReporter, RichReporter
from cifar_bp.rundir import write_identity
from tests.helpers import ROOT, SMOKE, Cli, scalars

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
        (("--end-lr", "inf"), "--start-lr 1e-06 and --end-lr inf: both must be finite"),
        (("--start-lr", "-inf"), "--start-lr -inf and --end-lr 1: both must be finite"),
    ],
)
def test_bad_options(cli: Cli, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = cli("lr-find", *FAST, *args, "--logdir", tmp_path)
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("marker", ["run.json", "last.pt"])
@pytest.mark.parametrize("inside", [False, True])
def test_a_logdir_in_a_run_is_refused(cli: Cli, tmp_path: Path, marker: str, inside: bool) -> None:
    run = tmp_path / "runs" / "smoke"
    run.mkdir(parents=True)
    if marker == "run.json":
        write_identity(run, "0" * 32)
    else:
        (run / marker).write_bytes(b"weights")
    before = sorted(p.name for p in run.iterdir())
    logdir = run / "sub" if inside else run
    result = cli("lr-find", *FAST, "--steps", "5", "--logdir", logdir)
    assert result.exit_code == 2
    where = f"inside the run folder {run}" if inside else "a run folder"
    assert result.stderr == (
        f"error: --logdir {logdir} is {where} (it holds {marker}): lr-find never writes into "
        f"an existing run; give the folder that holds the runs, e.g. --logdir {run.parent}\n"
    )
    assert sorted(p.name for p in run.iterdir()) == before  # no sub, no lr-find-* folder


def test_logdir_dot_inside_a_run_names_the_real_parent(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_identity(tmp_path, "0" * 32)
    monkeypatch.chdir(tmp_path)
    result = cli("lr-find", *FAST, "--steps", "5", "--logdir", ".")
    assert result.exit_code == 2
    assert result.stderr.endswith(f"e.g. --logdir {tmp_path.parent}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


class Recorder(QuietReporter):
    def __init__(self) -> None:
        self.starts: list[tuple[int, ...]] = []
        self.calls: list[tuple[int, float]] = []

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.starts.append((epoch, epochs, steps, done))

    def progress(self, done: int, loss: float, images_per_s: float) -> None:
        assert images_per_s > 0
        self.calls.append((done, loss))


class LiveRecorder(Recorder, RichReporter):
    """A live bar's reporter, recording instead of drawing."""

    def __init__(self) -> None:
        Recorder.__init__(self)


def sweep_with(reporter: QuietReporter, logdir: Path, steps: int, end_lr: float) -> Sweep:
    cfg = resolve_config(SMOKE, {"batch_size": 16, "logdir": str(logdir)})
    return run_sweep(cfg, SweepOptions(end_lr=end_lr, steps=steps), reporter)


def test_progress_every_tenth_step_and_at_divergence(tmp_path: Path) -> None:
    recorder = Recorder()
    sweep = sweep_with(recorder, tmp_path, 30, 1e4)
    n = len(sweep.smoothed)
    assert sweep.stopped and n < 30
    assert recorder.starts == [(1, 1, 30, 0)]
    done = [d for d, _ in recorder.calls]
    assert done == [*range(3, n, 3), n]  # every 30 // 10 steps, and the last
    assert [loss for _, loss in recorder.calls] == [sweep.smoothed[d - 1] for d in done]


def test_a_live_bar_moves_every_step(tmp_path: Path) -> None:
    recorder = LiveRecorder()
    sweep = sweep_with(recorder, tmp_path, 6, 1e-4)
    assert [d for d, _ in recorder.calls] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in recorder.calls] == sweep.smoothed


def test_plain_progress_lines_and_quiet(cli: Cli, tmp_path: Path) -> None:
    loud = cli("lr-find", *FAST, "--steps", "20", "--end-lr", "1e-4", "--logdir", tmp_path / "a")
    assert loud.exit_code == 0, loud.output
    (run_dir,) = sweep_dirs(tmp_path / "a")
    smoothed = json.loads((run_dir / "lr_find.json").read_text())["smoothed"]
    lines = [line for line in loud.stdout.splitlines() if line.startswith("lr-find: ")]
    assert [line.split("  ")[:2] for line in lines] == [
        [f"lr-find: epoch 1/1 step {k}/20", f"loss {smoothed[k - 1]:.4f}"] for k in range(2, 21, 2)
    ]
    quiet = cli("lr-find", *FAST, "--steps", "20", "--end-lr", "1e-4", "-q",
                "--logdir", tmp_path / "b")  # fmt: skip
    assert quiet.exit_code == 0, quiet.output
    assert "lr-find: " not in quiet.stdout and "LR range test" in quiet.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_keeps_what_was_measured(tmp_path: Path, sig: int, code: int) -> None:
    # A sweep that cannot diverge (lr ≤ 1e-4) and runs long past the 10th step's line.
    cmd = [sys.executable, "-m", "cifar_bp", "lr-find", *map(str, FAST), "--steps", "100",
           "--end-lr", "1e-4", "--logdir", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "step 10/100" in line:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == code, err
    (run_dir,) = sweep_dirs(tmp_path)
    report = json.loads((run_dir / "lr_find.json").read_text())
    n = len(report["lrs"])
    assert 10 <= n < 100 and report["interrupted_by"] == name
    assert report["stopped"] == f"interrupted by {name}"
    assert f"stopped after {n} of 100 steps: interrupted by {name}" in out
    assert f"written to {run_dir} (the steps measured before the signal)" in out
    logged = scalars(run_dir)
    assert [v for _, v in logged["lr_find/loss"]] == pytest.approx(report["smoothed"], rel=1e-5)
    assert len(report["losses"]) == n and err == ""


def test_figure_shows_the_descent_not_the_spike(tmp_path: Path) -> None:
    lrs = [10 ** (k / 4 - 6) for k in range(20)]
    losses = [2.3 - 0.05 * k for k in range(16)] + [3.0, 8.0, 20.0, 45.0]
    sweep = Sweep(tmp_path, SweepOptions(steps=20), lrs, losses, smoothed=list(losses))
    sweep.suggestion = lrs[8]
    ax = figure(sweep).axes[0]
    low, high = ax.get_ylim()
    assert min(losses) - 0.5 < low < min(losses) and 2 * 2.3 < high < 2 * 2.3 + 0.5
    descent = (losses[0] - min(losses)) / (high - low)
    assert descent > 0.2  # on a 0–45 axis it was 1.7% of the height
    marks = [line for line in ax.get_lines() if list(line.get_xdata()) == [lrs[8], lrs[8]]]
    assert len(marks) == 1 and "suggested 1.0e-04" in ax.get_legend_handles_labels()[1]
