"""`cifar-bp bench` end to end on tiny settings: structure and arithmetic, never timings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cifar_bp.bench import EngineLoop, Variant, catalogue
from cifar_bp.data import synthetic_split


def test_bench_json_reports_three_variants(cli):
    # --sync-debug is a no-op on the CPU, but its code path must run there too.
    result = cli(
        "bench", "--device", "cpu", "--images", "128", "--repeats", "1", "--json", "--sync-debug"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    variants = report["variants"]
    assert list(variants) == ["a", "b", "c"]
    base = variants["a"]["images_per_s"]
    for v in variants.values():
        assert v["images_per_s"] > 0
        assert v["ratio"] == pytest.approx(v["images_per_s"] / base)
        assert v["runs_images_per_s"] and v["peak_rss_mb"] > 0
        assert v["host_syncs"] is None and v["peak_cuda_mb"] is None
    assert variants["a"]["ratio"] == 1.0
    assert variants["a"]["engine"] is False and variants["b"]["batch_size"] == 64
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    assert report["images"] == 128 and report["repeats"] == 1


def test_bench_rejects_unknown_variant(cli):
    result = cli("bench", "--device", "cpu", "--variants", "a,zz")
    assert result.exit_code == 2
    assert "zz" in result.stderr and "choose from" in result.stderr


def test_variant_overrides_are_valid_train_settings():
    from cifar_bp.config import resolve_config

    for device_type in ("cpu", "cuda"):
        for variant in catalogue(device_type, compile_fast=True).values():
            cfg = resolve_config(None, {}, variant.overrides())
            assert cfg.train.batch_size == variant.batch_size
            assert cfg.train.amp == (variant.amp_dtype is not None)
            # The tutorial's optimizer, so (a), (b) and (c) do the same arithmetic per step.
            assert (cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler) == ("sgd", 0.01, "none")
            assert cfg.train.ema_decay is None
    fast_gpu = catalogue("cuda")["c"]
    assert fast_gpu == Variant("c", fast_gpu.label, 512, amp_dtype="bfloat16")


def test_engine_loop_runs_more_epochs_than_the_default_recipe():
    epochs = 6
    loop = EngineLoop(
        catalogue("cpu")["b"], synthetic_split(64, seed=0), torch.device("cpu"), epochs, False
    )
    assert all(loop.epoch(i) > 0 for i in range(epochs))
    assert loop.summary()["steps_per_epoch"] == 1


def test_help_does_not_import_torch():
    code = "import sys, cifar_bp.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
