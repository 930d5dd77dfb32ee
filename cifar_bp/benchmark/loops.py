"""The training loops the benchmark times: this engine's, and the tutorial's as written there.

Each answers `epoch(index)` with that epoch's images/s and `summary()` with what it ran.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_bp.benchmark.machine import memory
from cifar_bp.benchmark.variants import TUTORIAL_LR, Variant
from cifar_bp.config import resolve_config
from cifar_bp.data import DeviceLoader, Split
from cifar_bp.distributed import World
from cifar_bp.engine import Meters, train_step
from cifar_bp.hardware import choose_hardware
from cifar_bp.model import ReferenceNet
from cifar_bp.setup import build_machinery

PACKAGE = Path(__file__).resolve().parent.parent  # cifar_bp/
SYNC_STEPS = 20  # steps watched for host syncs after the timed epochs (CUDA, --sync-debug)


class EngineLoop:
    """`cifar-bp train`'s loop with configs/default.yaml plus the variant's overrides.

    The meters are read back once per epoch (train also reads them every
    log.every_n_steps steps: one small copy) and nothing is written to TensorBoard.
    """

    def __init__(
        self, variant: Variant, split: Split, device: torch.device, epochs: int, sync: bool
    ) -> None:
        # One epoch more than timed: the schedule must also cover the sync check's steps.
        flags = {"device": str(device), "epochs": epochs + 1}
        cfg = resolve_config(None, flags, variant.overrides())
        hardware = choose_hardware(cfg, World())
        self.device = hardware.device
        self.loader = DeviceLoader(
            split, cfg.data, cfg.train.batch_size, self.device, train=True, seed=cfg.train.seed,
            channels_last=cfg.model.channels_last,
        )  # fmt: skip
        self.m = build_machinery(cfg, hardware, World(), len(self.loader))
        self.meters = Meters(self.device)
        self.sync_debug = sync and self.device.type == "cuda"
        self.epochs = epochs
        compiled = hardware.compiled
        self.settings = describe(True, self.m.precision.name, self.m.precision.scaler,
                                 cfg.model.channels_last, compiled, cfg.optim.name)  # fmt: skip
        self.resolved = {"batch_size": cfg.train.batch_size, "precision": self.m.precision.name,
                         "compiled": compiled, "optimizer": cfg.optim.name,
                         "precision_reason": self.m.precision.reason}  # fmt: skip

    def epoch(self, index: int) -> float:
        started, seen = time.perf_counter(), 0
        batches = self.loader.epoch(index, first_global_step=index * len(self.loader))
        for images, labels in batches:
            train_step(self.m, images, labels, self.meters)
            seen += len(labels)
        self.meters.read()  # the epoch's read-back; it also waits for the device to finish
        return seen / (time.perf_counter() - started)

    def host_syncs(self) -> tuple[int, int, str | None]:
        """Syncs CUDA reports over a few untimed steps, each watched from the loader making
        its batch (crops and flips on the device) to the end of train_step: (syncs, steps,
        where the first one came from)."""
        count, steps, where = 0, 0, None
        batches = self.loader.epoch(self.epochs, first_global_step=self.epochs * len(self.loader))
        batches = iter(batches)
        while True:
            with sync_watch() as caught:
                batch = next(batches, None)
                if batch is not None:
                    train_step(self.m, *batch, self.meters)
            if batch is None:
                break
            count, steps = count + len(caught), steps + 1
            if caught and where is None:
                where = caught[0]
            if steps == SYNC_STEPS:
                break
        return count, steps, where

    def summary(self) -> dict[str, Any]:
        syncs, steps, where = self.host_syncs() if self.sync_debug else (None, None, None)
        return {"steps_per_epoch": len(self.loader), "host_syncs": syncs, "sync_steps": steps,
                "first_sync": where, **self.resolved, **memory(self.device)}  # fmt: skip


def describe(
    engine: bool, precision: str, scaler: bool, channels_last: bool, compiled: bool, optim: str
) -> str:
    """Short enough for a table cell: precision, layout, compile, loop, optimizer."""
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[precision]
    text = f"{short}{'+scaler' * scaler} {'NHWC' if channels_last else 'NCHW'}"
    text += " compiled" * compiled + " engine" * engine + " tutorial" * (not engine)
    return text + ("" if optim == "sgd" else f" {optim}")


class TutorialImages(torch.utils.data.Dataset):
    """Like torchvision's CIFAR10: HWC uint8 arrays, one PIL image per index, then ToTensor."""

    def __init__(self, split: Split) -> None:
        from PIL import Image
        from torchvision.transforms import ToTensor

        self.data = split.images.permute(0, 2, 3, 1).numpy()
        self.targets = split.labels.tolist()
        self.to_image, self.transform = Image.fromarray, ToTensor()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.to_image(self.data[index])), self.targets[index]


class TutorialLoop:
    """The tutorial's loop as written there: no workers, no pinning, a host sync per step."""

    def __init__(
        self, variant: Variant, split: Split, device: torch.device, epochs: int, sync: bool
    ) -> None:
        torch.manual_seed(0)
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            TutorialImages(split), batch_size=variant.batch_size, shuffle=True
        )
        self.model = ReferenceNet().to(device)
        self.loss_fn = nn.CrossEntropyLoss().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=TUTORIAL_LR)
        self.settings = describe(False, "float32", False, False, False, "sgd")

    def epoch(self, index: int) -> float:
        started, seen = time.perf_counter(), 0
        for imgs, targets in self.loader:
            imgs, targets = imgs.to(self.device), targets.to(self.device)
            loss = self.loss_fn(self.model(imgs), targets)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss.item()  # the tutorial reads the loss back every step
            seen += len(targets)
        return seen / (time.perf_counter() - started)

    def summary(self) -> dict[str, Any]:
        return {"steps_per_epoch": len(self.loader), "host_syncs": None, "sync_steps": None,
                "first_sync": None, "batch_size": self.loader.batch_size,
                "precision": "float32", "compiled": False, "optimizer": "sgd",
                **memory(self.device)}  # fmt: skip


@contextmanager
def sync_watch() -> Iterator[list[str]]:
    """Where each synchronizing CUDA operation came from (torch's sync debug mode): the
    frame that made it plus the project frames that led there, e.g.
    `torch/cuda/__init__.py:1270 <- cifar_bp/engine.py:159`."""
    caught: list[str] = []
    watching = False

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if watching and "synchroniz" in str(message):
            caught.append(call_chain(f"{filename}:{lineno}"))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        # Only what runs between the two switches counts: on an H200 with torch 2.11 the
        # switch itself reported a sync (torch/cuda/__init__.py, from set_sync_debug_mode).
        torch.cuda.set_sync_debug_mode("warn")
        watching = True
        try:
            yield caught
        finally:
            watching = False
            torch.cuda.set_sync_debug_mode("default")


def call_chain(where: str) -> str:
    """`where` followed by the innermost frames of this package that led to it."""
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(str(PACKAGE))]
    ours = [f"{Path(f.filename).relative_to(PACKAGE.parent)}:{f.lineno}"
            for f in frames if f.name not in ("record", "call_chain")]  # fmt: skip
    return " <- ".join([where, *reversed(ours[-3:])])
