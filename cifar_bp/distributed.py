"""Running under `torchrun`: PyTorch's own process group and DistributedDataParallel.

A single process is a world of one, so the trainer calls the same methods either way.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

# A rank that fails must end the job, not leave the others waiting in a collective forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
# Rank 0's first decode of a large image folder can take minutes: the others wait this long.
SLOW_WORK_TIMEOUT = datetime.timedelta(hours=2)
T = TypeVar("T")


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def launched(self) -> bool:
        """Started by torchrun (its agent forwards signals to every worker)."""
        return "TORCHELASTIC_RUN_ID" in os.environ

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a no-op for a single process)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on one (e.g. a signal seen by one rank)."""
        if not self.active:
            return flag
        t = torch.tensor(float(flag), device=device)
        return bool(self.all_sum(t).item() > 0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def main_first(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0, then on the other ranks, e.g. so that rank 0 fills a cache
        that the others then read. If rank 0 fails, torchrun stops the waiting ranks."""
        if not self.active:
            return work()
        # A gloo group of its own: its long timeout is for this wait alone, and gloo
        # waits on the CPU whatever the training device.
        group = dist.new_group(backend="gloo", timeout=SLOW_WORK_TIMEOUT)
        if not self.is_main:
            dist.barrier(group=group)
        result = work()
        if self.is_main:
            dist.barrier(group=group)
        dist.destroy_process_group(group)
        return result

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.active:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def world_from_env() -> World:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), size)


def init_process_group(world: World, device: torch.device) -> None:
    """gloo on the CPU, nccl on CUDA with one GPU per local rank."""
    if not world.active or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
