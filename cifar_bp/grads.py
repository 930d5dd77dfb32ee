"""`cifar-bp inspect-grads`: the tutorial's debugger moment, in a terminal.

Stopped on `result_loss.backward()`, `model.model1.conv1.weight.grad` is None; one step
later it holds this batch's gradient. This module runs exactly that on one batch, with
the project's own config, model, loss and data code, and reports what backward wrote:
plain data (`as_dict` is the `--json` output), which `grads_view` renders and
`gradcheck` verifies against finite differences.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_bp.checkpoint import (
    config_of,
    facts_of,
    load_checkpoint,
    load_model_state,
    trained_weights,
)
from cifar_bp.config import Config, LossConfig, ModelConfig, resolve_config
from cifar_bp.data import Dataset, DeviceLoader, load_dataset, synthetic_split
from cifar_bp.errors import CliError, UsageError
from cifar_bp.gradcheck import GradCheck, check_gradients
from cifar_bp.hardware import resolve_device
from cifar_bp.losses import LOSS_NAMES, build_loss, elements_averaged, unused_settings
from cifar_bp.model import build_model

CHECKSUM_PARAM = "model1.conv1.weight"
FALLBACK_IMAGES = 256  # synthetic images generated when the configured data is absent
# One batch goes through forward and backward at once, its activations all kept (about
# 0.25 MB an image): 8,192 images is 2 GB, and far past any batch one would train with.
MAX_BATCH = 8192
LOGIT_IMAGES = 3  # images whose ∂L/∂logits is kept: enough to see the pattern, fits 80 columns
# What the tutorial's `nn.CrossEntropyLoss()` does: the header names every departure from it.
# Taken from torch itself, not from our config schema, whose defaults are not the tutorial's.
PLAIN_CE = nn.CrossEntropyLoss()


@dataclass
class ParamBefore:
    name: str
    shape: list[int]
    requires_grad: bool
    grad: None  # backward has not run yet: there is nothing to hold


@dataclass
class GradStats:
    name: str
    shape: list[int]
    norm: float
    mean: float
    std: float
    max_abs: float
    zero_fraction: float  # exact zeros, e.g. positions a max-pool did not pick
    grad_to_weight: float  # ‖grad‖/‖weight‖: how large an SGD step is relative to the weights


@dataclass
class Pass:
    """One forward and one backward of the batch through one loss."""

    loss: str
    reduction: str
    checksum: str  # of model1.conv1.weight before this pass: equal ⇒ same initial weights
    loss_value: float | None  # None for reduction none (a tensor, see loss_summary)
    loss_shape: list[int]
    loss_summary: dict[str, float] | None
    backward_call: str
    before: list[ParamBefore]
    after: list[GradStats]
    total_norm: float
    settings: list[str]  # the loss's settings that differ from the plain torch.nn loss
    logit_grads: list[list[float]]  # ∂L/∂logits of the first LOGIT_IMAGES images
    grads: dict[str, torch.Tensor] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(replace(self, grads={})).items() if k != "grads"}


@dataclass
class FactorCheck:
    """`sum` and `mean` gradients differ by exactly the number of averaged elements."""

    loss: str
    divisor: str  # in words: N, N·C, or the targets' class weights
    expected: float  # what `mean` divides by (elements_averaged, from the actual labels)
    measured: float  # ‖g_sum‖ / ‖g_mean‖ over all parameters
    max_rel_error: float  # worst parameter: ‖g_sum − expected·g_mean‖ / ‖g_sum‖


@dataclass
class Inspection:
    model_source: str
    data_source: str
    notes: list[str]
    labels: list[int]
    passes: list[Pass]
    factors: list[FactorCheck]
    param: str | None = None
    preview: str = ""  # which slice of the --param gradient `values` holds
    values: dict[str, list[list[float]]] = field(default_factory=dict)  # per loss
    checks: list[GradCheck] | None = None  # --check: one per pass

    def as_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model_source, "data": self.data_source, "notes": self.notes,
            "batch_size": len(self.labels), "labels": self.labels,
            "passes": [p.as_dict() for p in self.passes],
            "factors": [asdict(f) for f in self.factors],
            "param": self.param, "param_preview": self.preview, "values": self.values,
        }  # fmt: skip
        if self.checks is not None:
            out["check"] = [c.as_dict() for c in self.checks]
        return out


def loss_names(choice: str) -> list[str]:
    """`--loss`: one of the losses, or `all` for each of them on the same batch and weights."""
    if choice == "all":
        return list(LOSS_NAMES)
    if choice not in LOSS_NAMES:
        raise UsageError(f"--loss {choice!r}: choose ce, mse, l1 or all")
    return [choice]


def inspect_config(
    path: Path | None, flags: dict[str, Any], sets: list[str], checkpoint: Path | None
) -> tuple[Config, dict[str, Any] | None]:
    """The config, plus the checkpoint payload when one is inspected.

    Without --config a checkpoint's own config is the base, so its data and loss are used.
    """
    if checkpoint is None:
        return resolve_config(path, flags, sets), None
    payload = load_checkpoint(checkpoint)
    base = None if path is not None else config_of(payload, checkpoint)
    return resolve_config(path, flags, sets, base=base), payload


def inspect_grads(
    cfg: Config,
    losses: list[str],
    payload: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
    param: str | None = None,
    check: bool = False,
) -> Inspection:
    if cfg.train.batch_size > MAX_BATCH:
        raise UsageError(
            f"--batch-size {cfg.train.batch_size}: inspect-grads takes at most {MAX_BATCH:,} "
            "images (the whole batch goes through backward at once)"
        )
    device = resolve_device(cfg.train.device)
    model, model_source = make_model(cfg, device, payload, checkpoint)
    names = [name for name, _ in model.named_parameters()]
    if param is not None and param not in names:
        raise UsageError(f"--param {param!r}: not a parameter; choose one of {', '.join(names)}")
    images, labels, data_source, notes = first_batch(cfg, device)
    passes, factors = [], []
    for name in losses:
        loss_cfg = cfg.loss.model_copy(update={"name": name})
        passes.append(backprop(model, images, labels, loss_cfg))
        factors.append(factor_check(model, images, labels, loss_cfg))
    out = Inspection(model_source, data_source, notes, labels.tolist(), passes, factors, param)
    for p in passes if param is not None else []:
        out.preview, out.values[p.loss] = preview(p.grads[param])
    if check:
        out.checks = [
            check_gradients(model, images, labels, cfg.loss.model_copy(update={"name": name}))
            for name in losses
        ]
    return out


def make_model(
    cfg: Config, device: torch.device, payload: dict[str, Any] | None, path: Path | None
) -> tuple[nn.Module, str]:
    """A fresh model seeded exactly as `train` seeds it, or a checkpoint's weights."""
    if payload is None or path is None:
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, device), f"fresh (train.seed={cfg.train.seed})"
    # The weights decide the architecture: take the model section from the checkpoint.
    model_cfg = ModelConfig.model_validate(config_of(payload, path).get("model", {}))
    model = build_model(model_cfg, device)
    load_model_state(model, trained_weights(payload), path)
    facts = facts_of(payload)
    where = f"epoch {facts.epoch}, step {facts.global_step}"
    return model, f"checkpoint {path / 'last.pt' if path.is_dir() else path} ({where})"


