"""Precision, compile and determinism defaults: what `auto` resolves to on every kind of
machine (capabilities faked), the GradScaler step's order, and what `config show` prints."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from cifar_bp.config import TrainConfig, resolve_config
from cifar_bp.distributed import World
from cifar_bp.engine import Meters, train_step
from cifar_bp.errors import UsageError
from cifar_bp.hardware import (
    Capabilities,
    choose_hardware,
    make_deterministic,
    resolve_compile,
    resolve_precision,
)
from cifar_bp.setup import build_machinery
from tests.helpers import SMOKE

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a device object touches no GPU
BF16, FP16 = torch.bfloat16, torch.float16
GPU_BF16 = Capabilities(cuda_bf16=True, cpu_bf16=False)
GPU_OLD = Capabilities(cuda_bf16=False, cpu_bf16=False)  # e.g. a V100 or T4
CPU_BF16 = Capabilities(cuda_bf16=False, cpu_bf16=True)  # avx512_bf16 or AMX
CPU_PLAIN = Capabilities(cuda_bf16=False, cpu_bf16=False)


def train_cfg(**values: object) -> TrainConfig:
    return TrainConfig.model_validate(values)


@pytest.mark.parametrize(
    ("device", "caps", "values", "dtype", "scaler", "why"),
    [
        (CUDA, GPU_BF16, {}, BF16, False, "CUDA, GPU supports bf16, auto"),
        (CUDA, GPU_OLD, {}, FP16, True, "CUDA, GPU lacks bf16, auto"),
        (CUDA, GPU_OLD, {"amp": True}, FP16, True, "CUDA, GPU lacks bf16, amp on"),
        (CUDA, GPU_BF16, {"amp": False}, None, False, "CUDA, train.amp false"),
        (CUDA, GPU_BF16, {"amp_dtype": "float16"}, FP16, True, "train.amp_dtype float16"),
        (CUDA, GPU_BF16, {"amp_dtype": "float16", "grad_scaler": False}, FP16, False, "float16"),
        (CPU, CPU_BF16, {}, BF16, False, "CPU, native bf16, auto"),
        (CPU, CPU_PLAIN, {}, None, False, "CPU without native bf16, auto"),
        (CPU, CPU_PLAIN, {"amp": True}, BF16, False, "no native bf16, forced by train.amp true"),
        (CPU, CPU_PLAIN, {"amp_dtype": "bfloat16"}, BF16, False, "train.amp_dtype bfloat16"),
        (CPU, CPU_BF16, {"amp": False}, None, False, "CPU, train.amp false"),
        (CPU, CPU_PLAIN, {"amp": False, "grad_scaler": True}, None, True, "train.amp false"),
    ],
)
def test_auto_precision_fits_the_hardware(device, caps, values, dtype, scaler, why):
    precision = resolve_precision(train_cfg(**values), device, caps)
    assert (precision.dtype, precision.scaler) == (dtype, scaler)
    assert why in precision.reason
    assert precision.device == device


def test_precision_line_says_what_and_why():
    line = resolve_precision(train_cfg(), CUDA, GPU_OLD).describe()
    assert line == "precision: float16 autocast + GradScaler (CUDA, GPU lacks bf16, auto)"
    assert resolve_precision(train_cfg(), CPU, CPU_PLAIN).describe() == (
        "precision: float32 (CPU without native bf16, auto)"
    )


@pytest.mark.parametrize("amp", ["auto", True])
def test_float16_on_the_cpu_is_refused(amp):
    with pytest.raises(UsageError, match="float16 needs CUDA"):
        resolve_precision(train_cfg(amp=amp, amp_dtype="float16"), CPU, CPU_BF16)


def test_cli_refuses_float16_on_the_cpu_before_creating_a_run(cli, tmp_path):
    result = cli(
        "train", "-c", SMOKE, "--set", "train.amp=true", "--set", "train.amp_dtype=float16",
        "--logdir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "float16 needs CUDA" in result.stderr
    assert "Traceback" not in result.output
    assert not any(tmp_path.iterdir())


def test_cpu_detection_never_asks_cuda(monkeypatch):
    def fail(*_: object) -> None:
        raise AssertionError("CUDA queried for a CPU run")

    monkeypatch.setattr(torch.cuda, "get_device_capability", fail)
    monkeypatch.setattr(torch.cuda, "is_available", fail)
    caps = Capabilities.detect(CPU)
    assert caps.cuda_bf16 is False
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert caps.cpu_bf16 == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_compile_auto_is_off_where_it_measured_slower():
    assert resolve_compile(train_cfg(), CUDA) == (False, "CUDA, auto: measured slower on an H200")
    assert resolve_compile(train_cfg(), CPU) == (False, "CPU, auto")
    assert resolve_compile(train_cfg(compile=True), CPU)[0] is True
    assert resolve_compile(train_cfg(compile=True), CUDA)[0] is True
    assert resolve_compile(train_cfg(compile=False), CUDA)[0] is False


def test_make_deterministic_switches_torch_to_deterministic_kernels(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        make_deterministic(CPU)
        assert torch.are_deterministic_algorithms_enabled()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_scaler_step_takes_norms_and_clips_the_unscaled_gradients():
    """With a GradScaler on, backward sees loss × 65536; the norms the step returns, the
    clipping and the update must all see the true gradients (unscale_ comes first)."""
    sets = ["train.amp=false", "train.grad_scaler=true", "optim.name=sgd", "optim.lr=0.1",
            "optim.momentum=0", "optim.nesterov=false", "optim.grad_clip=0.05"]  # fmt: skip
    cfg = resolve_config(SMOKE, {}, sets)
    m = build_machinery(cfg, choose_hardware(cfg, World()), World(), steps=1)
    assert m.scaler.is_enabled() and m.scaler.get_scale() == 2.0**16
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32, generator=gen), torch.arange(16) % 10
    reference = copy.deepcopy(m.plain)  # the same weights, a plain float32 backward
    m.loss_fn(reference(images).float(), labels).backward()
    true_grads = [p.grad for p in reference.parameters()]
    before = [p.detach().clone() for p in m.params]

    norms = train_step(m, images, labels, Meters(CPU))

    expected = torch.stack([g.norm() for g in true_grads])
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=1e-8)
    total = expected.norm()
    assert total > 0.05  # else clipping would not act and the test would prove nothing
    factor = 0.05 / (total + 1e-6)
    for p, g, old in zip(m.params, true_grads, before, strict=True):
        torch.testing.assert_close(p.grad, g * factor, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(p.detach(), old - 0.1 * g * factor, rtol=1e-4, atol=1e-7)


def resolved_show(cli, *args: str) -> tuple[list[str], dict]:
    result = cli("config", "show", "-c", SMOKE, *args)
    assert result.exit_code == 0, result.output
    comments = [line[2:] for line in result.stdout.splitlines() if line.startswith("# ")]
    return comments, yaml.safe_load(result.stdout)


def test_config_show_prints_resolved_values_and_why(cli):
    comments, tree = resolved_show(cli, "--set", "train.device=auto", "--set", "train.amp=auto")
    expected = resolve_precision(resolve_config(SMOKE).train, CPU)  # no GPU on the test host
    train = tree["train"]
    assert train["device"] == "cpu" and train["compile"] is False
    assert train["amp"] is (expected.dtype is not None)
    assert train["grad_scaler"] is False
    assert comments == ["device: cpu", expected.describe(), "compile: False (CPU, auto)"]
    _, given = resolved_show(cli, "--set", "train.device=auto", "--as-given")
    assert given["train"]["device"] == "auto" and given["train"]["compile"] == "auto"


@pytest.mark.parametrize("amp", ["false", "auto", "true"])
def test_config_show_resolves_amp_dtype_even_for_float32(cli, amp):
    """No `auto` is left: with autocast off, amp_dtype is what `train.amp: true` would use."""
    _, tree = resolved_show(cli, "--set", f"train.amp={amp}", "--set", "train.amp_dtype=auto")
    assert tree["train"]["amp_dtype"] == "bfloat16"  # the CPU's only autocast dtype
    assert "auto" not in yaml.safe_dump(tree)
