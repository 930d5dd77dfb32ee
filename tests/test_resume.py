"""Checkpoints and exact resume: an interrupted run must end bitwise where a straight one does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_bp.checkpoint import load_checkpoint
from tests.helpers import ROOT, SMOKE, scalars, train_run

# Small but real: 8 steps an epoch, with on-device augmentation so its RNG is exercised too,
# and a weight average, so its state must survive the interruption as well.
FAST = ["--config", str(SMOKE), "-q", "--set", "data.train_size=512", "--set",
        "data.test_size=128", "--set", "data.augment.crop_padding=2",
        "--set", "train.ema_decay=0.9"]  # fmt: skip


def weights(run_dir: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    """The live weights and the weight average's, under one dict."""
    payload = load_checkpoint(run_dir / name)
    average = {f"average.{k}": v for k, v in payload["average"]["weights"].items()}
    return {**payload["model"], **average}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The reference: 2 epochs without interruption."""
    return train_run(tmp_path_factory.mktemp("straight"), "ref", *FAST, "--epochs", "2")


def test_resume_after_an_epoch_is_bitwise_identical(cli, tmp_path, straight):
    first = cli("train", *FAST, "--epochs", "1", "--logdir", tmp_path, "--run-name", "r")
    assert first.exit_code == 0, first.stderr
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 0, 8)
    resumed = cli("train", "--resume", tmp_path / "r", "--epochs", "2", "-q")
    assert resumed.exit_code == 0, resumed.stderr
    assert same_weights(weights(tmp_path / "r"), weights(straight))
    steps = [s for s, _ in scalars(tmp_path / "r")["test/accuracy"]]
    assert steps == [8, 16]  # no duplicated or missing epoch points


def checkpoint_contents(path: Path) -> dict:
    payload = load_checkpoint(path)
    keys = ("optimizer", "scheduler", "scaler", "rng", "meters", "epoch", "step_in_epoch",
            "best_metric", "config")  # fmt: skip
    return {key: payload[key] for key in keys}


def test_checkpoint_holds_everything_needed(straight):
    contents = checkpoint_contents(straight / "last.pt")
    assert (contents["epoch"], contents["step_in_epoch"]) == (2, 0)
    assert isinstance(contents["rng"]["torch"], torch.Tensor)
    assert contents["optimizer"]["state"]  # Adam moments
    assert 0 < contents["best_metric"] <= 1
    assert load_checkpoint(straight / "best.pt")["best_metric"] <= contents["best_metric"]


def start(args: list[str], logdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cifar_bp", "train", *args, "--logdir", str(logdir)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_step(proc: subprocess.Popen, step: str, timeout: float = 120) -> list[str]:
    """Read the plain progress lines until one mentions `step`."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if step in line:
            return seen
    proc.kill()
    raise AssertionError(f"never reached {step}: {seen}")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_epoch_then_resume_is_bitwise_identical(cli, tmp_path, straight, sig, code):
    args = [a for a in FAST if a != "-q"] + ["--epochs", "2", "--run-name", "r"]
    args += ["--set", "log.every_n_steps=1"]
    proc = start(args, tmp_path)
    wait_for_step(proc, "epoch 2/2 step 2/8")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"cifar-bp train --resume {tmp_path / 'r'}" in out
    stopped = load_checkpoint(tmp_path / "r" / "last.pt")
    assert stopped["epoch"] == 1 and 2 <= stopped["step_in_epoch"] < 8  # mid-epoch
    resumed = cli("train", "--resume", tmp_path / "r")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming {tmp_path / 'r' / 'last.pt'}" in resumed.stdout
    assert same_weights(weights(tmp_path / "r"), weights(straight))
    steps = [s for s, _ in scalars(tmp_path / "r")["train/loss"]]
    assert steps == list(range(1, 17))  # every step once: purge_step dropped nothing extra


def test_second_ctrl_c_aborts_and_keeps_the_last_checkpoint(tmp_path):
    args = [a for a in FAST if a != "-q"] + ["--epochs", "3", "--run-name", "r"]
    args += ["--set", "log.every_n_steps=1", "--set", "train.checkpoint_every_n_steps=1"]
    proc = start(args, tmp_path)
    wait_for_step(proc, "epoch 1/3 step 3/8")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert load_checkpoint(tmp_path / "r" / "last.pt")["global_step"] >= 2


def test_kill_9_while_writing_checkpoints_leaves_a_loadable_one(tmp_path):
    """Checkpoint after every step and kill -9 at arbitrary moments; last.pt always loads."""
    for attempt in range(2):
        logdir = tmp_path / str(attempt)
        args = [a for a in FAST if a != "-q"] + ["--epochs", "3", "--run-name", "r"]
        args += ["--set", "log.every_n_steps=1", "--set", "train.checkpoint_every_n_steps=1"]
        proc = start(args, logdir)
        wait_for_step(proc, "epoch 1/3 step 2/8")
        time.sleep(0.1 * attempt)
        proc.kill()
        proc.communicate()
        assert load_checkpoint(logdir / "r" / "last.pt")["global_step"] >= 1


