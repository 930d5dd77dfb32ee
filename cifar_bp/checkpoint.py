"""The checkpoint format, in one place: what a checkpoint holds, how it is captured from a
run and restored into one, and how it is written (atomically) and read (`weights_only`).

A checkpoint is a plain dict of tensors, numbers and strings (the config as JSON-able data),
so `torch.load(weights_only=True)` reads it without running pickled code. Nothing non-finite
is ever written: a diverged run keeps its last finite checkpoint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from torch import nn

from cifar_bp.config import Config, describe_validation_error
from cifar_bp.config_files import shown
from cifar_bp.errors import CliError, UsageError, first_line
from cifar_bp.run import Position

if TYPE_CHECKING:
    from cifar_bp.engine import Machinery, Meters
    from cifar_bp.run import Run

FORMAT_VERSION = 2
REQUIRED = ("format_version", "model", "config", "epoch", "step_in_epoch", "global_step")
TEMP_PREFIX = "."  # temporary files are `.<name>.tmp-<pid>` beside the checkpoint
TEMP_MARK = ".tmp-"
TEMP_GLOB = f"{TEMP_PREFIX}*.pt{TEMP_MARK}*"  # what save_atomic's temporary files look like
ELSEWHERE = "use another checkpoint or start a new run"
ON_RESUME = "resume from another checkpoint or start a new run"


def capture(run: Run) -> dict[str, Any]:
    """Everything needed to continue `run` bitwise where it stands."""
    m, pos = run.m, run.pos
    cuda = torch.cuda.get_rng_state(m.device) if m.device.type == "cuda" else None
    return {
        "format_version": FORMAT_VERSION,
        "run_id": run.run_id,
        "model": m.plain.state_dict(),
        "optimizer": m.optimizer.state_dict(),
        "scheduler": m.scheduler.state_dict() if m.scheduler is not None else None,
        "schedule_steps": len(run.train_loader) * run.cfg.train.epochs,
        "scaler": m.scaler.state_dict(),
        "average": m.average.state_dict() if m.average is not None else None,
        # The data order is (train.seed, epoch, step): the position is all a resume needs.
        "epoch": pos.epoch,
        "step_in_epoch": pos.step_in_epoch,
        "global_step": pos.global_step,
        "world_size": run.world.size,
        "rng": {"torch": torch.get_rng_state(), "cuda": cuda},
        "meters": {k: v.detach().cpu() for k, v in run.meters.values.items()},
        "best_metric": run.best,
        "elapsed": run.elapsed,
        "config": run.cfg.model_dump(mode="json"),
        "classes": list(run.data.classes),
        "data_identity": run.data_identity,
    }


def restore(
    payload: dict[str, Any],
    m: Machinery,
    meters: Meters,
    same_optim: bool,
    same_schedule: bool,
    path: Path = Path("checkpoint"),
) -> Position:
    """Put model, optimizer, scheduler, scaler, average, meters and RNGs back where they were.

    With `same_optim` false (a forced change of optim.*), the optimizer starts afresh; with
    `same_schedule` false the caller recomputes the schedule (the saved state would restore
    the old lr, or a length the run no longer has). `path` names the file in messages.
    """
    load_model_state(m.plain, payload["model"], path)
    pos = Position(payload["epoch"], payload["step_in_epoch"], payload["global_step"])
    needed = ("optimizer", "rng") if same_optim else ("rng",)
    lacking = [key for key in needed if key not in payload]
    if lacking:
        raise damaged(path, f"it lacks {', '.join(lacking)}", ON_RESUME)
    if same_optim:
        check_optimizer_fits(payload["optimizer"], m.optimizer, m.plain, path)
        m.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        m.scaler.load_state_dict(payload["scaler"])
    if m.average is not None:
        if payload.get("average"):
            m.average.load_state_dict(payload["average"])
        else:  # averaging switched on at resume: start the average from the live weights
            m.average.model.load_state_dict(m.plain.state_dict())
    if m.scheduler is not None and same_schedule:
        m.scheduler.load_state_dict(payload["scheduler"])
    for name, value in payload.get("meters", {}).items():
        if name in meters.values:
            meters.values[name].copy_(value)
    torch.set_rng_state(payload["rng"]["torch"])
    if m.device.type == "cuda" and payload["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(payload["rng"]["cuda"], m.device)
    return pos


def check_optimizer_fits(
    saved: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module, path: Path
) -> None:
    """Each saved per-parameter tensor has its parameter's shape: torch's load_state_dict
    does not look, and a misfit would surface at the first step as a size mismatch."""
    names = {id(p): name for name, p in model.named_parameters()}
    # Matched in order across the groups, as torch matches them (it checks the counts).
    ids = [i for group in saved["param_groups"] for i in group.get("params", ())]
    live = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in zip(ids, live, strict=False):
        for key, value in saved["state"].get(index, {}).items():
            # Adam's step count is a scalar whatever the parameter's shape.
            if key != "step" and isinstance(value, torch.Tensor) and value.shape != param.shape:
                what = f"its optimizer state {key} for {names.get(id(param), index)}"
                shapes = f"has shape {list(value.shape)}, the parameter {list(param.shape)}"
                raise damaged(path, f"{what} {shapes}", ON_RESUME)


def config_of(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """The config the checkpoint was trained with, as plain data (valid: load_checkpoint
    has checked it)."""
    cfg = payload.get("config")
    if not isinstance(cfg, dict):
        raise CliError(f"{path}: the checkpoint holds no config")
    # A key added since the checkpoint was written takes the value its run used, not
    # today's default: before train.eval_shift, runs scored no shifted views.
    train = cfg.get("train")
    if isinstance(train, dict) and "eval_shift" not in train:
        cfg = {**cfg, "train": {**train, "eval_shift": 0}}
    return cfg


def run_config(payload: dict[str, Any], path: Path) -> Config:
    """The config the checkpoint was trained with, as the validated model."""
    return Config.model_validate(config_of(payload, path))  # load_checkpoint checked it


def _validate_config(cfg: dict[str, Any], path: Path) -> Config:
    # The config came with the file, not from the command: an invalid one is a damaged
    # checkpoint (exit 1), whichever command reads it.
    try:
        return Config.model_validate(cfg)
    except ValidationError as err:
        raise damaged(path, describe_validation_error(err, "its config", [])) from None


@dataclass(frozen=True)
class Facts:
    """What the rest of the program reads from a checkpoint, by name: the payload's keys,
    and the defaults of checkpoints written before a key existed, stay in this module."""

    epoch: int  # epochs completed
    global_step: int
    run_id: str | None
    classes: tuple[str, ...]  # empty in checkpoints older than the folder source
    data_identity: str | None
    averaged: bool  # a weight average was kept (and is what gets scored)
    best_metric: float
    elapsed: float  # seconds of training so far
    world_size: int  # processes it trained with
    schedule_steps: int | None  # the lr schedule's length in steps


def facts_of(payload: dict[str, Any]) -> Facts:
    return Facts(
        epoch=payload["epoch"], global_step=payload["global_step"],
        run_id=payload.get("run_id"), classes=tuple(payload.get("classes") or ()),
        data_identity=payload.get("data_identity"), averaged=bool(payload.get("average")),
        best_metric=payload.get("best_metric", -math.inf), elapsed=payload.get("elapsed", 0.0),
        world_size=payload.get("world_size", 1), schedule_steps=payload.get("schedule_steps"),
    )  # fmt: skip


def trained_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The live weights as trained (not the average): what the gradients flowed through."""
    return payload["model"]


