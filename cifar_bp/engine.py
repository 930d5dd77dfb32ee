"""The training step and the evaluation pass.

`train_step` reads top to bottom in the order the hardware runs it. Nothing in it makes
the host wait for the device: the loss, accuracy and gradient norms stay on the device in
`Meters` and are read back only at log points.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from cifar_bp.cifar10 import NUM_CLASSES
from cifar_bp.config import Config
from cifar_bp.errors import UsageError
from cifar_bp.losses import summed_over_images

if TYPE_CHECKING:
    from cifar_bp.hardware import Precision


@dataclass
class Meters:
    """Running sums kept on the device, read back in one copy at log points: on CUDA that is
    the only host sync; on the CPU, where work is synchronous, the trainer also reads them
    every step to stop a divergence at once (trainer.train_one_epoch)."""

    device: torch.device
    values: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        zero = torch.zeros((), device=self.device)
        names = ("loss_sum", "steps", "seen", "correct", "skipped", "streak", "max_streak",
                 "image_loss_sum", "loss_images")  # fmt: skip
        self.values = {name: zero.clone() for name in names}
        self.values["streak_start"] = zero.clone()
        self.values["step"] = zero.clone()

    def update(
        self,
        loss: torch.Tensor,
        image_loss: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        total_norm: torch.Tensor,
    ) -> None:
        """`image_loss` is the batch's loss summed over its images (`summed_over_images`):
        divided by the images counted, it is the loss per image even for a short last batch."""
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
        v["image_loss_sum"] += torch.where(bad, 0.0, image_loss.float())
        v["loss_images"] += torch.where(bad, 0, labels.numel())
        v["seen"] += labels.numel()
        v["correct"] += (logits.argmax(1) == labels).sum()

    def read(self) -> dict[str, float]:
        """The one host read-back: a single stacked copy instead of one `.item()` each."""
        names = list(self.values)
        numbers = torch.stack([self.values[n].float() for n in names]).tolist()
        return dict(zip(names, numbers, strict=True))

    def reset_window(self) -> None:
        for name in ("loss_sum", "steps", "max_streak", "image_loss_sum", "loss_images"):
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
    """Everything one training step touches; built by `cifar_bp.setup.build_machinery`."""

    model: nn.Module  # what the step calls: possibly DDP-wrapped and compiled
    plain: nn.Module  # the same weights unwrapped: names read model1.conv1.weight
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    precision: Precision
    grad_clip: float | None
    params: list[nn.Parameter]
    names: list[str]  # of `params`, in their order: model1.conv1.weight, ...
    average: WeightAverage | None = None

    @property
    def device(self) -> torch.device:
        return self.precision.device

    def step_schedule(self) -> None:
        if self.scheduler is None:
            return
        # The schedule follows steps taken, even where GradScaler skipped an update (a
        # float16 overflow); PyTorch warns about that order, which here is intended.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()


def train_step(
    m: Machinery, images: torch.Tensor, labels: torch.Tensor, meters: Meters
) -> torch.Tensor:
    """One optimisation step; returns the per-parameter gradient norms (on the device)."""
    # set_to_none frees the old gradients instead of writing zeros into them.
    m.optimizer.zero_grad(set_to_none=True)
    with m.precision.autocast():
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
    m.step_schedule()
    if m.average is not None:
        m.average.update()  # after step(), so the average takes in the weights just written
    loss = loss.detach()
    meters.update(loss, summed_over_images(m.loss_fn, loss, labels), logits.detach(), labels, total)
    return norms


def grad_norms(params: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm of every parameter's gradient in one fused kernel, as one device tensor."""
    return torch.stack(torch._foreach_norm([p.grad for p in params])).float()


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    per_class: list[float | None]  # accuracy of each class (None where it has no images)
    count: int
    confusion: list[list[int]]  # counts: rows are the true class, columns the prediction


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    precision: Precision,
    flip: bool = False,
    shift: int = 0,
) -> EvalResult:
    """Mean per-image loss, accuracy and the confusion matrix, read back once at the end.

    Test-time augmentation averages the logits of several views of each image: with `flip`
    the image and its mirror (a flipped photo is as plausible as the original), and with
    `shift` each of those also moved `shift` pixels up-left and down-right, as a training
    crop could have moved it.
    """
    was_training = model.training
    model.eval()
    c = NUM_CLASSES
    loss_sum = torch.zeros((), device=precision.device, dtype=torch.float64)
    confusion = torch.zeros(c * c, device=precision.device, dtype=torch.int64)
    for images, labels in batches:
        with precision.autocast():
            logits = view_logits(model, images, flip, shift)
        loss_sum += summed_over_images(loss_fn, loss_fn(logits, labels), labels).double()
        # One bincount over (true, predicted) pairs fills the whole matrix without a sync.
        confusion += torch.bincount(labels * c + logits.argmax(1), minlength=c * c)
    model.train(was_training)
    return summarize(loss_sum, confusion.view(c, c))


