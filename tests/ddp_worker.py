"""Run by tests/test_ddp.py under torchrun: the real trainer, then each rank saves its weights
so the test can check that every rank ended with the same model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from cifar_bp import trainer
from cifar_bp.config import resolve_config
from cifar_bp.report import QuietReporter


def main(config: str, out: str, *sets: str) -> None:
    cfg = resolve_config(Path(config), {}, list(sets))
    built = []
    build_run = trainer.build_run

    def keep(*args, **kwargs):  # the real build, remembered so the weights can be saved
        built.append(build_run(*args, **kwargs))
        return built[-1]

    trainer.build_run = keep
    trainer.train(cfg, QuietReporter())
    rank = os.environ.get("RANK", "0")
    torch.save(built[0].m.plain.state_dict(), Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