def first_batch(
    cfg: Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, str, list[str]]:
    """The first training batch of epoch 0, as `train` with this config would draw it.

    Never downloads. When the configured data is absent, says so and uses synthetic data.
    """
    data_cfg = cfg.data.model_copy(update={"download": False})
    try:
        data = load_dataset(data_cfg, cfg.train.seed)
        notes, source = list(data.notes), data_cfg.source
    except UsageError:
        raise  # a mistake in the config is reported, not papered over
    except CliError as err:
        reason = str(err).split(" (")[0]
        size = max(FALLBACK_IMAGES, cfg.train.batch_size)  # at most MAX_BATCH
        notes = [
            f"{reason}: using {size} synthetic images instead (inspect-grads never "
            "downloads; point data.root at the data, or use --config configs/smoke.yaml)"
        ]
        source = f"synthetic (fallback from {data_cfg.source})"
        data = Dataset(synthetic_split(size, cfg.train.seed), None)
    loader = DeviceLoader(
        data.train, data_cfg, cfg.train.batch_size, device, train=True, seed=cfg.train.seed,
        channels_last=cfg.model.channels_last,
    )  # fmt: skip
    images, labels = next(iter(loader.epoch(0)))
    if len(labels) < cfg.train.batch_size:  # else the header's "batch of N" is unexplained
        notes.append(
            f"batch of {len(labels)}: the training set has only {len(data.train)} images "
            f"(asked for {cfg.train.batch_size})"
        )
    return images, labels, source, notes