def test_resume_refuses_unsafe_changes_unless_forced(cli, tmp_path):
    assert (
        cli("train", *FAST, "--epochs", "1", "--logdir", tmp_path, "--run-name", "r").exit_code == 0
    )
    before = (tmp_path / "r" / "last.pt").read_bytes()
    refused = cli("train", "--resume", tmp_path / "r", "--loss", "mse", "--batch-size", "32")
    assert refused.exit_code == 2
    assert "loss.name" in refused.stderr and "train.batch_size" in refused.stderr
    assert "--force" in refused.stderr
    assert (tmp_path / "r" / "last.pt").read_bytes() == before
    forced = cli("train", "--resume", tmp_path / "r", "--loss", "mse", "--epochs", "2", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert "changed on resume: loss.name" in forced.stdout


def test_resume_auto_picks_the_newest_run(cli, tmp_path):
    for name in ("old", "new"):
        assert (
            cli("train", *FAST, "--epochs", "1", "--logdir", tmp_path, "--run-name", name).exit_code
            == 0
        )
        time.sleep(0.02)
    result = cli("train", "--resume", "auto", "--logdir", tmp_path, "--epochs", "2", "-q")
    assert result.exit_code == 0, result.stderr
    assert load_checkpoint(tmp_path / "new" / "last.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "old" / "last.pt")["epoch"] == 1


def test_divergence_stops_and_keeps_the_good_checkpoint(cli, tmp_path):
    assert (
        cli("train", *FAST, "--epochs", "1", "--logdir", tmp_path, "--run-name", "r").exit_code == 0
    )
    good = (tmp_path / "r" / "last.pt").read_bytes()
    result = cli("train", "--resume", tmp_path / "r", "--epochs", "2", "--force",
                 "--set", "optim.name=sgd", "--set", "optim.lr=1e30")  # fmt: skip
    assert result.exit_code == 1
    assert (
        "training diverged" in result.stderr
        and "for 3 consecutive steps from step 10" in result.stderr
    )
    assert "lower learning rate" in result.stderr
    assert (tmp_path / "r" / "last.pt").read_bytes() == good


ONECYCLE = [*FAST, "--set", "optim.scheduler=onecycle"]


def test_resume_with_other_epochs_or_batch_follows_the_new_schedule(cli, tmp_path):
    """One-cycle's length is the run's: resuming with fewer epochs trains no further (the
    checkpoint is not 'damaged'), more epochs continue on the longer schedule at the same
    point, and a forced batch change re-counts the steps."""
    from cifar_bp.config import resolve_config
    from cifar_bp.setup import build_scheduler

    done = cli("train", *ONECYCLE, "--epochs", "2", "--logdir", tmp_path, "--run-name", "r")
    assert done.exit_code == 0, done.stderr
    before = (tmp_path / "r" / "last.pt").read_bytes()
    fewer = cli("train", "--resume", tmp_path / "r", "--epochs", "1")
    assert fewer.exit_code == 0, fewer.stderr
    said = fewer.stdout + fewer.stderr
    assert (
        "that run already completed 2 epochs (step 16); --epochs 1 trains nothing more: pass "
        "--epochs N with N > 2 to go on" in said
    ), said
    assert "at epoch 3" not in said
    assert (tmp_path / "r" / "last.pt").read_bytes() == before
    more = cli("train", "--resume", tmp_path / "r", "--epochs", "3", "-q")
    assert more.exit_code == 0, more.stderr
    logged = dict(scalars(tmp_path / "r")["train/lr"])
    # The lr of a fresh 24-step one-cycle schedule at the steps epoch 3 logged.
    optim = resolve_config(SMOKE, {}, ["optim.scheduler=onecycle"]).optim
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    schedule = build_scheduler(optim, opt, 24)
    expected = {}
    for step in range(1, 25):
        opt.step()
        schedule.step()
        expected[step] = opt.param_groups[0]["lr"]
    for step in (s for s in logged if s > 16):
        assert logged[step] == pytest.approx(expected[step], rel=1e-6), step
    first = cli("train", *ONECYCLE, "--epochs", "1", "--logdir", tmp_path, "--run-name", "b")
    assert first.exit_code == 0, first.stderr
    wider = cli("train", "--resume", tmp_path / "b", "--epochs", "2", "--batch-size", "128",
                "--force", "-q")  # fmt: skip
    assert wider.exit_code == 0, wider.stderr
    assert load_checkpoint(tmp_path / "b")["global_step"] == 8 + 4  # 4 steps of 128 images
