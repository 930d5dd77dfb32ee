"""The training step and the evaluation pass.

`train_step` reads top to bottom in the order the hardware runs it. Nothing in it makes
the host wait for the device: the loss, accuracy and gradient norms stay on the device in
`Meters` and are read back only at log points.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cifar_bp.config import Config, OptimConfig, TrainConfig
from cifar_bp.errors import UsageError

# The scheduler steps even when GradScaler skipped the optimizer step (a float16 overflow);
# PyTorch warns about that order, but the lr schedule should follow steps taken, not updates.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"train.device={spec}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"train.device={spec}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    return device


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if not cfg.amp:
        return None
    if cfg.amp_dtype == "float16" and device.type == "cpu":
        raise UsageError(
            "train.amp_dtype=float16 is not supported on the CPU: use bfloat16 or --no-amp"
        )
    return torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16


def make_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """float16 needs loss scaling (its range is narrow); bfloat16 and float32 do not.

    A disabled GradScaler passes every call straight through, so the step has one code path.
    """
    wanted = cfg.grad_scaler is True or (
        cfg.grad_scaler == "auto" and cfg.amp and cfg.amp_dtype == "float16"
    )
    return torch.amp.GradScaler(device.type, init_scale=cfg.init_scale, enabled=wanted)


def build_optimizer(
    cfg: OptimConfig, named: list[tuple[str, nn.Parameter]]
) -> torch.optim.Optimizer:
    params = [p for _, p in named]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    if cfg.name == "muon":
        from cifar_bp.muon import Muon, muon_groups

        return Muon(
            muon_groups(named), cfg.lr, cfg.momentum, cfg.nesterov, cfg.betas, cfg.weight_decay
        )
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Schedules step once per batch, over the whole run."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_pct,
            cycle_momentum=cfg.name == "sgd" and cfg.momentum > 0,
        )  # fmt: skip
    return None


@dataclass
class Meters:
    """Running sums kept on the device between log points (no host sync per step)."""

    device: torch.device
    values: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        zero = torch.zeros((), device=self.device)
        names = ("loss_sum", "steps", "seen", "correct", "skipped", "streak", "max_streak")
        self.values = {name: zero.clone() for name in names}
        self.values["streak_start"] = zero.clone()
        self.values["step"] = zero.clone()

    def update(
        self,
        loss: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        total_norm: torch.Tensor,
    ) -> None:
        v = self.values
        v["step"] += 1
        bad = ~(torch.isfinite(loss) & torch.isfinite(total_norm))
        # A non-finite step is skipped by an active GradScaler, or ruins the weights without one.
        v["skipped"] += bad
        v["streak"] = (v["streak"] + 1) * bad
        v["max_streak"] = torch.maximum(v["max_streak"], v["streak"])
        # Where the current run of bad steps began: the step a divergence message names.
        v["streak_start"] = torch.where(v["streak"] == 1, v["step"], v["streak_start"])
        v["loss_sum"] += torch.where(bad, 0.0, loss.float())
        v["steps"] += ~bad
        v["seen"] += labels.numel()
        v["correct"] += (logits.argmax(1) == labels).sum()

    def read(self) -> dict[str, float]:
        """The one host read-back: a single stacked copy instead of one `.item()` each."""
        names = list(self.values)
        numbers = torch.stack([self.values[n].float() for n in names]).tolist()
        return dict(zip(names, numbers, strict=True))

    def reset_window(self) -> None:
        for name in ("loss_sum", "steps", "max_streak"):
            self.values[name].zero_()


class WeightAverage:
    """An exponential moving average of the weights; evaluation scores it instead of them.

    A constant learning rate leaves the weights bouncing around a minimum (the article
    recipe's accuracy swings by several points from epoch to epoch); their average sits
    nearer its centre. It costs one fused lerp per step and one copy of the model.
    """

    def __init__(self, source: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(source).requires_grad_(False)
        self._live = list(source.parameters())
        self._mine = list(self.model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # Ramp the decay up over the first steps, or the average would long remember the
        # random initial weights (it matters for short runs).
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._mine, self._live, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


@dataclass
class Machinery:
    """Everything one training step touches."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    grad_clip: float | None
    params: list[nn.Parameter]
    average: WeightAverage | None = None
    eval_flip: bool = False  # test-time augmentation: also score each image mirrored

    @classmethod
    def for_eval(
        cls, model: nn.Module, loss_fn: nn.Module, device: torch.device, eval_flip: bool
    ) -> Machinery:
        """Just what `evaluate` touches: no optimizer, scheduler or scaler (float32)."""
        return cls(model, loss_fn, None, None, None, device, None, None, [], eval_flip=eval_flip)  # type: ignore[arg-type]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def train_step(
    m: Machinery, images: torch.Tensor, labels: torch.Tensor, meters: Meters
) -> torch.Tensor:
    """One optimisation step; returns the per-parameter gradient norms (on the device)."""
    # set_to_none frees the old gradients instead of writing zeros into them.
    m.optimizer.zero_grad(set_to_none=True)
    with m.autocast():
        logits = m.model(images)
        # The loss in float32: softmax and log of float16 logits lose too much precision.
        loss = m.loss_fn(logits.float(), labels)
    # With float16 the loss is multiplied by the scale, so small gradients do not flush to 0.
    m.scaler.scale(loss).backward()
    # Divide the scale back out now, so that norms and clipping see the true gradients.
    m.scaler.unscale_(m.optimizer)
    norms = grad_norms(m.params)
    total = torch.linalg.vector_norm(norms)
    if m.grad_clip is not None:
        # clip_grad_norm_ would recompute the norms; reuse ours (no host sync either way).
        factor = (m.grad_clip / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in m.params], factor)
    # step() skips the update if any gradient is inf/NaN; update() then lowers the scale.
    m.scaler.step(m.optimizer)
    m.scaler.update()
    if m.scheduler is not None:
        m.scheduler.step()
    if m.average is not None:
        m.average.update()  # after step(), so the average takes in the weights just written
    meters.update(loss.detach(), logits.detach(), labels, total)
    return norms


