"""Every user mistake: one specific line on stderr, the right exit code, no traceback, and the
file system exactly as it was."""

from __future__ import annotations

import contextlib
import datetime
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifar_bp.checkpoint import FORMAT_VERSION, load_checkpoint
from tests.helpers import SMOKE

TINY = ["--config", str(SMOKE), "-q", "--set", "data.train_size=128", "--set", "data.test_size=64"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}  # fmt: skip


def setup_case(tmp: Path, case: str) -> list[str]:
    """Lay out what the case needs under tmp and return the `train` arguments."""
    runs = ["--logdir", str(tmp / "runs")]
    data = tmp / "data"
    if case == "x":  # the flags alone are the mistake
        return []
    if case == "malformed":
        (tmp / "c.yaml").write_text("train:\n  epochs: 2\n   batch_size: 64\n")
        return ["--config", str(tmp / "c.yaml"), *runs]
    files = {
        "unknown_key": "optim:\n  learning_rate: 0.1\n",
        "wrong_type": "train:\n  epochs: many\n",
        "out_of_range": "train:\n  batch_size: 0\n",
        "bad_optimizer": "optim:\n  name: rmsprop\n",
    }
    if case in files:
        (tmp / "c.yaml").write_text(files[case])
        return ["--config", str(tmp / "c.yaml"), *runs]
    if case == "root_is_file":
        data.write_text("not a directory")
    if case == "corrupt_batches":
        (data / "cifar-10-batches-py").mkdir(parents=True)
        for name in ["data_batch_1", "test_batch", "batches.meta"]:
            (data / "cifar-10-batches-py" / name).write_bytes(b"\x00garbage")
    if case == "logdir_under_file":
        (tmp / "file").write_text("x")
        return [*TINY, "--logdir", str(tmp / "file" / "runs")]
    if case == "run_exists":
        (tmp / "runs" / "taken").mkdir(parents=True)
        (tmp / "runs" / "taken" / "config.yaml").write_text("mine\n")
        return [*TINY, *runs, "--run-name", "taken"]
    cifar = ["--set", "data.source=cifar10", "--set", f"data.root={data}",
             "--set", "data.download=false"]  # fmt: skip
    return [*TINY, *runs, *cifar]


CASES = [
    ("malformed", [], 2, "malformed YAML at line 3, column 14"),
    ("unknown_key", [], 2, "unknown key 'optim.learning_rate'"),
    ("wrong_type", [], 2, "train.epochs: must be a valid integer"),
    ("out_of_range", [], 2, "train.batch_size: must be greater than or equal to 1"),
    ("bad_optimizer", [], 2, "optim.name: must be 'sgd', 'adam', 'adamw' or 'muon'"),
    ("x", ["--loss", "focal"], 2, "loss.name: must be 'ce', 'mse' or 'l1'"),
    ("x", ["--reduction", "max"], 2, "loss.reduction: must be"),
    ("x", ["--device", "mps"], 2, "device must be auto, cpu, cuda or cuda:N"),
    ("x", ["--device", "cuda"], 2, "CUDA is not available on this machine"),
    ("x", ["--lr", "0"], 2, "optim.lr: must be greater than 0"),
    ("x", ["--set", "train.amp_dtype=float16", "--amp"], 2, "amp_dtype=float16 needs CUDA"),
    ("data_missing", [], 1, "CIFAR-10 not found or corrupt"),
    ("root_is_file", [], 1, "is a file, not a directory"),
    ("corrupt_batches", [], 1, "CIFAR-10 not found or corrupt"),
    ("logdir_under_file", [], 2, "is a file, not a directory"),
    ("run_exists", [], 2, "already exists"),
]


@pytest.mark.parametrize(("case", "extra", "code", "message"), CASES)
def test_bad_input_is_explained_and_changes_nothing(cli, tmp_path, case, extra, code, message):
    args = setup_case(tmp_path, case)
    if not any(a.startswith("--config") for a in args):
        args = [*TINY, "--logdir", str(tmp_path / "runs"), *args]
    before = snapshot(tmp_path)
    result = cli("train", *args, *extra)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(tmp_path) == before


