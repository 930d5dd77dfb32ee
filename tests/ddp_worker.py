"""Run by tests/test_ddp.py under torchrun: the real trainer, then each rank saves its weights
so the test can check that every rank ended with the same model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from cifar_bp.config import resolve_config
from cifar_bp.report import QuietReporter
from cifar_bp.signals import StopRequest
from cifar_bp.trainer import fit, setup, unwrap_model


def main(config: str, out: str, *sets: str) -> None:
    cfg = resolve_config(Path(config), {}, list(sets))
    run = setup(cfg, None, None)
    with StopRequest(run.world) as stop:
        fit(run, QuietReporter(), stop)
    run.tracker.close()
    rank = os.environ.get("RANK", "0")
    torch.save(unwrap_model(run.m).state_dict(), Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
