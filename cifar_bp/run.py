"""The state of one training run between steps: built once by `setup.build_run`, read by
the loop in `trainer.py` and captured by `checkpoint.capture`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

from cifar_bp.config import Config
from cifar_bp.data import Dataset, DeviceLoader
from cifar_bp.distributed import World
from cifar_bp.engine import Machinery, Meters
from cifar_bp.hardware import Hardware
from cifar_bp.tracking import Tracker


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


@dataclass
class Run:
    """Everything a training run holds between steps; built once, by `build_run`."""

    cfg: Config  # as given (`auto` kept): what checkpoints store, so a resume re-resolves
    hardware: Hardware  # what `auto` became on this machine
    world: World
    data: Dataset
    data_identity: str
    m: Machinery
    train_loader: DeviceLoader
    tracker: Tracker
    run_dir: Path
    run_id: str
    pos: Position
    meters: Meters
    lock: contextlib.AbstractContextManager
    best: float = -math.inf
    elapsed: float = 0.0  # training seconds over all sessions of this run
    resumed: bool = False