def test_debug_flag_shows_the_traceback(tmp_path):
    import sys

    cmd = [sys.executable, "-m", "cifar_bp", "--debug", "train", "--lr", "0",
           "--logdir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str, readonly: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_logdir(cli, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        result = cli("train", *TINY, "--logdir", ro / "runs")
        assert result.exit_code == 2
        assert "cannot be written" in result.stderr


def test_disk_full_while_checkpointing_keeps_the_previous_one(cli, tmp_path):
    # A checkpoint of the smoke run is about 1.8 MB: last.pt and best.pt fit after epoch 1,
    # and the epoch-2 last.pt has no room beside them.
    with mounted_tmpfs(tmp_path / "small", "4500k") as small:
        result = cli("train", *TINY, "--epochs", "3", "--logdir", small, "--run-name", "r",
                     "--set", "optim.lr=1e-9")  # fmt: skip
        assert result.exit_code == 1
        assert "could not write checkpoint" in result.stderr
        assert "previous checkpoint is intact" in result.stderr
        survivor = load_checkpoint(small / "r" / "last.pt")
        assert survivor["epoch"] >= 1
        assert not list((small / "r").glob(".*tmp*"))  # the partial file was removed


def test_disk_full_at_the_first_checkpoint_says_none_was_saved(cli, tmp_path):
    # Room for the run's folder and event file, not for a 1.8 MB checkpoint.
    with mounted_tmpfs(tmp_path / "tiny", "1m") as tiny:
        result = cli("train", *TINY, "--epochs", "1", "--logdir", tiny, "--run-name", "r")
        assert result.exit_code == 1
        line = one_error_line(result)
        assert "could not write checkpoint" in line and line.endswith("; none was saved")
        assert not (tiny / "r" / "last.pt").exists()


def bad_checkpoints(tmp: Path, good: Path) -> dict[str, Path]:
    payload = torch.load(good, weights_only=True)
    out = {"truncated": tmp / "truncated.pt", "garbage": tmp / "garbage.pt"}
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["garbage"].write_bytes(b"definitely not a checkpoint")
    out["image"] = tmp / "photo.png"
    Image.new("RGB", (8, 8)).save(out["image"])
    torch.save({"when": datetime.date(2026, 1, 1)}, tmp / "objects.pt")  # not weights-only
    out["objects"] = tmp / "objects.pt"
    for kind, average in (("no-average-weights", {"updates": 3}),
                          ("empty-average", {"weights": {}, "updates": 3})):  # fmt: skip
        torch.save({**payload, "average": average}, tmp / f"{kind}.pt")
        out[kind] = tmp / f"{kind}.pt"
    torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    out["foreign"] = tmp / "foreign.pt"
    torch.save({**payload, "format_version": FORMAT_VERSION + 1}, tmp / "future.pt")
    out["future"] = tmp / "future.pt"
    misfit = dict(payload["model"])
    misfit["model1.linear2.weight"] = torch.zeros(5, 64)
    torch.save({**payload, "model": misfit}, tmp / "misfit.pt")
    out["misfit"] = tmp / "misfit.pt"
    out["good"] = good
    return out


MESSAGES = {
    "truncated": "not a readable checkpoint: truncated or damaged",
    "garbage": "not a readable checkpoint: it is not a file torch.save wrote",
    "image": "not a readable checkpoint: it is not a file torch.save wrote",
    "objects": "holds Python objects besides tensors and plain values",
    "no-average-weights": "damaged checkpoint: its weight average holds no weights",
    "empty-average": "damaged checkpoint: its weight average holds no weights",
    "foreign": "not a cifar-bp checkpoint",
    "future": f"this cifar-bp reads format {FORMAT_VERSION}",
    "misfit": "do not fit the model",
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    from typer.testing import CliRunner

    from cifar_bp.cli import app

    tmp = tmp_path_factory.mktemp("ckpt")
    result = CliRunner().invoke(app, ["train", *TINY, "--epochs", "1", "--logdir", str(tmp),
                                      "--run-name", "good"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return bad_checkpoints(tmp, tmp / "good" / "last.pt")


@pytest.mark.parametrize("kind", sorted(MESSAGES))
@pytest.mark.parametrize("command", ["evaluate", "resume", "inspect-grads"])
def test_bad_checkpoints_are_one_clear_message(cli, broken, kind, command):
    path = broken[kind]
    if command == "resume":
        result = cli("train", "--resume", path, "--logdir", path.parent)
    else:
        result = cli(command, "--checkpoint", path)
    assert result.exit_code == 1, result.stderr
    assert MESSAGES[kind] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "weights_only" not in result.stderr  # torch's advice to load unsafely is not ours


EVALUATE_MISTAKES = [
    (["-c", "data5.yaml"], "{tmp}/data5.yaml: data: must be a mapping of keys (got 5)"),
    (["-c", "negative.yaml"],
     "{tmp}/negative.yaml: data.test_size: must be greater than or equal to 1 (got -4)"),
    (["--device", "gpu"],
     "--device: train.device: device must be auto, cpu, cuda or cuda:N (got 'gpu')"),
    (["--set", "data.test_size=0"],
     "--set data.test_size=0: data.test_size: must be greater than or equal to 1 (got 0)"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "line"), EVALUATE_MISTAKES)
def test_evaluate_blames_what_the_user_typed(cli, broken, tmp_path, args, line):
    """Not "the checkpoint's config" for a -c file's data, nor "--set" for --device."""
    (tmp_path / "data5.yaml").write_text("data: 5\n")
    (tmp_path / "negative.yaml").write_text("data:\n  test_size: -4\n")
    args = [str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    result = cli("evaluate", "--checkpoint", broken["good"], *args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == f"error: {line.format(tmp=tmp_path)}\n"


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr + result.stdout
    assert lines and lines[-1].startswith("error: ")
    assert sum(line.startswith("error:") for line in lines) == 1, result.stderr
    return lines[-1]


def test_full_disk_at_start_up_is_one_line(cli, tmp_path):
    """No room even for config.yaml: the run fails where it creates its folder, not later."""
    with mounted_tmpfs(tmp_path / "full", "64k") as full:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        result = cli("train", *TINY, "--epochs", "1", "--logdir", full / "runs")
        assert result.exit_code == 1, result.stderr
        assert "No space left" in one_error_line(result)
        # No half-made folder: it would refuse the rerun as "already exists".
        assert not [p for p in (full / "runs").rglob("*") if p.is_dir()]


def test_resume_of_a_folder_whose_config_was_never_written_is_refused(cli, tmp_path):
    """A run that failed at its start left an empty config.yaml and no checkpoint: its
    settings are lost, so starting "from scratch" with the built-in defaults is refused."""
    folder = tmp_path / "runs" / "t3"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("")
    result = cli("train", "--resume", folder)
    assert result.exit_code == 2
    assert "config.yaml is empty" in one_error_line(result)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]  # nothing trained


def test_read_only_run_folder_on_resume_is_one_line(cli, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "20m") as ro:
        trained = cli("train", *TINY, "--epochs", "1", "--logdir", ro, "--run-name", "r")
        assert trained.exit_code == 0, trained.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = snapshot(ro)
        result = cli("train", "--resume", ro / "r", "--epochs", "2")
        assert result.exit_code in (1, 2), result.stderr
        assert "read-only" in one_error_line(result).lower()
        assert snapshot(ro) == before
