"""Ctrl-C and SIGTERM during training: finish the step, checkpoint, then stop.

The first signal only sets a flag that the training loop reads between steps, so the
checkpoint it writes is consistent. A second Ctrl-C aborts at once; the last checkpoint
is safe because checkpoints are only ever replaced atomically.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType

import torch

from cifar_bp.distributed import World

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + signal number, as shells report
FORWARD_WINDOW_S = 2.0  # seconds within which a repeated signal is torchrun's forward


class StopRequest:
    def __init__(self, world: World) -> None:
        self.world = world
        self.name: str | None = None
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.name is not None and signum == signal.SIGINT:
            # Under torchrun one Ctrl-C arrives twice: from the terminal and forwarded by
            # the launcher. Only a later, deliberate second Ctrl-C aborts.
            if not (self.world.launched and now - self._first < FORWARD_WINDOW_S):
                raise KeyboardInterrupt
            return
        self.name, self._first = signal.Signals(signum).name, now

    def requested(self, device: torch.device) -> bool:
        """Whether to stop after this step; under DDP, every rank stops at the same step."""
        return self.world.any(self.name is not None, device)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.name or "", 1)
