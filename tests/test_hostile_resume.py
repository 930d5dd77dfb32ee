"""Hostile resumes and stops (issues 5 and 14), through the real CLI on tiny smoke data: a
resume never takes over a folder that is not its run's, never starts a run with a best.pt
over from scratch, `--resume auto` takes the newest run, the notes count what was trained,
a divergence names the step it began, a signal after the last epoch still sets the exit
code, and `inspect-grads --logdir` on a full disk is one line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from cifar_bp import trainer
from cifar_bp.checkpoint import facts_of, load_checkpoint
from tests.helpers import SMOKE, TINY, Cli

STEPS = 2  # an epoch of TINY: 128 images in batches of 64


def one_line_error(result, codes: tuple[int, ...]) -> str:
    """The exit code is one of `codes`; stderr ends in exactly one 'error: ' line."""
    out, err = result.stdout, result.stderr
    assert result.exit_code in codes, (result.exit_code, err, out)
    assert "Traceback" not in out + err and "Exception in thread" not in out + err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too), by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run_id(path: Path) -> str | None:
    return facts_of(load_checkpoint(path)).run_id


def said(result) -> str:
    return result.stdout + result.stderr


# --- A folder that is not the checkpoint's run's is refused (issue 14, class 2) --------------
def lay_out(runs: Path, case: str) -> tuple[Path, Path]:
    """Build the case's folder from runs a and b; return (the folder, what to --resume)."""
    a, b = runs / "a", runs / "b"
    folder = runs.parent / "x"
    if case == "copied-run-folder-without-run-json":  # config.yaml, no run.json: a's files
        shutil.copytree(a, folder)
        (folder / "run.json").unlink()
        shutil.copy(b / "last.pt", folder / "from-b.pt")
        return folder, folder / "from-b.pt"
    folder.mkdir()
    if case in ("foreign-last-beside", "foreign-last-as-dir"):  # the audit's B2
        shutil.copy(a / "last.pt", folder / "last.pt")
        shutil.copy(b / "last.pt", folder / "other.pt")
        return folder, folder / ("other.pt" if case == "foreign-last-beside" else "")
    if case == "foreign-best-beside":
        shutil.copy(a / "best.pt", folder / "best.pt")
        shutil.copy(b / "last.pt", folder / "mine.pt")
        return folder, folder / "mine.pt"
    shutil.copy(b / "last.pt", folder / "model.pt")  # a downloads folder
    other = {"downloads-with-notes": "notes.txt", "downloads-with-events": "events.out.x"}[case]
    (folder / other).write_text("someone else's")
    return folder, folder / "model.pt"


FOREIGN = {
    "foreign-last-beside": ("another run", "x/last.pt is from run"),
    "foreign-best-beside": ("another run", "x/best.pt is from run"),
    "copied-run-folder-without-run-json": ("another run", "x/last.pt is from run"),
    "foreign-last-as-dir": ("is not a run folder", "(other.pt)"),
    "downloads-with-notes": ("is not a run folder", "(notes.txt)"),
    "downloads-with-events": ("is not a run folder", "(events.out.x)"),
}


@pytest.mark.slow
@pytest.mark.parametrize(("case", "named"), FOREIGN.items(), ids=FOREIGN.keys())
def test_a_folder_that_is_not_the_checkpoints_run_is_refused(cli, runs, case, named):
    folder, target = lay_out(runs, case)
    before, sources = tree(folder), tree(runs)
    line = one_line_error(cli("train", "--resume", target, "--epochs", "2"), (2,))
    for part in (*named, "--force", "Copy the checkpoint into a folder of its own", "NEW/last.pt"):
        assert part in line, line
    assert tree(folder) == before  # nothing written, purged or replaced
    assert tree(runs) == sources


