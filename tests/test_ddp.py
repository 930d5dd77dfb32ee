"""torchrun with 2 CPU processes (gloo): one run, ranks in sync, same curve as one process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_bp.checkpoint import load_checkpoint
from cifar_bp.tracking import HPARAMS_FILE
from tests.helpers import ROOT, SMOKE, scalars

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0"]  # fmt: skip
# 512 images, no augmentation: 8 global batches of 64 per epoch. SGD, because Adam divides
# by tiny second moments early on and so amplifies float rounding between the two set-ups.
DATA = ["data.train_size=512", "data.test_size=128", "log.every_n_steps=1",
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9",
        "train.amp=false"]  # float32: bf16 rounding differs with the batch split  # fmt: skip


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("ddp")
    result = torchrun("-m", "cifar_bp", "train", "--config", str(SMOKE), "--epochs", "2",
                      "--batch-size", "32", "--logdir", str(logdir), "--run-name", "two",
                      *sets(*DATA))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return logdir


def test_one_run_directory_and_one_event_file(ddp_run):
    assert [p.name for p in ddp_run.iterdir()] == ["two"]
    files = {p.name for p in (ddp_run / "two").glob("events.out.tfevents.*")}
    assert files - {HPARAMS_FILE} and len(files - {HPARAMS_FILE}) == 1, files  # rank 0's only
    ckpt = load_checkpoint(ddp_run / "two" / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 16


def test_matches_one_process_with_the_global_batch(cli, ddp_run, tmp_path):
    """Per-rank batch 32 on 2 ranks == batch 64 on one process, step for step."""
    single = cli("train", "--config", SMOKE, "--epochs", "2", "--batch-size", "64", "-q",
                 "--logdir", tmp_path, "--run-name", "one", *sets(*DATA))  # fmt: skip
    assert single.exit_code == 0, single.stderr
    two, one = scalars(ddp_run / "two"), scalars(tmp_path / "one")
    for tag in ("train/loss", "grad_norm/total"):
        assert [s for s, _ in two[tag]] == [s for s, _ in one[tag]] == list(range(1, 17))
        assert [v for _, v in two[tag]] == pytest.approx([v for _, v in one[tag]], rel=1e-3)
    a = load_checkpoint(ddp_run / "two" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    for key in a:  # relative to each tensor's size: single weights near 0 have no scale
        assert (a[key] - b[key]).norm() <= 1e-3 * b[key].norm(), key


def test_every_rank_ends_with_the_same_weights(tmp_path):
    result = torchrun(str(ROOT / "tests" / "ddp_worker.py"), str(SMOKE), str(tmp_path),
                      "train.epochs=1", "train.batch_size=32", f"log.logdir={tmp_path / 'runs'}",
                      *DATA)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


def test_single_process_resumes_a_torchrun_checkpoint(cli, ddp_run, tmp_path):
    shutil.copytree(ddp_run / "two", tmp_path / "two")
    result = cli("train", "--resume", tmp_path / "two", "--epochs", "3", "--batch-size", "64",
                 "--force", "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "two" / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["world_size"] == 1 and ckpt["global_step"] == 24


def test_sigterm_under_torchrun_then_resume_matches_the_straight_run(ddp_run, tmp_path):
    args = ["-m", "cifar_bp", "train", "--config", str(SMOKE), "--epochs", "2", "--batch-size",
            "32", "--logdir", str(tmp_path), "--run-name", "two", *sets(*DATA)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*TORCHRUN, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    for line in proc.stdout:
        if "epoch 2/2 step 3/8" in line:
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every worker
            break
    out = line + proc.communicate(timeout=120)[0]
    assert "resume with: torchrun --nproc_per_node=2 -m cifar_bp train --resume" in out
    stopped = load_checkpoint(tmp_path / "two" / "last.pt")
    assert stopped["epoch"] == 1 and 3 <= stopped["step_in_epoch"] < 8
    result = torchrun("-m", "cifar_bp", "train", "--resume", str(tmp_path / "two"), "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    b = load_checkpoint(ddp_run / "two" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_error_on_one_rank_ends_the_job_promptly(tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)  # only rank 0 checks the run name
    started = time.monotonic()
    args = ["--config", str(SMOKE), "--logdir", str(tmp_path / "runs"), "--run-name", "taken"]
    result = torchrun("-m", "cifar_bp", "train", *args, *sets(*DATA), timeout=120)
    assert result.returncode != 0
    assert "error: rank 0: run" in result.stderr and "already exists" in result.stderr
    assert time.monotonic() - started < 90


# Each rank logs when its work starts and ends; rank 0's work is slow on purpose.
MAIN_FIRST = """
import sys, time, torch
from pathlib import Path
from cifar_bp.distributed import init_process_group, shutdown, world_from_env

world = world_from_env()
init_process_group(world, torch.device("cpu"))
log = Path(sys.argv[1])

def work():
    with log.open("a") as f:
        f.write(f"start {world.rank}\\n")
    time.sleep(1.0 if world.is_main else 0.0)
    with log.open("a") as f:
        f.write(f"end {world.rank}\\n")
    return world.rank

assert world.main_first(work) == world.rank
shutdown(world)
"""


def test_rank_zero_loads_the_data_before_the_others(tmp_path):
    script, log = tmp_path / "main_first.py", tmp_path / "order.log"
    script.write_text(MAIN_FIRST)
    result = torchrun(str(script), str(log), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # Without the wait, rank 1 would start while rank 0 sleeps.
    assert log.read_text().splitlines() == ["start 0", "end 0", "start 1", "end 1"]
