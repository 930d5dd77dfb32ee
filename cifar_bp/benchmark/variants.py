"""The ways to train that the benchmark compares, and what one training step costs.

(a) is what a user of the tutorial would write: a Dataset returning a PIL image per index,
`ToTensor`, a `DataLoader`, a float32 NCHW model and `loss.item()` every step.
(b) is `cifar-bp train`'s own loop (DeviceLoader + train_step) at the tutorial's batch of 64
in float32, with configs/default.yaml's data recipe (normalization and augmentation: more
work per image than (a) does). (c) is the engine with the fastest settings for the device.
(d) is `cifar-bp train` as a user runs it: configs/default.yaml untouched, its optimizer
included, with precision and compile left on `auto`, i.e. what this machine resolves them to.
(a)-(c) take the tutorial's optimizer (plain SGD, lr 0.01, no schedule, no weight average),
so they do the same arithmetic per step and their figures compare the loops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from cifar_bp.config import TrainConfig
from cifar_bp.errors import UsageError

TUTORIAL_BATCH = 64  # images per step in the tutorial's DataLoader
TUTORIAL_LR = 0.01  # the tutorial's SGD step size

Amp = Literal["auto"] | None | Literal["bfloat16", "float16"]


@dataclass(frozen=True)
class Variant:
    """One way to train: the tutorial's loop, or the engine with these settings."""

    key: str
    label: str
    batch_size: int = TUTORIAL_BATCH  # images per step
    engine: bool = True
    channels_last: bool = True
    amp_dtype: Amp = None  # autocast dtype; None = float32; "auto" = as train resolves it
    compile: bool | Literal["auto"] = False
    tutorial_optim: bool = True  # False: configs/default.yaml's own optimizer and schedule

    def overrides(self) -> list[str]:
        """The `--set` items that give `cifar-bp train` these settings."""
        sets: dict[str, object] = {"train.batch_size": self.batch_size,
                                   "model.channels_last": self.channels_last}  # fmt: skip
        if self.amp_dtype != "auto":
            sets["train.amp"] = self.amp_dtype is not None
            sets["train.amp_dtype"] = self.amp_dtype or "auto"
        sets["train.compile"] = self.compile
        if self.tutorial_optim:
            sets.update({"optim.name": "sgd", "optim.lr": TUTORIAL_LR, "optim.momentum": 0.0,
                         "optim.nesterov": False, "optim.scheduler": "none",
                         "train.ema_decay": "null", "train.eval_flip": False,
                         "train.eval_shift": 0})  # fmt: skip
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items()]


# The fastest engine settings per device type; `--variants b,nchw,bs256,bf16,compile`
# re-measures each setting's effect on another machine (the README has the figures).
FAST = {
    # Channels-last at the tutorial's batch, in bf16 where the CPU has it natively (as train's
    # auto does) and else float32: without native bf16 neither a larger batch, bf16
    # (emulated) nor torch.compile measured faster; with it, bf16 did (README).
    "cpu": Variant("c", "fastest for the CPU", amp_dtype="auto"),
    # Tensor cores: bf16 autocast (fp32's exponent range, so no GradScaler), NHWC for cuDNN,
    # and a batch large enough to keep the GPU busy between kernel launches.
    "cuda": Variant("c", "fastest for the GPU", batch_size=512, amp_dtype="bfloat16"),
}


def catalogue(device_type: str, compile_fast: bool = False) -> dict[str, Variant]:
    """(a)-(d), and variants that change one setting of (b), for searching (c)."""
    fast = FAST[device_type]
    return {
        "a": Variant("a", "tutorial loop", engine=False, channels_last=False),
        "b": Variant("b", "engine as in the tutorial"),
        "c": replace(fast, compile=fast.compile or compile_fast),
        "d": Variant(
            "d",
            "default train",
            batch_size=TrainConfig().batch_size,
            amp_dtype="auto",
            compile="auto",
            tutorial_optim=False,
        ),
        "nchw": Variant("nchw", "(b) in NCHW", channels_last=False),
        "bs256": Variant("bs256", "(b) at batch 256", batch_size=256),
        "bs1024": Variant("bs1024", "(b) at batch 1024", batch_size=1024),
        "bf16": Variant("bf16", "(b) in bf16", amp_dtype="bfloat16"),
        "fp16": Variant("fp16", "(b) in fp16 (CUDA only)", amp_dtype="float16"),
        "compile": Variant("compile", "(b) compiled", compile=True),
    }


def choose(keys: list[str], device_type: str, compile_fast: bool = False) -> dict[str, Variant]:
    """The variants named by `--variants`; `KEY@N` is variant KEY at batch size N."""
    table = catalogue(device_type, compile_fast)
    chosen: dict[str, Variant] = {}
    for key in dict.fromkeys(k.strip() for k in keys if k.strip()):
        found = re.fullmatch(r"(\w+)@(\d+)", key)
        base = table.get(found.group(1) if found else key)
        if base is None or (found and int(found.group(2)) < 1):
            raise UsageError(
                f"--variants {','.join(keys)}: choose from {', '.join(table)} "
                "(KEY@N: that variant at batch size N)"
            )
        batch = int(found.group(2)) if found else base.batch_size
        chosen[key] = replace(base, key=key, batch_size=batch)
    if not chosen:
        raise UsageError("--variants: name at least one variant")
    return chosen


@dataclass(frozen=True)
class StepCost:
    """Floating-point operations per image of one training step (multiply-add = 2)."""

    forward: float
    weight_grads: float
    input_grads: float

    @property
    def total(self) -> float:
        return self.forward + self.weight_grads + self.input_grads


def step_cost(model: nn.Module, side: int = 32, channels: int = 3) -> StepCost:
    """Counted from the shapes one image takes through every conv and linear layer.

    Backward repeats each layer's multiply-adds once for its weight gradient and once for
    its input gradient, except the first layer's input gradient (the image needs none).
    Pools, biases and the loss are a rounding error next to these and are left out.
    """
    macs: list[int] = []

    def count(module: nn.Module, _: tuple, out: torch.Tensor) -> None:
        weight = module.weight
        per_output = weight[0].numel()  # in_channels/groups × kernel area, or in_features
        macs.append(out[0].numel() * per_output)

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, side, side, device=layers[0].weight.device))
    finally:
        for hook in hooks:
            hook.remove()
    forward = 2.0 * sum(macs)
    return StepCost(forward, forward, forward - 2.0 * macs[0])