@pytest.mark.slow
def test_force_adopts_a_folder_holding_another_runs_last_pt(cli, runs):
    folder, target = lay_out(runs, "foreign-last-beside")
    other = (folder / "other.pt").read_bytes()
    result = cli("train", "--resume", target, "--epochs", "2", "--force")
    assert result.exit_code == 0, result.stderr
    assert f"--force: {folder} now continues run {run_id(target)[:8]}" in said(result)
    assert run_id(folder / "last.pt") == run_id(runs / "b" / "last.pt")
    assert load_checkpoint(folder / "last.pt")["epoch"] == 2
    assert (folder / "other.pt").read_bytes() == other


@pytest.mark.slow
@pytest.mark.parametrize("with_best", [False, True], ids=["checkpoint-only", "with-its-best"])
def test_a_folder_of_its_own_resumes(cli, runs, tmp_path, with_best):
    """What the refusal suggests, with any name, and with the same run's best.pt beside it."""
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(runs / "b" / "last.pt", own / "model.pt")
    if with_best:
        shutil.copy(runs / "b" / "best.pt", own / "best.pt")
    sources = tree(runs)
    result = cli("train", "--resume", own / "model.pt", "--epochs", "2")
    assert result.exit_code == 0, result.stderr
    assert load_checkpoint(own / "last.pt")["epoch"] == 2
    assert json.loads((own / "run.json").read_text())["run_id"] == run_id(own / "model.pt")
    assert tree(runs) == sources


# --- A run folder with a best.pt but no last.pt resumes from the best.pt ---------------------
@pytest.mark.slow
def test_a_folder_with_only_best_pt_resumes_from_it(cli, runs):
    run = runs / "a"
    (run / "last.pt").unlink()
    best = (run / "best.pt").read_bytes()
    result = cli("train", "--resume", run)  # the run's own 1 epoch: nothing more to train
    assert result.exit_code == 0, result.stderr
    assert f"{run} has no last.pt: resuming from its best.pt instead" in said(result)
    assert "that run already completed 1 epoch (step 2)" in said(result)
    assert "starting from scratch" not in said(result)
    assert (run / "best.pt").read_bytes() == best  # not overwritten by a fresh start
    more = cli("train", "--resume", run, "--epochs", "2")
    assert more.exit_code == 0, more.stderr
    assert f"resuming {run / 'best.pt'} at epoch 2, step {STEPS}" in said(more)
    assert load_checkpoint(run / "last.pt")["global_step"] == 2 * STEPS  # went on from it


