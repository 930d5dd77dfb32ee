"""A run's folder: where it goes, who owns it, and who may write to it right now.

A run folder belongs to one run. `run.json` names the run's id, and every checkpoint carries
the same id, so a checkpoint copied into another run's folder is noticed before it overwrites
anything there; a folder that is no run's (a downloads folder) is not adopted either.
While a process trains a run it holds `.lock` (an flock, released by the kernel when the
process dies, so a lock left by a killed process is never in the way).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from cifar_bp.config import Config
from cifar_bp.errors import CliError, UsageError

IDENTITY = "run.json"
TRAINING = "train"  # run.json's kind for a training run; lr-find writes "lr-find"
LOCK = ".lock"
NAME_MAX = 255  # bytes in one path component on Linux and macOS file systems


def new_run_id() -> str:
    return uuid.uuid4().hex


def default_run_name(cfg: Config) -> str:
    """What differs between runs first, so the run list reads well; the time keeps it unique."""
    what = f"{cfg.loss.name}-{cfg.loss.reduction}-{cfg.optim.name}-lr{cfg.optim.lr:g}"
    return f"{what}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_logdir(logdir: Path) -> None:
    try:
        _check_logdir(logdir)
    except OSError as err:  # e.g. a path longer than the system allows
        raise UsageError(f"log.logdir {str(logdir)[:80]}…: {err.strerror or err}") from None


def _check_logdir(logdir: Path) -> None:
    if logdir.exists() and not logdir.is_dir():
        raise UsageError(f"log.logdir {logdir} is a file, not a directory")
    probe = logdir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(
            f"log.logdir {logdir} cannot be created: {probe} is a file, not a directory"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"log.logdir {logdir} cannot be written ({probe} is not writable)")


def plan_run_dir(cfg: Config) -> Path:
    """Where a new run will write. Nothing is created yet: a run that fails its checks
    before training starts leaves nothing behind."""
    logdir = Path(cfg.log.logdir)
    check_logdir(logdir)
    if cfg.log.run_name:
        if len(cfg.log.run_name.encode()) > NAME_MAX:
            raise UsageError(
                f"log.run_name is {len(cfg.log.run_name)} characters long; a folder name may "
                f"have at most {NAME_MAX}"
            )
        run_dir = logdir / cfg.log.run_name
        if run_dir.exists():
            raise UsageError(
                f"run {run_dir} already exists: choose another --run-name, or continue it "
                f"with --resume {run_dir}"
            )
        return run_dir
    run_dir, n = logdir / default_run_name(cfg), 1
    while run_dir.exists():  # two runs started within the same second
        n += 1
        run_dir = logdir / f"{default_run_name(cfg)}-{n}"
    return run_dir


def create_run_dir(
    run_dir: Path, cfg: Config, run_id: str, chosen: Sequence[str] = (), kind: str = TRAINING
) -> None:
    """The new run's folder with its config.yaml and run.json, whole or not at all: a
    folder left half-written (a full disk) would refuse the rerun as "already exists".

    config.yaml keeps `auto` as given, so a resume on another machine chooses again; what
    `auto` became on this one (`chosen`, e.g. the precision line) heads it as comments."""
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except OSError as err:
        raise CliError(f"cannot create run directory {run_dir}: {err.strerror or err}") from None
    try:
        head = [f"# chosen on this machine: {line}" for line in chosen]
        (run_dir / "config.yaml").write_text("".join(f"{h}\n" for h in head) + cfg.to_yaml())
        write_identity(run_dir, run_id, kind)
    except OSError as err:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise CliError(f"cannot create run directory {run_dir}: {err.strerror or err}") from None


def write_identity(run_dir: Path, run_id: str, kind: str = TRAINING) -> None:
    """run.json: the run's id, and its kind (a training run, or an lr-find sweep, which
    `--resume` must never take for one)."""
    (run_dir / IDENTITY).write_text(json.dumps({"run_id": run_id, "kind": kind}) + "\n")


def kind_of(run_dir: Path) -> str:
    """What run.json says the folder holds; a training run where it says nothing (run.json
    files from before the kind was written, or none at all)."""
    try:
        kind = json.loads((run_dir / IDENTITY).read_text()).get("kind", TRAINING)
    except (OSError, ValueError, AttributeError):
        return TRAINING
    return kind if isinstance(kind, str) else TRAINING


def read_identity(run_dir: Path) -> str | None:
    try:
        value = json.loads((run_dir / IDENTITY).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def check_owner(run_dir: Path, checkpoint: Path, run_id: str | None, force: bool) -> list[str]:
    """Refuse to resume into a folder that belongs to another run (its run.json, last.pt or
    best.pt name another run id), or into a folder that is no run's at all (a downloads
    folder), unless `force`. A folder holding nothing but this run's checkpoints is its own."""
    problem = foreign_owner(run_dir, checkpoint, run_id) or stranger_folder(
        run_dir, checkpoint, run_id
    )
    if problem is None:
        return []
    what, adopted = problem
    if not force:
        raise UsageError(
            f"{what}. Copy the checkpoint into a folder of its own (mkdir NEW && cp "
            f"{shlex.quote(str(checkpoint))} NEW/last.pt) and resume that (cifar-bp train "
            "--resume NEW), or pass --force to adopt this folder"
        )
    return [f"--force: {run_dir} now continues run {(run_id or '?')[:8]} ({adopted})"]