def eval_views(images: torch.Tensor, flip: bool, shift: int) -> list[torch.Tensor]:
    """The image batch, its mirror (`flip`), and each moved by ±`shift` pixels diagonally,
    the border reflected as in the training crops."""
    views = [images, images.flip(3)] if flip else [images]
    if shift <= 0:
        return views
    out = []
    for v in views:
        padded = F.pad(v, (shift,) * 4, mode="reflect")
        out += [v, padded[..., : -2 * shift, : -2 * shift], padded[..., 2 * shift :, 2 * shift :]]
    return out


def view_logits(model: nn.Module, images: torch.Tensor, flip: bool, shift: int) -> torch.Tensor:
    """The float32 logits of `eval_views`, averaged: what evaluation and predict score."""
    views = eval_views(images, flip, shift)
    return sum(model(v).float() for v in views) / len(views)


def describe_views(flip: bool, shift: int) -> str:
    """How many views of each image are scored, e.g. `6 views per image (mirror, ±2 px
    diagonal shifts), logits averaged`."""
    extra = ["mirror"] * flip + [f"±{shift} px diagonal shifts"] * (shift > 0)
    if not extra:
        return "1 view per image (as given)"
    return f"{view_count(flip, shift)} views per image ({', '.join(extra)}), logits averaged"


def view_count(flip: bool, shift: int) -> int:
    """len(eval_views(...)) without making them."""
    return (2 if flip else 1) * (3 if shift > 0 else 1)


@dataclass(frozen=True)
class Scoring:
    """What `evaluate` and `predict` score: which weights, and which test-time views."""

    averaged: bool  # the run's weight average (else the trained weights)
    flip: bool = False
    shift: int = 0

    def describe(self) -> str:
        """The line they print first."""
        weights = (
            "the weight average" if self.averaged else "the trained weights (no weight average)"
        )
        return f"scoring: {weights}, {describe_views(self.flip, self.shift)}"

    def as_dict(self) -> dict[str, Any]:
        """The same for --json."""
        weights = "average" if self.averaged else "trained"
        return {"weights": weights, "views": view_count(self.flip, self.shift)}


def summarize(loss_sum: torch.Tensor, confusion: torch.Tensor) -> EvalResult:
    matrix = confusion.cpu()
    totals, hits = matrix.sum(1), matrix.diagonal()
    count = int(totals.sum())
    per_class = [h / t if t else None for h, t in zip(hits.tolist(), totals.tolist(), strict=True)]
    return EvalResult(
        loss=loss_sum.item() / max(count, 1),
        accuracy=int(hits.sum()) / max(count, 1),
        per_class=per_class,
        count=count,
        confusion=matrix.tolist(),
    )


def check_trainable(cfg: Config) -> None:
    if cfg.loss.reduction == "none":
        raise UsageError(
            "loss.reduction=none gives one loss per element, but backward() needs a scalar: "
            "train with mean or sum (cifar-bp inspect-grads shows what 'none' sends back)"
        )
