"""Picking a run up again: which checkpoint, and what may differ from when it was saved.

The checkpoint's format is `checkpoint.py`'s; this module decides whether a resume is safe:
the config (only SAFE_KEYS may change), the data (same classes, same images) and the folder
(`rundir.check_owner`). Anything unsafe is refused unless `--force`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote
from typing import TYPE_CHECKING, Any

from cifar_bp.config import Config, resolve_config
from cifar_bp.errors import UsageError
from cifar_bp.rundir import TRAINING, kind_of

if TYPE_CHECKING:
    from cifar_bp.checkpoint import Facts

# Keys that may change on resume without silently changing what is being trained.
SAFE_KEYS = (
    "train.epochs",
    "train.eval_batch_size",
    "train.eval_flip",
    "train.eval_shift",
    "train.checkpoint_every_n_steps",
    "train.max_nonfinite_steps",
    "train.device",
    "train.compile",
    "data.download",
    "data.cache_dir",
    "log.",
)


@dataclass
class Start:
    """What `train` starts from: a config, and for a resume the checkpoint and its folder."""

    cfg: Config
    payload: dict[str, Any] | None = None
    run_dir: Path | None = None
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)


def locate(spec: str, logdir: Path, run_name: str | None) -> tuple[Path, Path | None, list[str]]:
    """`--resume PATH` (a checkpoint or a run folder) or `--resume auto`: the run folder, its
    checkpoint (None where it never saved one) and what to tell the user about the choice."""
    if spec == "auto":
        return newest_run(logdir, run_name)
    path = Path(spec)
    folder = path if path.is_dir() else path.parent
    if kind_of(folder) != TRAINING:
        raise UsageError(
            f"--resume {spec}: {folder} holds an {kind_of(folder)} sweep, not a training run; "
            "start a new run with cifar-bp train instead"
        )
    if path.is_dir():
        return (path, *checkpoint_in(path))
    if not path.is_file():
        raise UsageError(f"--resume {spec}: no checkpoint at {path}")
    return path.parent, path, []


def checkpoint_in(folder: Path) -> tuple[Path | None, list[str]]:
    """A run folder's last.pt; where only its best.pt is left, that (never overwrite it by
    starting the run again from scratch)."""
    if (folder / "last.pt").is_file():
        return folder / "last.pt", []
    if (folder / "best.pt").is_file():
        note = (
            f"{folder} has no last.pt: resuming from its best.pt instead (its best epoch, "
            "which need not be its last)"
        )
        return folder / "best.pt", [note]
    return None, []


RUN_FILES = ("last.pt", "best.pt", "run.json", "config.yaml")


def newest_run(logdir: Path, run_name: str | None) -> tuple[Path, Path | None, list[str]]:
    """The run folder under `logdir` (with `--run-name`, that one) written to last, even one
    stopped before its first checkpoint: that one starts again, as `--resume DIR` would."""
    try:
        folders = [logdir / run_name] if run_name else sorted(logdir.iterdir())
    except OSError:
        folders = []
    # An lr-find sweep's folder looks like a run's (config.yaml, run.json) but is none.
    training = [f for f in folders if f.is_dir() and kind_of(f) == TRAINING]
    runs = sorted((t, f) for f in training if (t := last_written(f)) > 0)
    if not runs:
        named = f" named {run_name}" if run_name else ""
        raise UsageError(f"--resume auto: no run{named} under {logdir}")
    folder = runs[-1][1]
    path, notes = checkpoint_in(folder)
    if path is not None:
        return folder, path, notes
    older = next((f for _, f in reversed(runs[:-1]) if checkpoint_in(f)[0]), None)
    also = (
        f" (to continue the older {older} instead: --resume {quote(str(older))})" if older else ""
    )
    return folder, None, [f"--resume auto: the newest run is {folder}{also}"]


def last_written(folder: Path) -> float:
    """When a run last wrote its checkpoint, identity or config (0: not a run folder)."""
    times = [0.0]
    for name in RUN_FILES:
        with contextlib.suppress(OSError):  # absent, or removed while we look
            times.append((folder / name).stat().st_mtime)
    return max(times)


def config_changes(old: dict[str, Any], new: Config) -> list[str]:
    """Dotted keys whose value differs between the checkpoint's config and the new one."""
    changed: list[str] = []

    def walk(prefix: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(f"{prefix}.{key}" if prefix else key, a.get(key), b.get(key))
        elif a != b:
            changed.append(prefix)

    walk("", old, new.model_dump(mode="json"))
    return changed


def check_resume_config(old: dict[str, Any], new: Config, force: bool) -> list[str]:
    """Refuse changes that would silently make a different run; return the allowed ones."""
    changes = config_changes(old, new)
    unsafe = [key for key in changes if not key.startswith(SAFE_KEYS)]
    if unsafe and not force:
        raise UsageError(
            f"resuming with a changed {', '.join(unsafe)} would silently change the run; "
            "keep the checkpoint's values, or pass --force to resume anyway"
        )
    return changes


def check_resume_data(
    payload: dict[str, Any], classes: tuple[str, ...], identity: str, force: bool
) -> list[str]:
    """The same classes in the same order, and the same images, as when the run was saved:
    a renamed class folder would silently swap labels."""
    from cifar_bp.checkpoint import facts_of

    facts = facts_of(payload)
    saved = facts.classes
    problems = []
    if saved and saved != classes:
        gone = [c for c in saved if c not in classes]
        new = [c for c in classes if c not in saved]
        what = f"removed {', '.join(gone) or '-'}; added {', '.join(new) or '-'}"
        if not gone and not new:
            what = "the same names in another order"
        problems.append(f"the classes changed ({what})")
    elif facts.data_identity not in (None, identity):
        problems.append("the images changed (added, removed or edited files)")
    if problems and not force:
        raise UsageError(
            f"the data changed since the checkpoint was saved: {'; '.join(problems)}. Restore "
            "the data, start a new run, or pass --force to resume on the new data anyway"
        )
    return [f"--force: resuming although {p}" for p in problems]


def prepare_resume(
    spec: str | None, config_path: Path | None, flags: dict[str, Any], sets: list[str], force: bool
) -> Start:
    """Resolve the config for `train`; with `--resume`, start from the checkpoint's config.

    A run folder left without a checkpoint (stopped before its first save) starts again
    from scratch in the same folder, with the config it was created with.
    """
    from cifar_bp.checkpoint import config_of, facts_of, load_checkpoint

    cfg = resolve_config(config_path, flags, sets)
    if spec is None:
        return Start(cfg)
    folder, path, notes = locate(spec, Path(cfg.log.logdir), cfg.log.run_name)
    if path is None:
        start = restart(folder, config_path, flags, sets)
        start.notes[:0] = notes
        return start
    payload = load_checkpoint(path)
    old = config_of(payload, path)
    cfg = resolve_config(config_path, flags, sets, base=None if config_path else old)
    changes = check_resume_config(old, cfg, force)
    notes.append(position_note(path, facts_of(payload), cfg.train.epochs, "epochs" in flags))
    notes += [f"changed on resume: {key}" for key in changes]
    return Start(cfg, payload, path.parent, path, notes)


def position_note(path: Path, facts: Facts, epochs: int, epochs_flag: bool) -> str:
    """Where the resume picks up; for a run that has trained all its epochs, that nothing
    more will be trained and how to go on."""
    if facts.epoch < epochs:
        return f"resuming {path} at epoch {facts.epoch + 1}, step {facts.global_step}"
    done = f"{facts.epoch} epoch{'' if facts.epoch == 1 else 's'}"
    asked = f"--epochs {epochs}" if epochs_flag else f"train.epochs {epochs}"
    return (
        f"resuming {path}: that run already completed {done} (step {facts.global_step}); "
        f"{asked} trains nothing more: pass --epochs N with N > {facts.epoch} to go on"
    )


def restart(
    folder: Path, config_path: Path | None, flags: dict[str, Any], sets: list[str]
) -> Start:
    """`--resume DIR` on a run folder that never saved a checkpoint."""
    from cifar_bp.config import read_yaml

    saved = folder / "config.yaml"
    if not saved.is_file():
        raise UsageError(f"--resume {folder}: no checkpoint (last.pt) and no config.yaml there")
    base = None if config_path else read_yaml(saved)
    if base == {}:  # written by a run that failed at its start: its settings are lost
        raise UsageError(
            f"--resume {folder}: its config.yaml is empty and there is no checkpoint, so the "
            "run's settings are lost: delete the folder and start the run again"
        )
    cfg = resolve_config(config_path, flags, sets, base=base, base_origin=str(saved))
    note = f"{folder} has no checkpoint yet (stopped before the first save): starting from scratch"
    return Start(cfg, None, folder, None, [note])