def foreign_owner(run_dir: Path, checkpoint: Path, run_id: str | None) -> tuple[str, str] | None:
    """Which of the folder's run.json, last.pt and best.pt names another run than `run_id`."""
    if run_id is None:  # a checkpoint that does not say which run it is
        return None
    owner = read_identity(run_dir)
    if owner is not None and owner != run_id:
        return (
            f"{checkpoint} belongs to another run than the folder it sits in ({run_dir} is run "
            f"{owner[:8]}, the checkpoint is from run {run_id[:8]}); resuming would overwrite "
            "that run's checkpoints",
            f"it held run {owner[:8]}",
        )
    for name in ("last.pt", "best.pt"):
        other = checkpoint_owner(run_dir / name, checkpoint)
        if other is not None and other != run_id:
            return (
                f"{checkpoint} belongs to another run than the folder it would write to "
                f"({run_dir / name} is from run {other[:8]}, the checkpoint from run "
                f"{run_id[:8]}); resuming would overwrite it",
                f"its {name} was from run {other[:8]}",
            )
    return None


def stranger_folder(run_dir: Path, checkpoint: Path, run_id: str | None) -> tuple[str, str] | None:
    """A folder without run.json or config.yaml that holds more than this run's checkpoints
    (and what a killed trainer leaves: .lock, temporary files) is not a run folder."""
    if (run_dir / IDENTITY).exists() or (run_dir / "config.yaml").exists():
        return None
    try:
        entries = sorted(run_dir.iterdir())
    except OSError:
        return None  # unreadable: the lock or the first write reports it
    others = [p.name for p in entries if not _belongs(p, checkpoint, run_id)]
    if not others:
        return None
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (
        f"{run_dir} is not a run folder (no run.json or config.yaml) and holds other files "
        f"({shown}); resuming would write checkpoints and TensorBoard events among them",
        "it was not a run folder",
    )


def _belongs(path: Path, checkpoint: Path, run_id: str | None) -> bool:
    """The checkpoint itself, a last.pt/best.pt of the same run, or a trainer's leftover."""
    from cifar_bp.checkpoint import is_temporary

    name = path.name
    if name == LOCK or is_temporary(name) or _same_file(path, checkpoint):
        return True
    return (
        name in ("last.pt", "best.pt")
        and run_id is not None
        and (checkpoint_owner(path, checkpoint) == run_id)
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def checkpoint_owner(path: Path, checkpoint: Path) -> str | None:
    """The run id in the checkpoint at `path` (None: none there, it is `checkpoint` itself,
    it is not a readable checkpoint, or it names no run)."""
    from cifar_bp.checkpoint import facts_of, load_checkpoint

    if not path.is_file() or path.suffix != ".pt" or _same_file(path, checkpoint):
        return None
    try:
        return facts_of(load_checkpoint(path)).run_id
    except (CliError, KeyError, TypeError, ValueError):
        return None


class RunLock:
    """One trainer per run folder at a time: the second is refused, naming the first's pid.

    `acquire` takes it when the folder is claimed; `with lock:` then holds it for the
    training and releases it at the end (it takes it first where nothing has)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        if self.file is None:
            self.acquire()
        return self

    def acquire(self) -> None:
        try:
            self.file = open(self.path, "a+")  # noqa: SIM115 (held until release)
        except OSError as err:
            raise CliError(f"cannot write in {self.path.parent}: {err.strerror or err}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.file.seek(0)
            owner = self.file.read().strip() or "unknown"
            self.file.close()
            raise UsageError(
                f"run {self.path.parent} is being trained by another process (pid {owner}); "
                "wait for it to finish or stop it first"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.truncate(0)
            self.file.close()
            self.file = None