def checksum(tensor: torch.Tensor) -> str:
    """A short hash of the exact bytes: equal only if every value is bit-for-bit equal."""
    data = tensor.detach().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def backprop(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_cfg: LossConfig
) -> Pass:
    """Forward, record the parameters (no .grad yet), backward, record the gradients."""
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)  # as if this were the first iteration
    mark = checksum(params[CHECKSUM_PARAM])
    logits = model(images)
    logits.retain_grad()  # a non-leaf: autograd frees its .grad unless asked to keep it
    loss = build_loss(loss_cfg).to(images.device)(logits, labels)
    # Here is the tutorial's breakpoint: the forward pass is done, backward is not.
    before = [ParamBefore(n, list(p.shape), p.requires_grad, p.grad) for n, p in params.items()]
    if loss.dim() == 0:
        loss.backward()
        call, value, summary = "loss.backward()", loss.item(), None
    else:
        # A tensor of losses needs the vector it multiplies: ones sends each element's
        # gradient back unscaled, which equals backward() of their sum.
        loss.backward(gradient=torch.ones_like(loss))
        call, value = "loss.backward(gradient=torch.ones_like(loss))", None
        flat = loss.detach().double()
        summary = {"min": flat.min().item(), "mean": flat.mean().item(),
                   "max": flat.max().item(), "sum": flat.sum().item()}  # fmt: skip
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    after = [grad_stats(n, grads[n], p) for n, p in params.items() if n in grads]
    total = math.sqrt(sum(s.norm**2 for s in after))
    assert logits.grad is not None
    logit_grads = logits.grad[:LOGIT_IMAGES].double().tolist()
    return Pass(loss_cfg.name, loss_cfg.reduction, mark, value, list(loss.shape), summary,
                call, before, after, total, loss_settings(loss_cfg), logit_grads,
                grads)  # fmt: skip


def loss_settings(cfg: LossConfig) -> list[str]:
    """Every setting that makes this loss differ from the plain torch.nn loss.

    Printed in the header: a schema default such as label_smoothing 0.1 changes every
    number below, and nothing else on the screen would say so.
    """
    if cfg.name != "ce":
        compared = "softmax(logits)" if cfg.input == "probs" else "the raw logits"
        out = [f"input {cfg.input}: {compared} against one-hot targets"]
        unused = unused_settings(cfg)  # e.g. default.yaml's smoothing, which CE alone uses
        if unused is not None:
            out.append(unused.removeprefix(f"loss: {cfg.name} "))
        return out
    out = []
    if cfg.label_smoothing != PLAIN_CE.label_smoothing:
        out.append(f"label_smoothing {cfg.label_smoothing:g} (plain CrossEntropyLoss: 0)")
    if cfg.weight is not None:
        out.append("class weights [" + ", ".join(f"{w:g}" for w in cfg.weight) + "]")
    if cfg.ignore_index != PLAIN_CE.ignore_index:
        out.append(f"ignore_index {cfg.ignore_index}")
    return out


def grad_stats(name: str, grad: torch.Tensor, weight: torch.Tensor) -> GradStats:
    g = grad.double()
    norm = g.norm().item()
    weight_norm = weight.detach().double().norm().item()
    return GradStats(
        name=name, shape=list(grad.shape), norm=norm, mean=g.mean().item(),
        std=g.std(correction=0).item(), max_abs=g.abs().max().item(),
        zero_fraction=(g == 0).double().mean().item(),
        grad_to_weight=norm / weight_norm if weight_norm > 0 else math.inf,
    )  # fmt: skip


def factor_check(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_cfg: LossConfig
) -> FactorCheck:
    """Backward with `mean` and with `sum`; compare the gradients against the divisor."""
    mean = backprop(model, images, labels, loss_cfg.model_copy(update={"reduction": "mean"}))
    total = backprop(model, images, labels, loss_cfg.model_copy(update={"reduction": "sum"}))
    expected = elements_averaged(loss_cfg, labels)
    worst = 0.0
    for name, g_sum in total.grads.items():
        g_sum, g_mean = g_sum.double(), mean.grads[name].double()
        worst = max(worst, ((g_sum - expected * g_mean).norm() / g_sum.norm()).item())
    measured = total.total_norm / mean.total_norm if mean.total_norm > 0 else math.nan
    return FactorCheck(loss_cfg.name, divisor(loss_cfg, labels), expected, measured, worst)


def divisor(cfg: LossConfig, labels: torch.Tensor) -> str:
    """What `mean` divides by, in words."""
    n = len(labels)
    if cfg.name != "ce":
        return f"N·C = {n}·10"
    if cfg.weight is not None or bool((labels == cfg.ignore_index).any()):
        return "Σ class weight of the counted targets"
    return "N"


def preview(grad: torch.Tensor) -> tuple[str, list[list[float]]]:
    """A small, readable corner of a gradient: a conv's first kernel, a matrix's corner."""
    if grad.dim() == 4:
        k = grad.shape[-1]
        return f"[0, 0]: the first {k}×{k} kernel", grad[0, 0].tolist()
    if grad.dim() == 2:
        rows, cols = min(5, grad.shape[0]), min(5, grad.shape[1])
        return f"[:{rows}, :{cols}]: the top-left corner", grad[:rows, :cols].tolist()
    values = grad.flatten()[:10].tolist()
    rows = [values[i : i + 5] for i in range(0, len(values), 5)]  # five a row: fits a terminal
    return f"[:{len(values)}]: the first values", rows