def weights_of(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to score or deploy: the weight average where the run kept one."""
    average = payload.get("average")
    return average["weights"] if average else payload["model"]


def _tensors(node: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(node, torch.Tensor):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _tensors(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _tensors(value, f"{path}[{i}]")


def first_nonfinite(payload: dict[str, Any]) -> str | None:
    """The first floating-point tensor of the weights, average or optimizer state that holds
    an inf or NaN (None when all are finite)."""
    for part in ("model", "average", "optimizer"):
        for name, tensor in _tensors(payload.get(part), part):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return name
    best = payload.get("best_metric")
    return "best_metric" if isinstance(best, float) and math.isnan(best) else None


def clean_temporaries(run_dir: Path) -> list[str]:
    """Remove temporary checkpoint files a killed process left behind (we hold the run's
    lock, so none of them is being written)."""
    removed = []
    for tmp in run_dir.glob(TEMP_GLOB):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp.name)
    return removed


def is_temporary(name: str) -> bool:
    """A file name of save_atomic's temporary files (one a killed process may leave)."""
    return fnmatch.fnmatch(name, TEMP_GLOB)


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, fsync it, then `os.replace`.

    `os.replace` is atomic on POSIX, so a process killed at any instant leaves either the
    previous checkpoint or the new one, never a torn file. On failure (a full disk) the
    temporary file is removed and the previous checkpoint is untouched.
    """
    # Serialise in memory first, so an I/O error surfaces as itself (torch.save would wrap
    # it), and the file is open only for one plain write.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            kept = "the previous checkpoint is intact" if path.exists() else "none was saved"
            raise CliError(
                f"could not write checkpoint {path}: {err.strerror or err}; {kept}"
            ) from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable across a power cut.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and sanity-check a checkpoint; any problem is one clear `CliError`."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path} (give a last.pt/best.pt or a run folder)")
    try:
        with warnings.catch_warnings():
            # torch warns about a pickle it then refuses; the refusal is what we report.
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        why = why_unreadable(path, err)
        raise CliError(f"{path} is not a readable checkpoint: {why}") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CliError(f"{path} is not a cifar-bp checkpoint (it has no format_version)")
    version = payload["format_version"]
    if not _count()(version):
        raise damaged(path, f"format_version must be a whole number (got {_got(version)})")
    if version != FORMAT_VERSION:
        raise CliError(
            f"{path} has checkpoint format {version}, this cifar-bp reads format {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CliError(f"{path} is an incomplete checkpoint: it lacks {', '.join(missing)}")
    if not _is_weights(payload["model"]):
        raise CliError(f"{path} is a damaged checkpoint: its model holds no weights")
    average = payload.get("average")
    if average and not (isinstance(average, dict) and _is_weights(average.get("weights"))):
        raise CliError(f"{path} is a damaged checkpoint: its weight average holds no weights")
    check_payload(payload, path)
    return payload


def damaged(path: Path, problem: str, advice: str = ELSEWHERE) -> CliError:
    return CliError(f"{path}: the checkpoint is damaged: {problem}; {advice}")


def check_payload(payload: dict[str, Any], path: Path) -> None:
    """Each key of the schema that is present has its type, no weight is inf or NaN, and the
    config is valid: the rest of the program then trusts the payload (a key added since a
    checkpoint was written may be absent: Facts gives its default)."""
    for key, (fits, what) in SCHEMA.items():
        parent, _, name = key.rpartition(".")
        node = payload.get(parent) if parent else payload
        if not isinstance(node, dict) or (not parent and name not in node):
            continue  # an absent key, or below one that is None (the schema checked which)
        value = node.get(name)  # a sub-key that is missing reads as None
        if not fits(value):
            raise damaged(path, f"{key} must be {what} (got {_got(value)})")
    bad = first_nonfinite(payload)
    if bad is not None:
        raise damaged(path, f"{bad} holds inf/NaN values")
    _validate_config(config_of(payload, path), path)


# --- The payload's schema: key -> (does the value fit, what it must be). A dotted key is
# checked where the mapping above it is present (and not None), in this order.
Fits = Callable[[Any], bool]


def _count(least: int = 0) -> Fits:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is(kind: type, maybe: bool = False) -> Fits:
    return lambda v: isinstance(v, kind) or (maybe and v is None)


def _each(kind: type, v: Any, container: type = dict) -> bool:
    items = v.values() if isinstance(v, dict) else v
    return isinstance(v, container) and all(isinstance(x, kind) for x in items)


NUMBER = int | float
WHOLE = (_count(), "a whole number, 0 or more")
SCHEMA: dict[str, tuple[Fits, str]] = {
    "run_id": (_is(str, maybe=True), "text"),
    "epoch": WHOLE, "step_in_epoch": WHOLE, "global_step": WHOLE,
    "world_size": (_count(1), "a whole number, 1 or more"),
    "schedule_steps": (lambda v: v is None or _count(1)(v), "a whole number, 1 or more"),
    "best_metric": (lambda v: _is(NUMBER)(v) and not isinstance(v, bool), "a number"),
    "elapsed": (lambda v: _is(NUMBER)(v) and 0 <= v < math.inf, "a number of seconds, 0 or more"),
    "config": (_is(dict), "a mapping"),
    "classes": (lambda v: _each(str, v, list), "a list of class names"),
    "data_identity": (_is(str, maybe=True), "text"),
    "meters": (lambda v: _each(torch.Tensor, v) and all(t.dim() == 0 for t in v.values()),
               "a mapping of names to one-number tensors"),
    "rng": (_is(dict), "a mapping"),
    "rng.torch": (lambda v: _is(torch.Tensor)(v) and v.dtype == torch.uint8 and v.dim() == 1,
                  "a random generator's state, a uint8 tensor"),
    "optimizer": (_is(dict), "a mapping"),
    "optimizer.state": (lambda v: _each(dict, v), "a mapping of mappings"),
    "optimizer.param_groups": (lambda v: _each(dict, v, list), "a list of mappings"),
    "scheduler": (_is(dict, maybe=True), "a mapping"),
    "scaler": (lambda v: v is None or _each(NUMBER, v), "a mapping of numbers"),
    "average": (_is(dict, maybe=True), "a mapping"),
    "average.updates": WHOLE,
}  # fmt: skip


def _got(value: Any) -> str:
    """A value in one short line: a tensor, or a mapping that holds some, by its kind."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    if isinstance(value, dict) and next(_tensors(value), None) is not None:
        return f"a mapping of {len(value)} key(s)"
    return " ".join(shown(value).split())


def _is_weights(state: Any) -> bool:
    """A state dict: parameter names to tensors, at least one."""
    return _each(torch.Tensor, state) and bool(state)


def why_unreadable(path: Path, err: Exception) -> str:
    """What a file that torch.load refused is, in words a user can act on (torch's own
    message for a refused object suggests weights_only=False, which is no advice here)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (legacy: pickle)
        return "it is not a file torch.save wrote (give a last.pt/best.pt or a run folder)"
    if "weights_only" in str(err) or "Weights only load failed" in str(err):
        return (
            "it holds Python objects besides tensors and plain values, so cifar-bp did not "
            "write it, and loading it could run code"
        )
    return f"truncated or damaged ({first_line(err, 200)})"


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load weights strictly, turning shape or name mismatches into one message."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CliError(f"{path}: its tensors do not fit the model: {detail}") from None