# --- --resume auto takes the newest run, even one stopped before its first save --------------
def stopped_before_first_save(runs: Path, name: str) -> Path:
    """What a double Ctrl-C before the first checkpoint leaves: config.yaml and run.json."""
    folder = runs / name
    folder.mkdir()
    shutil.copy(runs / "a" / "config.yaml", folder / "config.yaml")
    (folder / "run.json").write_text(json.dumps({"run_id": "f" * 32}) + "\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("by_name", [False, True], ids=["newest", "run-name"])
def test_resume_auto_starts_the_newest_run_over(cli, runs, by_name):
    older = tree(runs)
    newest = stopped_before_first_save(runs, "c")
    name = ["--run-name", "c"] if by_name else []
    result = cli("train", "--resume", "auto", "--logdir", runs, *name)
    assert result.exit_code == 0, result.stderr
    assert f"--resume auto: the newest run is {newest}" in said(result)
    if not by_name:  # b was trained last of the others: it is the one passed over
        assert f"(to continue the older {runs / 'b'} instead: --resume {runs / 'b'})" in said(
            result
        )
    assert f"{newest} has no checkpoint yet (stopped before the first save)" in said(result)
    assert load_checkpoint(newest / "last.pt")["epoch"] == 1
    assert {k: v for k, v in tree(runs).items() if not k.startswith("c/")} == older


@pytest.mark.slow
def test_resume_auto_on_a_newest_run_with_only_best_pt(cli, runs):
    shutil.copytree(runs / "a", runs / "c")
    (runs / "c" / "last.pt").unlink()
    (runs / "c" / "best.pt").touch()  # written last of all the runs' files
    result = cli("train", "--resume", "auto", "--logdir", runs, "--epochs", "2")
    assert result.exit_code == 0, result.stderr
    assert f"resuming {runs / 'c' / 'best.pt'} at epoch 2" in said(result)
    assert load_checkpoint(runs / "c" / "last.pt")["epoch"] == 2
    assert load_checkpoint(runs / "a" / "last.pt")["epoch"] == 1


def test_an_lr_find_sweep_is_never_taken_for_a_run(cli, runs):
    """A sweep's folder has config.yaml and run.json like a run's: `--resume auto` passes it
    over, and naming it is refused, so its events are never purged by a restart."""
    assert cli("lr-find", *TINY, "--steps", "5", "--logdir", runs, "--run-name", "s").exit_code == 0
    sweep = tree(runs / "s")
    result = cli("train", "--resume", "auto", "--logdir", runs, "--epochs", "2")
    assert result.exit_code == 0, result.stderr
    assert f"resuming {runs / 'b' / 'last.pt'}" in said(result)  # the newest training run
    line = one_line_error(cli("train", "--resume", runs / "s"), (2,))
    assert f"{runs / 's'} holds an lr-find sweep, not a training run" in line
    assert tree(runs / "s") == sweep


def test_resume_auto_with_no_run_is_one_line(cli, tmp_path):
    (tmp_path / "runs" / "not-a-run").mkdir(parents=True)
    line = one_line_error(cli("train", "--resume", "auto", "--logdir", tmp_path / "runs"), (2,))
    assert f"--resume auto: no run under {tmp_path / 'runs'}" in line


# --- The "already completed" note counts the checkpoint's epochs ---------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "asked"), [([], "train.epochs 1"), (["--epochs", "1"], "--epochs 1")],
    ids=["its-own-epochs", "epochs-flag"],
)  # fmt: skip
def test_resuming_a_completed_run_says_what_it_completed(cli, runs, args, asked):
    last = (runs / "a" / "last.pt").read_bytes()
    result = cli("train", "--resume", runs / "a", *args)
    assert result.exit_code == 0, result.stderr
    assert (
        f"resuming {runs / 'a' / 'last.pt'}: that run already completed 1 epoch (step 2); "
        f"{asked} trains nothing more: pass --epochs N with N > 1 to go on" in said(result)
    )
    assert "at epoch 2" not in said(result)
    assert (runs / "a" / "last.pt").read_bytes() == last


# --- A divergence found at a save names the step it began ---------------------------------
EIGHT_STEPS = ["-c", str(SMOKE), "-q", "--set", "data.train_size=256", "--set",
               "data.test_size=64", "--batch-size", "32", "--set", "train.amp=false",
               "--lr", "1e30", "--set", "optim.name=sgd", "--set", "optim.nesterov=false",
               "--epochs", "1"]  # fmt: skip


@pytest.mark.slow
def test_a_divergence_caught_at_a_save_names_its_first_non_finite_step(cli, tmp_path):
    strict = cli("train", *EIGHT_STEPS, "--set", "train.max_nonfinite_steps=1",
                 "--logdir", tmp_path / "strict")  # fmt: skip
    first = re.search(r"from step (\d+)", one_line_error(strict, (1,)))
    assert first, strict.stderr
    lax = cli("train", *EIGHT_STEPS, "--set", "train.max_nonfinite_steps=1000",
              "--logdir", tmp_path / "lax")  # fmt: skip
    line = one_line_error(lax, (1,))
    found = re.search(
        r"holds inf/NaN values at step (\d+); the loss or gradient norm was non-finite from "
        r"step (\d+); no checkpoint was saved", line,
    )  # fmt: skip
    assert found, line
    assert int(found[1]) == 8  # the end-of-epoch save found it
    assert int(found[2]) == int(first[1]) < 8  # where the per-step guard would have stopped
    assert not list((tmp_path / "lax").rglob("*.pt"))


