"""Checkpoints: written atomically, loaded with `weights_only=True` only.

A checkpoint is a plain dict of tensors, numbers and strings (the config as JSON-able
data), so `torch.load(weights_only=True)` can read it without running pickled code.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_bp.errors import CliError

FORMAT_VERSION = 1
REQUIRED = ("format_version", "model", "config", "epoch", "global_step")


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
            raise CliError(
                f"could not write checkpoint {path}: {err.strerror or err}; "
                "the previous checkpoint is intact"
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
        raise CliError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(
            f"{path} is not a readable checkpoint (truncated or not one): {first}"
        ) from None
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED):
        raise CliError(f"{path} is not a cifar-bp checkpoint (it lacks {', '.join(REQUIRED)})")
    if payload["format_version"] != FORMAT_VERSION:
        raise CliError(
            f"{path} has checkpoint format {payload['format_version']}, this cifar-bp reads "
            f"format {FORMAT_VERSION}"
        )
    return payload


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load weights strictly, turning shape or name mismatches into one message."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CliError(f"{path}: its tensors do not fit the model: {detail}") from None
