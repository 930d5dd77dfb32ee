"""TensorBoard tracking: one directory per run, scalars, the config as text and hparams."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from cifar_bp.config import Config
from cifar_bp.errors import CliError, UsageError


def default_run_name(cfg: Config) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.loss.name}-{cfg.loss.reduction}"


def plan_run_dir(cfg: Config) -> Path:
    """Where a new run will write. Nothing is created yet: a run that fails its checks
    before training starts leaves nothing behind."""
    logdir = Path(cfg.log.logdir)
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
    if cfg.log.run_name:
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


def create_run_dir(run_dir: Path, cfg: Config) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    except OSError as err:
        raise CliError(f"cannot create run directory {run_dir}: {err.strerror or err}") from None


class Tracker:
    """A thin layer over `SummaryWriter`; a disabled one (other DDP ranks) does nothing."""

    def __init__(self, run_dir: Path | None, purge_step: int | None = None) -> None:
        self.writer = None
        if run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step, flush_secs=30)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def config_text(self, cfg: Config) -> None:
        if self.writer is not None:
            # Indented four spaces, TensorBoard's markdown shows it as a code block.
            block = "\n".join("    " + line for line in cfg.to_yaml().splitlines())
            self.writer.add_text("config", block, 0)

    def hparams(self, cfg: Config, metrics: dict[str, float]) -> None:
        """Write hparams into this run's own event file (add_hparams would start a new one)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        flat = flatten_config(cfg)
        exp, ssi, sei = hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()})
        file_writer = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        self.scalars({f"hparam/{k}": v for k, v in metrics.items()}, 0)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()


def flatten_config(cfg: Config) -> dict[str, Any]:
    """hparams accept only scalars and strings: lists and None become text."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        elif isinstance(node, bool | int | float | str):
            flat[prefix] = node
        else:
            flat[prefix] = str(node)

    walk("", cfg.model_dump(mode="json"))
    return flat
