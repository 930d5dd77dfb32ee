"""`cifar-bp bench` end to end on tiny settings: structure and arithmetic, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cifar_bp.benchmark import print_benchmark
from cifar_bp.benchmark.check import epoch_parts, sync_verdict, train_epochs, watched_trainer
from cifar_bp.benchmark.check import parse as check_args
from cifar_bp.benchmark.loops import EngineLoop
from cifar_bp.benchmark.variants import Variant, catalogue, choose, step_cost
from cifar_bp.config import resolve_config
from cifar_bp.data import synthetic_split
from cifar_bp.errors import UsageError
from cifar_bp.hardware import resolve_precision
from cifar_bp.model import ReferenceNet
from tests.helpers import ROOT, SMOKE


@pytest.mark.slow
def test_bench_reports_rates_flops_and_peak_share(cli, capsys):
    # --sync-debug is a no-op on the CPU, but its code path must run there too.
    result = cli(
        "bench", "--device", "cpu", "--images", "128", "--repeats", "1", "--json",
        "--sync-debug", "--variants", "a,b,d,b@32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    variants = report["variants"]
    assert list(variants) == ["a", "b", "d", "b@32"]
    # Progress goes to stderr, each turn as it ends, and the JSON stays alone on stdout.
    assert "bench: timed epoch 1 of 1 done for a, b, d, b@32" in result.stderr
    peak = report["peak"]["float32"]["best_gflops"]
    assert peak > 0 and report["peak"]["threads"] == report["threads"]
    mflop = report["step_mflop_per_image"]["total"]
    base = variants["a"]["images_per_s"]
    for v in variants.values():
        assert v["images_per_s"] > 0 and v["first_images_per_s"] > 0 and v["setup_s"] > 0
        assert v["ratio"] == pytest.approx(v["images_per_s"] / base)
        for prefix in ("", "first_"):
            gflops = v[f"{prefix}images_per_s"] * mflop / 1e3
            assert v[f"{prefix}gflops"] == pytest.approx(gflops)
            assert v[f"{prefix}peak_share"] == pytest.approx(gflops / peak)
            # bf16 work against the bf16 peak where one was measured: the harder measure.
            own = report["peak"].get(v["precision"], report["peak"]["float32"])["best_gflops"]
            assert v[f"{prefix}dtype_peak_share"] == pytest.approx(gflops / own)
        assert len(v["runs_images_per_s"]) == 1 and v["peak_rss_mb"] > 0
        assert v["host_syncs"] is None and v["peak_cuda_mb"] is None
    assert variants["b@32"]["batch_size"] == 32 and variants["b@32"]["steps_per_epoch"] == 4
    # (d) is train's default path: precision as train resolves it here, the default optimizer.
    default = resolve_precision(resolve_config(None, {"device": "cpu"}).train, torch.device("cpu"))
    assert variants["d"]["precision"] == default.name and variants["d"]["optimizer"] == "muon"
    assert variants["d"]["compiled"] is False
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    print_benchmark(report, as_json=False)
    text = capsys.readouterr().out
    assert "d default train" in text and "% peak" in text and "1st epoch img/s" in text
    assert "% dtype peak" in text and "1st GFLOP/s" in text
    first = f"{variants['d']['first_gflops']:,.1f}"
    assert first in table_row(text, "d default train"), text
    assert f"float32 {peak:,.1f} GFLOP/s" in text and "69.2 MFLOP per image" in text


def table_row(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.lstrip("│ ").startswith(start))
    return [cell.strip() for cell in line.split("│")]


def test_step_cost_counts_each_layers_multiply_adds():
    # conv: output pixels × out channels × in channels × 5 × 5; linear: in × out.
    macs = [32 * 32 * 32 * 3 * 25, 16 * 16 * 32 * 32 * 25, 8 * 8 * 64 * 32 * 25, 1024 * 64, 640]
    cost = step_cost(ReferenceNet())
    assert cost.forward == cost.weight_grads == 2 * sum(macs)
    assert cost.input_grads == 2 * sum(macs[1:])  # the image needs no gradient
    assert (round(cost.forward / 1e6, 1), round(cost.input_grads / 1e6, 1)) == (24.7, 19.8)
    assert round(cost.total / 1e6, 1) == 69.2


def test_bench_rejects_unknown_variant(cli):
    for bad in ("a,zz", "b@0", "zz@64"):
        result = cli("bench", "--device", "cpu", "--variants", bad)
        assert result.exit_code == 2, bad
        assert "choose from" in result.stderr and "KEY@N" in result.stderr


def test_variants_at_other_batch_sizes_keep_their_settings():
    chosen = choose(["c", "c@4096", "bf16@256", "c"], "cuda")
    assert list(chosen) == ["c", "c@4096", "bf16@256"]
    assert chosen["c@4096"].batch_size == 4096 and chosen["c@4096"].amp_dtype == "bfloat16"
    assert chosen["bf16@256"].batch_size == 256
    with pytest.raises(UsageError):
        choose([" ", ""], "cpu")


def test_variant_overrides_are_valid_train_settings():
    for device_type in ("cpu", "cuda"):
        for variant in catalogue(device_type, compile_fast=True).values():
            cfg = resolve_config(None, {}, variant.overrides())
            assert cfg.train.batch_size == variant.batch_size
            if not variant.tutorial_optim:  # (d): train's defaults, left on auto
                assert (cfg.train.amp, cfg.train.compile, cfg.optim.name) == (
                    "auto",
                    "auto",
                    "muon",
                )
                continue
            auto = variant.amp_dtype == "auto"  # (c) on the CPU: bf16 where it is native
            assert cfg.train.amp == ("auto" if auto else variant.amp_dtype is not None)
            # The tutorial's optimizer, so (a), (b) and (c) do the same arithmetic per step.
            assert (cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler) == ("sgd", 0.01, "none")
            assert cfg.train.ema_decay is None
    fast_gpu = catalogue("cuda")["c"]
    assert fast_gpu == Variant("c", fast_gpu.label, 512, amp_dtype="bfloat16")


def test_engine_loop_runs_more_epochs_than_the_default_recipe():
    epochs = 4
    variant = choose(["d@8"], "cpu")["d@8"]  # one-cycle: it refuses to step past its schedule
    loop = EngineLoop(variant, synthetic_split(32, seed=0), torch.device("cpu"), epochs, False)
    assert all(loop.epoch(i) > 0 for i in range(epochs))
    assert loop.summary()["steps_per_epoch"] == 4


def one_sync_per_watch(where: str):
    """A stand-in for loops.sync_watch (which needs a GPU) that reports one sync each time."""

    @contextmanager
    def watch():
        caught: list[str] = []
        yield caught
        caught.append(where)

    return watch


def test_sync_check_counts_syncs_inside_the_step_only(monkeypatch):
    """CUDA's sync debug mode needs a GPU; the counting around it is checked with a fake."""
    from cifar_bp.benchmark import loops

    monkeypatch.setattr(loops, "sync_watch", one_sync_per_watch("engine.py:7"))
    monkeypatch.setattr(loops, "SYNC_STEPS", 3)
    split = synthetic_split(16 * 5, seed=0)
    loop = EngineLoop(choose(["b@16"], "cpu")["b@16"], split, torch.device("cpu"), 1, False)
    assert loop.host_syncs() == (3, 3, "engine.py:7")  # stops after SYNC_STEPS of 5