def grad_norms(params: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm of every parameter's gradient in one fused kernel, as one device tensor."""
    return torch.stack(torch._foreach_norm([p.grad for p in params])).float()


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    per_class: list[float]  # accuracy of each class (NaN where a class has no images)
    count: int


@torch.no_grad()
def evaluate(
    m: Machinery,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int = 10,
    live: bool = False,
) -> EvalResult:
    """Mean per-image loss and accuracy over the batches, read back once at the end.

    Scores the weight average when there is one (the live weights with `live`), and with
    `m.eval_flip` averages the logits of each image and its mirror (a flipped photo is as
    plausible as the original).
    """
    model = m.average.model if m.average is not None and not live else m.model
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=m.device, dtype=torch.float64)
    hits = torch.zeros(num_classes, device=m.device)
    totals = torch.zeros(num_classes, device=m.device)
    for images, labels in batches:
        with m.autocast():
            logits = model(images)
            if m.eval_flip:
                logits = (logits + model(images.flip(3))) / 2
        loss_sum += m.loss_fn(logits.float(), labels).double() * _per_batch(m, labels)
        correct = (logits.argmax(1) == labels).float()
        totals += torch.bincount(labels, minlength=num_classes)[:num_classes]
        hits.index_add_(0, labels, correct)
    model.train(was_training)
    return summarize(loss_sum, hits, totals)


def _per_batch(m: Machinery, labels: torch.Tensor) -> float:
    """Weight that turns a batch's loss into a sum over its images."""
    reduction = getattr(m.loss_fn, "reduction", None) or m.loss_fn.criterion.reduction
    return labels.numel() if reduction == "mean" else 1.0


def summarize(loss_sum: torch.Tensor, hits: torch.Tensor, totals: torch.Tensor) -> EvalResult:
    count = int(totals.sum().item())
    per_class = (hits / totals).tolist()
    return EvalResult(
        loss=loss_sum.item() / max(count, 1),
        accuracy=hits.sum().item() / max(count, 1),
        per_class=per_class,
        count=count,
    )


def check_trainable(cfg: Config) -> None:
    if cfg.loss.reduction == "none":
        raise UsageError(
            "loss.reduction=none gives one loss per element, but backward() needs a scalar: "
            "train with mean or sum (cifar-bp inspect-grads shows what 'none' sends back)"
        )
