"""The loss factory: CrossEntropy, MSE and L1, as the tutorial uses them.

`make_criterion` gives the plain `torch.nn` loss (used for the tutorial's worked
examples). `build_loss` adapts it to classification: MSE and L1 compare one-hot
targets with softmax probabilities (or raw logits when `loss.input: logits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cifar_bp.config import LossConfig
from cifar_bp.errors import UsageError

if TYPE_CHECKING:
    from rich.table import Table

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


def build_loss(cfg: LossConfig, num_classes: int = 10) -> nn.Module:
    """A module called as `loss_fn(logits, labels)`, whatever the loss."""
    criterion = make_criterion(cfg)
    if cfg.name == "ce":
        return criterion
    return OneHotLoss(criterion, num_classes, on_probs=cfg.input == "probs")


def elements_averaged(cfg: LossConfig, labels: torch.Tensor, num_classes: int = 10) -> float:
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


# --- The tutorial's worked examples (`cifar-bp losses`) -------------------------------------

TUTORIAL_INPUT = (1.0, 2.0, 3.0)
TUTORIAL_TARGET = (1.0, 2.0, 5.0)
TUTORIAL_LOGITS = (0.1, 0.2, 0.3)
TUTORIAL_LABEL = 1
REDUCTIONS = ("none", "mean", "sum")


def parse_numbers(text: str, flag: str) -> list[float]:
    """`1,2,3` → [1.0, 2.0, 3.0]; anything else is a one-line UsageError naming the flag."""
    try:
        numbers = [float(part) for part in text.split(",")]
    except ValueError:
        numbers = []
    if not numbers or not all(math.isfinite(n) for n in numbers):
        raise UsageError(
            f"{flag} {text!r}: expected finite numbers separated by commas, e.g. 1,2,3"
        )
    return numbers


def parse_label(text: str, num_logits: int) -> int:
    if not text.strip().isdigit() or int(text) >= num_logits:
        raise UsageError(
            f"--label {text!r}: expected a class index from 0 to {num_logits - 1} (one per logit)"
        )
    return int(text)


def _reduced(cfg: LossConfig, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """The same loss under every reduction, computed by the project's own factory."""
    out: dict[str, Any] = {}
    for reduction in REDUCTIONS:
        value = make_criterion(cfg.model_copy(update={"reduction": reduction}))(prediction, target)
        out[reduction] = value.tolist()
    return out


def regression_example(name: str, inputs: list[float], targets: list[float]) -> dict[str, Any]:
    """L1 or MSE on plain numbers, as in the tutorial: per element, then reduced."""
    if len(inputs) != len(targets):
        raise UsageError(
            f"--input has {len(inputs)} numbers but --target has {len(targets)}: "
            "they are compared element by element, so give the same count"
        )
    # float64, so the printed digits are the maths and not float32 rounding.
    x = torch.tensor(inputs, dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64)
    return {"loss": name, "input": inputs, "target": targets,
            **_reduced(LossConfig(name=name), x, y)}  # fmt: skip


def ce_example(logits: list[float], label: int) -> dict[str, Any]:
    """Cross-entropy step by step: exp, normalise (softmax), then −log of the true class."""
    z = torch.tensor([logits], dtype=torch.float64)
    exp = z[0].exp()
    probs = z.softmax(dim=1)[0]
    return {
        "loss": "ce", "logits": logits, "label": label,
        "exp": exp.tolist(), "exp_sum": exp.sum().item(), "softmax": probs.tolist(),
        "p_label": probs[label].item(), "minus_log_p": -probs[label].log().item(),
        **_reduced(LossConfig(name="ce"), z, torch.tensor([label])),
    }  # fmt: skip


def worked_examples(
    inputs: list[float] | None = None,
    targets: list[float] | None = None,
    logits: list[float] | None = None,
    label: int | None = None,
) -> dict[str, dict[str, Any]]:
    """L1, MSE and CE on the tutorial's numbers, or on the caller's where given."""
    x = inputs if inputs is not None else list(TUTORIAL_INPUT)
    y = targets if targets is not None else list(TUTORIAL_TARGET)
    z = logits if logits is not None else list(TUTORIAL_LOGITS)
    c = label if label is not None else TUTORIAL_LABEL
    return {
        "l1": regression_example("l1", x, y),
        "mse": regression_example("mse", x, y),
        "ce": ce_example(z, c),
    }


def _nums(values: list[float], digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def _given(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def print_examples(examples: dict[str, dict[str, Any]]) -> None:
    """The worked examples as the tutorial writes them out, with every reduction."""
    from cifar_bp.report import console, table

    console.print("Computed live by cifar_bp.losses.make_criterion (torch.nn losses):\n")
    for name, title, per_element in (("l1", "L1Loss", "|input − target|"),
                                     ("mse", "MSELoss", "(input − target)²")):  # fmt: skip
        ex = examples[name]
        n = len(ex["none"])
        console.print(
            f"[bold]{title}[/]  input {_given(ex['input'])}  target {_given(ex['target'])}"
        )
        rows = [
            ("none", _nums(ex["none"]), f"{per_element}, one per element"),
            ("mean", f"{ex['mean']:.4f}", f"{ex['sum']:.4f} / {n} elements (the default)"),
            ("sum", f"{ex['sum']:.4f}", "added up, not divided"),
        ]
        console.print(_left(table("", ["reduction", "loss", "how"], rows)))
    ex = examples["ce"]
    c = ex["label"]
    console.print(f"[bold]CrossEntropyLoss[/]  logits {_given(ex['logits'])}  target class {c}")
    console.print(f"  1. exp(logits)          = {_nums(ex['exp'])}   sum {ex['exp_sum']:.4f}")
    console.print(f"  2. softmax = exp / sum  = {_nums(ex['softmax'])}")
    console.print(
        f"  3. loss = −log(softmax[{c}]) = −log({ex['p_label']:.4f}) = {ex['minus_log_p']:.4f}"
    )
    rows = [
        ("none", _nums(ex["none"]), "one loss per sample (here one sample)"),
        ("mean", f"{ex['mean']:.4f}", "averaged over the samples"),
        ("sum", f"{ex['sum']:.4f}", "added over the samples"),
    ]
    console.print(_left(table("", ["reduction", "loss", "how"], rows)))


def _left(out: Table) -> Table:
    out.columns[-1].justify = "left"  # the explanations read better ragged-right
    return out
