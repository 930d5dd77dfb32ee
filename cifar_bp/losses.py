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


def mean_divisor(loss_fn: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """What `reduction: mean` divides the summed loss by, as a device tensor (no host sync).

    MSE and L1 average over all N·C entries of the one-hot comparison. Cross-entropy divides
    by the total class weight of the targets that count, so ignored labels and class weights
    change the divisor: it is N only without either.
    """
    if isinstance(loss_fn, OneHotLoss):
        return torch.tensor(float(labels.numel() * loss_fn.num_classes), device=labels.device)
    kept = labels != loss_fn.ignore_index
    if loss_fn.weight is None:
        return kept.sum().float()
    # An ignored label (-100) is no index: look up class 0 for it, then count it as 0.
    weight = loss_fn.weight.to(labels.device)[torch.where(kept, labels, 0)]
    return (weight * kept).sum().float()


def summed_over_images(
    loss_fn: nn.Module, loss: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The batch's loss as `reduction: sum` gives it: a sum over its images. Divided by the
    batch's image count it is the loss per image, on one scale for mean and sum runs."""
    criterion = getattr(loss_fn, "criterion", loss_fn)
    if criterion.reduction == "sum":
        return loss
    return loss * mean_divisor(loss_fn, labels)


def elements_averaged(
    cfg: LossConfig, labels: torch.Tensor, num_classes: int = NUM_CLASSES
) -> float:
    """`mean_divisor` of the loss a config describes: the factor between sum and mean."""
    return float(mean_divisor(build_loss(cfg, num_classes), labels))