# --- A signal during the last epoch's evaluation still sets the exit code -----------------
def signal_during_evaluation(monkeypatch, epoch: int, sig: signal.Signals) -> None:
    """Send `sig` to this process while epoch `epoch` (1-based) is being evaluated."""
    real = trainer.evaluate_split

    def evaluate(run, split):
        if run.pos.epoch == epoch - 1:  # the epoch is counted done after its evaluation
            signal.raise_signal(sig)
        return real(run, split)

    monkeypatch.setattr(trainer, "evaluate_split", evaluate)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("straight")
    result = Cli()("train", *TINY, "--epochs", "2", "--logdir", logdir, "--run-name", "ref")
    assert result.exit_code == 0, result.stderr
    return logdir / "ref"


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_last_evaluation_exits_with_its_code(
    cli, tmp_path, monkeypatch, straight, sig, code
):
    signal_during_evaluation(monkeypatch, 2, sig)
    result = cli("train", *TINY, "--epochs", "2", "--logdir", tmp_path, "--run-name", "r")
    assert result.exit_code == code, said(result)
    assert (
        f"{sig.name} came as the last epoch ended: the run is complete and "
        f"{tmp_path / 'r' / 'last.pt'} holds it (resuming it would train nothing more)"
        in said(result)
    )
    assert "resume with:" not in said(result)  # nothing is left to resume
    saved = load_checkpoint(tmp_path / "r" / "last.pt")
    assert (saved["epoch"], saved["global_step"]) == (2, 2 * STEPS)
    assert same_weights(tmp_path / "r" / "last.pt", straight / "last.pt")


@pytest.mark.slow
def test_a_signal_during_an_earlier_evaluation_stops_at_that_epoch(
    cli, tmp_path, monkeypatch, straight
):
    signal_during_evaluation(monkeypatch, 1, signal.SIGINT)
    result = cli("train", *TINY, "--epochs", "2", "--logdir", tmp_path, "--run-name", "r")
    assert result.exit_code == 130, said(result)
    assert "resume with: cifar-bp train --resume" in result.stdout
    saved = load_checkpoint(tmp_path / "r" / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 0, STEPS)
    monkeypatch.undo()
    resumed = cli("train", "--resume", tmp_path / "r")
    assert resumed.exit_code == 0, resumed.stderr
    assert same_weights(tmp_path / "r" / "last.pt", straight / "last.pt")


# --- inspect-grads --logdir on a full disk: one line, exit 1 ------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["writer-thread", "tracker"])
def test_inspect_grads_on_a_full_disk_is_one_line(cli, tmp_path, monkeypatch, capfd, where):
    if where == "writer-thread":  # the events go to disk from TensorBoard's own thread
        from tensorboard.summary.writer.record_writer import RecordWriter

        monkeypatch.setattr(RecordWriter, "write", no_space)
    else:
        import cifar_bp.tracking

        monkeypatch.setattr(cifar_bp.tracking, "Tracker", no_space)
    result = cli("inspect-grads", "-c", SMOKE, "--logdir", tmp_path / "ig")
    line = one_line_error(result, (1,))
    assert re.fullmatch(
        rf"error: cannot write TensorBoard events in {re.escape(str(tmp_path))}/ig/inspect-\S+ "
        r"\(--logdir\): No space left on device; nothing was kept", line,
    ), line  # fmt: skip
    assert "Exception in thread" not in capfd.readouterr().err
    assert list((tmp_path / "ig").iterdir()) == []  # the half-written inspection is gone


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("room_kb", [0, 24], ids=["full", "room-for-the-first-events"])
def test_inspect_grads_on_a_real_full_disk(cli, tmp_path, capfd, room_kb):
    with mounted_tmpfs(tmp_path / "full", "64k") as full:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as filler:
            filler.write(b"\0" * (64 - room_kb) * 1024)
        result = cli("inspect-grads", "-c", SMOKE, "--logdir", full / "ig")
        line = one_line_error(result, (1,))
        assert "No space left on device" in line, line
        assert "Exception in thread" not in capfd.readouterr().err
        assert not list((full / "ig").glob("inspect-*"))  # the half-written inspection is gone