def test_sync_watch_ignores_the_switch_and_names_the_caller(monkeypatch):
    """torch 2.11 on an H200 warned from set_sync_debug_mode itself; that was counted as a
    sync inside every variant's step. A fake torch that does the same, around a fake step."""
    from cifar_bp.benchmark import loops

    def switch(mode: str) -> None:
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)

    def step() -> None:
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("something else", stacklevel=1)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", switch)
    monkeypatch.setattr(loops, "PACKAGE", Path(__file__).resolve().parent)  # frames of this file
    with loops.sync_watch() as caught:
        step()
    assert len(caught) == 1
    where, *chain = caught[0].split(" <- ")
    assert where.endswith("test_bench.py:" + str(step.__code__.co_firstlineno + 1))
    assert chain[0].startswith("tests/test_bench.py:")  # the caller that led there


def test_help_does_not_import_torch():
    code = "import sys, cifar_bp.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_check_lists_every_missing_package_before_running(tmp_path):
    # An interpreter without site-packages stands in for a GPU machine's bare Python.
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(bare), "DEVICE": "cpu"}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "missing packages" in result.stderr and "nothing was run" in result.stderr
    for package in ("torch", "pydantic", "pyyaml", "rich", "tensorboard", "matplotlib"):
        assert package in result.stderr
    assert "Training throughput" not in result.stdout


