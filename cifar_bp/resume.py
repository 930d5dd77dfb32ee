"""Where a run stands, and how to pick it up again exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifar_bp.config import Config
from cifar_bp.errors import CliError, UsageError

# Keys that may change on resume without silently changing what is being trained.
SAFE_KEYS = (
    "train.epochs",
    "train.eval_batch_size",
    "train.eval_flip",
    "train.checkpoint_every_n_steps",
    "train.max_nonfinite_steps",
    "train.device",
    "data.download",
    "data.cache_dir",
    "log.",
)


@dataclass
class Position:
    """Completed work: `epoch` epochs, then `step_in_epoch` steps of the next one."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def advance(self) -> None:
        self.step_in_epoch += 1
        self.global_step += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


def rng_state(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


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


def checkpoint_config(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    cfg = payload.get("config")
    if not isinstance(cfg, dict):
        raise CliError(f"{path}: the checkpoint holds no config")
    return cfg


def prepare_resume(
    spec: str | None, config_path: Path | None, flags: dict[str, Any], sets: list[str], force: bool
) -> tuple[Config, dict[str, Any] | None, Path | None, list[str]]:
    """Resolve the config for `train`; with `--resume`, start from the checkpoint's config.

    Returns (config, checkpoint payload or None, run directory or None, notes for the user).
    """
    from cifar_bp.checkpoint import load_checkpoint
    from cifar_bp.config import resolve_config

    cfg = resolve_config(config_path, flags, sets)
    if spec is None:
        return cfg, None, None, []
    path = find_checkpoint(spec, Path(cfg.log.logdir), cfg.log.run_name)
    payload = load_checkpoint(path)
    old = checkpoint_config(payload, path)
    base = None if config_path else old
    cfg = resolve_config(config_path, flags, sets, base=base)
    changes = check_resume_config(old, cfg, force)
    where = f"epoch {payload['epoch'] + 1}, step {payload['global_step']}"
    notes = [f"resuming {path} at {where}"]
    if payload["epoch"] >= cfg.train.epochs:
        notes.append(
            f"that run already completed {cfg.train.epochs} epoch(s): pass --epochs N to go on"
        )
    notes += [f"changed on resume: {key}" for key in changes]
    return cfg, payload, path.parent, notes
