"""Hostile runs (issue 14, classes 1, 2, 3, 4 and 6) through the real CLI on tiny smoke data:
nothing non-finite reaches disk, no run touches another's folder or changed data, every
failure is one line, and what a kill or a race leaves behind is never a dead end.
Class 7 (exit codes) is in test_hostile_exit_codes.py; the cases that need a tmpfs (a full
disk at start-up, a read-only run folder) are in test_bad_input.py."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_accumulator import (
    EventAccumulator as ServedAccumulator,
)

from tests.helpers import ROOT, SMOKE, TINY, Cli, scalars


def one_line_error(result, codes: tuple[int, ...]) -> str:
    """The exit code is one of `codes`; stderr ends in exactly one 'error: ' line."""
    out, err = result.stdout, result.stderr
    assert result.exit_code in codes, (result.exit_code, err, out)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


def tensors(obj: object):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors(value)


def assert_finite_checkpoint(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    for key in ("model", "average", "optimizer"):
        for t in tensors(payload.get(key)):
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{path}: {key}"


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.suffix == ".pt"}


# --- 1. Non-finite weights never reach disk, and such a run never exits 0 ------------------
BLOW_UP = "optim.lr=1e30"
DIVERGING = {
    "adam-lr-1e30": ["--set", BLOW_UP],
    "adam-lr-1e30-2-epochs": ["--set", BLOW_UP, "--epochs", "2"],
    "adam-lr-1e30-lr-flag": ["--lr", "1e30", "--epochs", "1"],
    "sgd-lr-1e6": ["--set", "optim.name=sgd", "--set", "optim.lr=1e6", "--set",
                   "optim.momentum=0.9", "--epochs", "4"],
    "muon-lr-1e30": ["--set", "optim.name=muon", "--set", BLOW_UP],
    "save-every-step": ["--set", BLOW_UP, "--set", "train.checkpoint_every_n_steps=1"],
    "weight-average": ["--set", BLOW_UP, "--set", "train.ema_decay=0.9"],
    "tolerant-guard": ["--set", BLOW_UP, "--set", "train.max_nonfinite_steps=50"],
    "mse-on-logits": ["--loss", "mse", "--set", "loss.input=logits", "--set", "optim.name=sgd",
                      "--set", "optim.lr=1e12", "--set", "optim.momentum=0.9"],
}  # fmt: skip


def assert_diverged(result, logdir: Path) -> str:
    line = one_line_error(result, (1,))
    assert "diverged" in line and re.search(r"step \d+", line), line
    for checkpoint in logdir.rglob("*.pt"):
        assert_finite_checkpoint(checkpoint)
    for named in re.findall(r"(/\S+\.pt)\b", line):  # "the last finite checkpoint X is kept"
        assert Path(named).is_file(), line
        assert_finite_checkpoint(Path(named))
    return line


@pytest.mark.slow
@pytest.mark.parametrize("args", DIVERGING.values(), ids=DIVERGING.keys())
def test_a_diverging_run_exits_1_and_saves_nothing_non_finite(cli, tmp_path, args):
    result = cli("train", *TINY, *args, "--logdir", tmp_path, "--run-name", "r")
    assert_diverged(result, tmp_path)


@pytest.mark.slow
def test_divergence_after_a_good_epoch_keeps_that_epoch(cli, runs):
    before = files(runs / "a")
    result = cli("train", "--resume", runs / "a", "--epochs", "3", "--force", "--set", BLOW_UP)
    line = assert_diverged(result, runs)
    assert str(runs / "a" / "last.pt") in line  # points at the good checkpoint, which stays
    assert files(runs / "a")["last.pt"] == before["last.pt"]


# --- 2. A run folder belongs to its run ------------------------------------------------------
def plant(runs: Path, how: str) -> Path:
    """Put run a's checkpoint into run b's folder; return what to --resume."""
    if how == "beside":
        shutil.copy(runs / "a" / "last.pt", runs / "b" / "from-a.pt")
        return runs / "b" / "from-a.pt"
    if how == "over-last":
        shutil.copy(runs / "a" / "last.pt", runs / "b" / "last.pt")
        return runs / "b"
    shutil.copy(runs / "a" / "best.pt", runs / "b" / "best.pt")
    return runs / "b" / "best.pt"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["beside", "over-last", "as-best"])
def test_a_checkpoint_in_another_runs_folder_is_refused(cli, runs, how):
    target = plant(runs, how)
    before = files(runs / "b")
    line = one_line_error(cli("train", "--resume", target, "--epochs", "2"), (2,))
    assert "another run" in line and "--force" in line, line
    assert files(runs / "b") == before


@pytest.mark.slow
def test_force_adopts_the_folder(cli, runs):
    target = plant(runs, "beside")
    result = cli("train", "--resume", target, "--epochs", "2", "--force")
    assert result.exit_code == 0, result.stderr
    assert torch.load(runs / "b" / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_a_copy_in_a_folder_of_its_own_resumes(cli, runs):
    """What the refusal suggests: a new folder holding only the checkpoint."""
    (runs / "new").mkdir()
    shutil.copy(runs / "a" / "last.pt", runs / "new" / "last.pt")
    before = files(runs / "a")
    result = cli("train", "--resume", runs / "new", "--epochs", "2")
    assert result.exit_code == 0, result.stderr
    assert torch.load(runs / "new" / "last.pt", weights_only=True)["epoch"] == 2
    assert files(runs / "a") == before


# --- 3. The data a run was trained on, changed under a resume -------------------------------
CLASSES = ["cat", "dog", "frog"]


def png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)


FOLDER_RUN = ["train", "-c", str(SMOKE), "-q", "--set", "data.source=folder", "--set",
              "data.root=data", "--set", "data.cache_dir=cache", "--set", "train.batch_size=8",
              "--epochs", "1", "--logdir", "runs", "--run-name", "f"]  # fmt: skip


@pytest.fixture(scope="module")
def folder_workspace(tmp_path_factory) -> Path:
    """data/{train,test}/<3 classes>/*.png and a one-epoch run on it, all relative paths,
    so that a copy of the whole folder is a self-contained workspace."""
    work = tmp_path_factory.mktemp("folder")
    for c, name in enumerate(CLASSES):
        for i in range(8):
            png(work / "data" / "train" / name / f"{i}.png", 100 * c + i)
        for i in range(4):
            png(work / "data" / "test" / name / f"{i}.png", 10_000 + 100 * c + i)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = Cli()(*FOLDER_RUN)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.stderr
    return work


@pytest.fixture
def workspace(folder_workspace, tmp_path, monkeypatch) -> Path:
    work = Path(shutil.copytree(folder_workspace, tmp_path / "w"))  # copy2 keeps mtimes
    monkeypatch.chdir(work)
    return work


def change(work: Path, how: str) -> None:
    train = work / "data" / "train"
    if how == "rename-class":
        for split in ("train", "test"):
            (work / "data" / split / "cat").rename(work / "data" / split / "kitten")
    elif how == "swap-two-classes":
        (train / "cat").rename(train / "tmp")
        (train / "dog").rename(train / "cat")
        (train / "tmp").rename(train / "dog")
    elif how == "add-class":
        for i in range(8):
            png(train / "bird" / f"{i}.png", 900 + i)
    elif how == "add-image":
        png(train / "dog" / "extra.png", 777)
    elif how == "edit-image":
        png(train / "frog" / "3.png", 555)
    elif how == "remove-image":
        (train / "cat" / "5.png").unlink()


CHANGES = {
    "rename-class": ["cat", "kitten"],
    "swap-two-classes": [],
    "add-class": ["bird"],
    "add-image": [],
    "edit-image": [],
    "remove-image": [],
}


@pytest.mark.slow
@pytest.mark.parametrize(("how", "named"), CHANGES.items(), ids=CHANGES.keys())
def test_changed_data_is_refused_on_resume(cli, workspace, how, named):
    change(workspace, how)
    before = files(workspace / "runs" / "f")
    line = one_line_error(cli("train", "--resume", "runs/f", "--epochs", "2"), (2,))
    assert "data changed" in line and "--force" in line, line
    assert all(name in line for name in named), line
    assert files(workspace / "runs" / "f") == before


@pytest.mark.slow
@pytest.mark.parametrize("how", [None, "rename-class"], ids=["unchanged", "forced-rename"])
def test_unchanged_or_forced_data_resumes(cli, workspace, how):
    force = []
    if how:
        change(workspace, how)
        force = ["--force"]
    result = cli("train", "--resume", "runs/f", "--epochs", "2", *force)
    assert result.exit_code == 0, result.stderr
    assert torch.load("runs/f/last.pt", weights_only=True)["epoch"] == 2


# --- 6. Leftovers and races -------------------------------------------------------------------
@pytest.mark.slow
def test_leftover_temp_checkpoints_are_removed_on_resume(cli, runs):
    for name in [".last.pt.tmp-4242", ".best.pt.tmp-99999999", ".last.pt.tmp-1"]:
        (runs / "a" / name).write_bytes(b"half a checkpoint")
    result = cli("train", "--resume", runs / "a", "--epochs", "2")
    assert result.exit_code == 0, result.stderr
    assert not list((runs / "a").glob(".*.tmp-*"))
    assert_finite_checkpoint(runs / "a" / "last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["dir", "last.pt"])
def test_a_run_being_trained_is_not_resumed_twice(cli, runs, spec):
    before = files(runs / "a")
    with open(runs / "a" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0), held.truncate(), held.write(f"{os.getpid()}\n"), held.flush()
        target = runs / "a" if spec == "dir" else runs / "a" / "last.pt"
        line = one_line_error(cli("train", "--resume", target, "--epochs", "2"), (2,))
    assert str(os.getpid()) in line, line
    assert files(runs / "a") == before


@pytest.mark.slow
def test_a_stale_lock_is_not_in_the_way(cli, runs):
    (runs / "a" / ".lock").write_text("99999999\n")  # its process is gone: no flock held
    result = cli("train", "--resume", runs / "a", "--epochs", "2")
    assert result.exit_code == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("leftover", [None, ".last.pt.tmp-4242"], ids=["empty", "temp-file"])
def test_a_run_folder_without_a_checkpoint_starts_from_scratch(cli, runs, leftover):
    """A double Ctrl-C before the first save leaves config.yaml and no last.pt."""
    for name in ["last.pt", "best.pt"]:
        (runs / "a" / name).unlink()
    if leftover:
        (runs / "a" / leftover).write_bytes(b"partial")
    result = cli("train", "--resume", runs / "a")
    assert result.exit_code == 0, result.stderr
    assert "starting from scratch" in result.stdout + result.stderr
    assert torch.load(runs / "a" / "last.pt", weights_only=True)["epoch"] == 1
    assert not list((runs / "a").glob(".*.tmp-*"))
    # The first start's events are dropped, step 0 included: each once-per-run item once.
    acc = EventAccumulator(str(runs / "a"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("inputs/first_batch")] == [0]
    # Text and layouts are tensors, which only the accumulator the server uses purges.
    served = ServedAccumulator(str(runs / "a"), size_guidance={"tensors": 0})
    served.Reload()
    for tag in ("config/text_summary", "custom_scalars__config__"):
        assert [e.step for e in served.Tensors(tag)] == [0], tag
    steps = [step for step, _ in scalars(runs / "a")["train/loss"]]
    assert steps == sorted(set(steps)), steps


# --- 4. One line, never a traceback -----------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "codes"),
    [
        pytest.param(["--run-name", "r" * 300], (2,), id="run-name-300-chars"),
        pytest.param(["--logdir", "LONG"], (2,), id="logdir-component-300-chars"),
        pytest.param(["--logdir", "DEEP"], (1, 2), id="logdir-path-over-4096-bytes"),
        pytest.param(
            ["--set", "optim.name=sgd", "--set", "optim.momentum=0"],
            (2,),
            id="sgd-nesterov-without-momentum",
        ),
        pytest.param(
            ["--set", "optim.name=muon", "--set", "optim.momentum=0"],
            (2,),
            id="muon-nesterov-without-momentum",
        ),
        pytest.param(["--set", "data.val_size=128"], (1, 2), id="val-split-takes-everything"),
        pytest.param(["--device", "cuda:7"], (1, 2), id="absent-cuda-device"),
    ],
)
def test_train_mistakes_are_one_line(cli, tmp_path, args, codes):
    long = {"LONG": tmp_path / ("y" * 300) / "runs", "DEEP": tmp_path.joinpath(*["z" * 200] * 25)}
    args = [str(long[a]) if a in long else a for a in args]
    logdir = [] if "--logdir" in args else ["--logdir", str(tmp_path / "runs")]
    one_line_error(cli("train", *TINY, *logdir, *args), codes)


def test_inspect_grads_logdir_that_is_a_file(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    result = cli("inspect-grads", "-c", SMOKE, "--logdir", tmp_path / "file")
    one_line_error(result, (1, 2))


MISSING = {
    "model": ["evaluate", "inspect-grads", "resume"],
    "config": ["evaluate", "inspect-grads", "resume"],
    "optimizer": ["resume"],
    "global_step": ["resume"],
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "command"),
    [(key, command) for key, commands in MISSING.items() for command in commands],
    ids=[f"no-{key}-{command}" for key, commands in MISSING.items() for command in commands],
)
def test_a_checkpoint_missing_a_key_is_one_line(cli, runs, key, command):
    payload = torch.load(runs / "a" / "last.pt", weights_only=True)
    del payload[key]
    broken = runs / "broken"
    broken.mkdir()
    torch.save(payload, broken / "last.pt")
    if command == "resume":
        result = cli("train", "--resume", broken, "--epochs", "2")
    else:
        result = cli(command, "--checkpoint", broken / "last.pt")
    line = one_line_error(result, (1,))
    assert key in line or "not a cifar-bp checkpoint" in line, line


@pytest.mark.slow
def test_evaluate_a_three_class_folder_run(cli, workspace):
    result = cli("evaluate", "--checkpoint", "runs/f")
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if re.search(r"\b(cat|dog|frog)\b", line)]
    assert len(rows) >= 3 and all(any(c in r for r in rows) for c in CLASSES), result.stdout
    as_json = cli("evaluate", "--checkpoint", "runs/f", "--json")
    assert as_json.exit_code == 0, as_json.stderr
    assert '"frog"' in as_json.stdout and "airplane" not in as_json.stdout


ENCODED = [
    ("losses-ascii", ["losses"], "ascii"),
    ("losses-latin-1", ["losses"], "latin-1"),
    ("inspect-grads-ascii", ["inspect-grads", "-c", str(SMOKE)], "ascii"),
    ("inspect-grads-latin-1", ["inspect-grads", "-c", str(SMOKE), "--loss", "all"], "latin-1"),
    ("mistake-ascii", ["config", "show", "--lr", "nan"], "ascii"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "encoding"), [pytest.param(*c[1:], id=c[0]) for c in ENCODED])
def test_ascii_and_latin_1_terminals(args, encoding):
    env = {**os.environ, "PYTHONIOENCODING": encoding, "LC_ALL": "C", "LANG": "C"}
    cmd = [sys.executable, "-m", "cifar_bp", *args]
    done = subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT, timeout=300)
    out, err = done.stdout.decode(encoding), done.stderr.decode(encoding)
    assert "Traceback" not in out + err, err
    expected = 2 if "nan" in args else 0
    assert done.returncode == expected, err
    assert (out if expected == 0 else err).strip()  # it printed something, not nothing


def test_a_claimed_run_folder_stays_locked_until_its_training_ends(runs, monkeypatch):
    """No window between claiming a folder and training in it: the lock taken at the claim
    is the one the training holds, and a failure before training releases it."""
    from cifar_bp import setup
    from cifar_bp.errors import CliError, UsageError
    from cifar_bp.resume import prepare_resume
    from cifar_bp.rundir import RunLock

    start = prepare_resume(str(runs / "a"), None, {"epochs": 2}, [], False)
    run = setup.build_run(start.cfg, start)
    with pytest.raises(UsageError, match="being trained by another process"):
        RunLock(runs / "a").acquire()  # a second trainer, after the build, before training
    with run.lock:
        pass  # the training's own `with run.lock:` ends by releasing it
    run.tracker.close()
    RunLock(runs / "a").acquire()  # free again (and released when the test's lock goes)

    def no_tracker(*args):
        raise CliError("cannot write TensorBoard events")

    monkeypatch.setattr(setup, "open_tracker", no_tracker)
    start = prepare_resume(str(runs / "b"), None, {"epochs": 2}, [], False)
    with pytest.raises(CliError):
        setup.build_run(start.cfg, start)
    RunLock(runs / "b").acquire()  # the failed build did not keep it


@pytest.mark.slow
def test_a_reader_that_goes_away_stops_the_output_not_the_run(tmp_path):
    """`cifar-bp train | head -1`: the closed pipe silences the progress lines; the run still
    trains to its end and saves, with nothing on stderr but its own notes."""
    train = [sys.executable, "-m", "cifar_bp", "train", *TINY, "--epochs", "2", "--logdir",
             str(tmp_path), "--run-name", "r", "--set", "log.every_n_steps=1"]  # fmt: skip
    train.remove("-q")  # progress lines, one a step: the second write meets the closed pipe
    producer = subprocess.Popen(train, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert producer.stdout is not None
    first = producer.stdout.readline()
    producer.stdout.close()  # as head does after its line
    _, err = producer.communicate(timeout=120)
    assert first and producer.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["epoch"] == 2
