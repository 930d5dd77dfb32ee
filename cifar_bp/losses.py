"""The loss factory: CrossEntropy, MSE and L1 as a config describes them.

`make_criterion` gives the `torch.nn` loss with the config's settings (smoothing, class
weights, ignore_index, reduction). `build_loss` adapts it to classification: MSE and L1
compare one-hot targets with softmax probabilities (or raw logits when `loss.input: logits`).
The tutorial's plain worked examples (`cifar-bp losses`) live in `cifar_bp.lessons`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifar_bp.cifar10 import NUM_CLASSES
from cifar_bp.config import LossConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_NAMES = ("ce", "mse", "l1")


def make_criterion(cfg: LossConfig) -> nn.Module:
    if cfg.name == "ce":
        weight = torch.tensor(cfg.weight) if cfg.weight is not None else None
        return nn.CrossEntropyLoss(
            weight=weight,
            ignore_index=cfg.ignore_index,
            label_smoothing=cfg.label_smoothing,
            reduction=cfg.reduction,
        )
    return {"mse": nn.MSELoss, "l1": nn.L1Loss}[cfg.name](reduction=cfg.reduction)


class OneHotLoss(nn.Module):
    """MSE/L1 for classification: the regression loss against one-hot targets."""

    def __init__(self, criterion: nn.Module, num_classes: int, on_probs: bool) -> None:
        super().__init__()
        self.criterion = criterion
        self.num_classes = num_classes
        self.on_probs = on_probs

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        prediction = logits.softmax(dim=1) if self.on_probs else logits
        target = F.one_hot(labels, self.num_classes).to(prediction.dtype)
        return self.criterion(prediction, target)


def build_loss(cfg: LossConfig, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A module called as `loss_fn(logits, labels)`, whatever the loss."""
    criterion = make_criterion(cfg)
    if cfg.name == "ce":
        return criterion
    return OneHotLoss(criterion, num_classes, on_probs=cfg.input == "probs")


def unused_settings(cfg: LossConfig) -> str | None:
    """A note when the config sets cross-entropy options on MSE or L1, which have none
    (`default.yaml` smooths labels; `--loss mse` keeps that key but cannot use it)."""
    if cfg.name == "ce":
        return None
    unused = [f"label_smoothing {cfg.label_smoothing:g}"] * (cfg.label_smoothing > 0)
    unused += ["class weights"] * (cfg.weight is not None)
    plain_index = LossConfig.model_fields["ignore_index"].default
    unused += [f"ignore_index {cfg.ignore_index}"] * (cfg.ignore_index != plain_index)
    if not unused:
        return None
    return f"loss: {cfg.name} ignores {', '.join(unused)} (cross-entropy settings)"


def per_image(loss: float, cfg: LossConfig, batch: int) -> float:
    """A batch's loss per image, so mean- and sum-reduced runs share a scale: sum adds the
    batch's images up; mean averages over the images (CE) or over images × classes (MSE, L1,
    see `elements_averaged`), so mean × C is per image there."""
    if cfg.reduction == "sum":
        return loss / batch
    return loss * (NUM_CLASSES if cfg.name != "ce" else 1)


def elements_averaged(
    cfg: LossConfig, labels: torch.Tensor, num_classes: int = NUM_CLASSES
) -> float:
    """What `reduction: mean` divides the summed loss by: the factor between sum and mean.

    MSE and L1 average over all N·C entries of the one-hot comparison. Cross-entropy divides
    by the total class weight of the targets that count, so ignored labels and class weights
    change the divisor: it is N only without either.
    """
    if cfg.name != "ce":
        return float(labels.numel() * num_classes)
    kept = labels[labels != cfg.ignore_index].cpu()
    if cfg.weight is None:
        return float(kept.numel())
    return float(torch.tensor(cfg.weight, dtype=torch.float64)[kept].sum())
