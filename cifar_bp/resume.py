"""Picking a run up again: which checkpoint, and what may differ from when it was saved.

The checkpoint's format is `checkpoint.py`'s; this module decides whether a resume is safe:
the config (only SAFE_KEYS may change), the data (same classes, same images) and the folder
(`rundir.check_owner`). Anything unsafe is refused unless `--force`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_bp.config import Config, resolve_config
from cifar_bp.errors import UsageError

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


def find_checkpoint(spec: str, logdir: Path, run_name: str | None) -> Path:
    """`--resume PATH` (a checkpoint or a run directory) or `--resume auto`: the newest run
    under the log directory (with `--run-name`, that run) that has a last.pt."""
    if spec != "auto":
        path = Path(spec)
        path = path / "last.pt" if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"--resume {spec}: no checkpoint at {path}")
        return path
    pattern = f"{run_name}/last.pt" if run_name else "*/last.pt"
    found = sorted(logdir.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UsageError(f"--resume auto: no run with a last.pt under {logdir}/{pattern}")
    return found[-1]


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
    folder = Path(spec)
    if spec != "auto" and folder.is_dir() and not (folder / "last.pt").exists():
        return restart(folder, config_path, flags, sets)
    path = find_checkpoint(spec, Path(cfg.log.logdir), cfg.log.run_name)
    payload = load_checkpoint(path)
    old = config_of(payload, path)
    cfg = resolve_config(config_path, flags, sets, base=None if config_path else old)
    changes = check_resume_config(old, cfg, force)
    facts = facts_of(payload)
    notes = [f"resuming {path} at epoch {facts.epoch + 1}, step {facts.global_step}"]
    if facts.epoch >= cfg.train.epochs:
        notes.append(
            f"that run already completed {cfg.train.epochs} epoch(s): pass --epochs N to go on"
        )
    notes += [f"changed on resume: {key}" for key in changes]
    return Start(cfg, payload, path.parent, path, notes)


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