def fake_report(settings: str, syncs: int) -> dict:
    variant = {"host_syncs": syncs, "sync_steps": 20, "settings": settings, "first_sync": "x:1"}
    return {"device": "cuda", "variants": {"c": variant}}


def test_gpu_check_fails_on_any_sync_inside_a_step(capsys):
    assert sync_verdict(fake_report("bf16 NHWC engine", 0)) == 0
    assert "sync check passed" in capsys.readouterr().out
    assert sync_verdict(fake_report("bf16 NHWC engine", 3)) == 1
    assert "HOST SYNC INSIDE THE STEP: (c) 3 syncs in 20 steps, first at x:1" in (
        capsys.readouterr().err
    )
    # Fused SGD/Adam and Muon take GradScaler's flag on the device: no excuse for float16.
    assert sync_verdict(fake_report("fp16+scaler NHWC engine", 20)) == 1
    train = {"batch_size": 512, "host_syncs": 2, "steps": 98, "first_sync": ["y:2"]}
    assert sync_verdict(fake_report("bf16 NHWC engine", 0), [train]) == 1
    assert "(train at batch 512) 2 syncs in 98 steps, first at y:2" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_times_train_epochs_with_their_evaluation():
    args = check_args(["--train-size", "256", "--test-size", "64", "--train-epochs", "2"])
    t = train_epochs(torch.device("cpu"), 64, args)
    assert t["batch_size"] == 64 and t["settings"].endswith("NHWC muon (auto)")
    assert t["epoch_with_eval_s"] > 256 / t["images_per_s"] > 0  # evaluation takes time too
    assert t["wall_s"] > t["first_epoch_s"] + t["epoch_with_eval_s"]
    assert 0 <= t["test_accuracy"] <= 1
    # The breakdown: steps and evaluation are parts of the epoch, the rest is what is left.
    assert t["steps_s"] > 0 and t["eval_s"] > 0
    assert t["steps_s"] + t["eval_s"] < t["epoch_with_eval_s"]
    parts = epoch_parts(t)
    assert parts.startswith(f"steps {t['steps_s']:.3f} s + evaluation {t['eval_s']:.3f} s")
    assert parts.endswith(f"= {t['epoch_with_eval_s']:.3f} s")


def test_gpu_check_watches_the_real_trainers_steps_and_training_batches(monkeypatch, tmp_path):
    """Sync debug mode needs a GPU: a fake watch that reports one sync per watched stretch
    shows what is watched, the training batches and the steps, and nothing else."""
    from cifar_bp import trainer
    from cifar_bp.benchmark import loops
    from cifar_bp.report import QuietReporter

    monkeypatch.setattr(loops, "sync_watch", one_sync_per_watch("x:1"))
    flags = {"epochs": 1, "batch_size": 64, "logdir": str(tmp_path)}
    cfg = resolve_config(SMOKE, flags, ["data.train_size=128", "data.test_size=64"])
    found: list[str] = []
    step = trainer.train_step
    with watched_trainer(torch.device("cuda"), found):
        trainer.train(cfg, QuietReporter())
    # 2 steps, 3 calls for a training batch (the last one ends the epoch) and the batch of
    # TensorBoard's input grid; evaluation batches, log points and checkpoints are not watched.
    assert found == ["x:1"] * (2 + 3 + 1)
    assert trainer.train_step is step  # put back
