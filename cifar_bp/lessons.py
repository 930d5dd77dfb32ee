"""`cifar-bp losses`: the tutorial's worked loss numbers and the gradient each loss sends back.

Everything here is the PLAIN `torch.nn` loss, built directly (`nn.L1Loss()`, `nn.MSELoss()`,
`nn.CrossEntropyLoss()`), never through the config schema: the schema's defaults (such as
`label_smoothing: 0.1`) belong to training, and would silently change the tutorial's numbers.
All sums are in float64, so the printed digits are the maths and not float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cifar_bp.errors import UsageError

TUTORIAL_INPUT = (1.0, 2.0, 3.0)
TUTORIAL_TARGET = (1.0, 2.0, 5.0)
TUTORIAL_LOGITS = (0.1, 0.2, 0.3)
TUTORIAL_LABEL = 1
REDUCTIONS = ("none", "mean", "sum")
GRAD_REDUCTIONS = ("mean", "sum")  # backward() needs a scalar
SWEEP_ERRORS = (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
FORMULAS = {
    "l1": "sign(input − target) / N",
    "mse": "2·(input − target) / N",
    "ce": "(softmax(logits) − one_hot(target)) / N",
}  # N: what mean divides by (elements for L1/MSE, samples for CE); sum: N = 1


def plain_loss(name: str, reduction: str) -> nn.Module:
    """The loss exactly as the tutorial constructs it: torch's defaults, nothing else."""
    losses = {"l1": nn.L1Loss, "mse": nn.MSELoss, "ce": nn.CrossEntropyLoss}
    return losses[name](reduction=reduction)


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


def parse_label(text: str) -> int:
    """`--label 1` → 1; whether the class exists is `check_label`'s to say."""
    if not text.strip().isdigit():
        raise UsageError(f"--label {text!r}: expected a class index, a whole number from 0")
    return int(text)


def check_label(label: int, num_logits: int, given: bool = True) -> None:
    """One class per logit: a label past the last logit is a one-line UsageError, also when
    it is the tutorial's default (class 1 does not exist for a single logit)."""
    if 0 <= label < num_logits:
        return
    classes = "0" if num_logits == 1 else f"from 0 to {num_logits - 1}"
    if given:
        raise UsageError(f"--label {label}: expected a class index {classes} (one per logit)")
    count = f"{num_logits} logit" + "s" * (num_logits != 1)
    raise UsageError(
        f"--logits has {count}, so the tutorial's class {TUTORIAL_LABEL} does not exist: "
        f"give --label {classes}"
    )


# --- Gradients: autograd beside the closed form ----------------------------------------------


def autograd_grad(name: str, reduction: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂loss/∂x by backward(): x is the prediction (L1, MSE) or the logits [N, C] (CE)."""
    x = x.detach().clone().requires_grad_(True)
    plain_loss(name, reduction)(x, y).backward()
    assert x.grad is not None
    return x.grad


def closed_form_grad(name: str, reduction: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same gradient written out by hand (see FORMULAS)."""
    if name == "ce":
        per_sample = x.softmax(dim=-1) - nn.functional.one_hot(y, x.shape[-1]).to(x.dtype)
        n = x.shape[0] if x.dim() > 1 else 1
    else:
        per_sample = (x - y).sign() if name == "l1" else 2 * (x - y)
        n = x.numel()
    return per_sample / n if reduction == "mean" else per_sample


def gradients(name: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Both reductions, both ways, and whether they agree (to float64 rounding)."""
    auto = {r: autograd_grad(name, r, x, y) for r in GRAD_REDUCTIONS}
    closed = {r: closed_form_grad(name, r, x, y) for r in GRAD_REDUCTIONS}
    agree = all(torch.allclose(auto[r], closed[r], rtol=1e-9, atol=1e-12) for r in auto)
    flat = {r: auto[r].flatten().tolist() for r in auto}
    return {
        "grad": flat,
        "grad_closed_form": {r: closed[r].flatten().tolist() for r in closed},
        "grad_formula": FORMULAS[name],
        "grad_agrees": agree,
    }


# --- The worked examples -----------------------------------------------------------------------


def _reduced(name: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    return {r: plain_loss(name, r)(x, y).tolist() for r in REDUCTIONS}


def regression_example(name: str, inputs: list[float], targets: list[float]) -> dict[str, Any]:
    """L1 or MSE on plain numbers, as in the tutorial: per element, reduced, and its gradient."""
    if len(inputs) != len(targets):
        raise UsageError(
            f"--input has {len(inputs)} numbers but --target has {len(targets)}: "
            "they are compared element by element, so give the same count"
        )
    x = torch.tensor(inputs, dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64)
    return {"loss": name, "input": inputs, "target": targets,
            **_reduced(name, x, y), **gradients(name, x, y)}  # fmt: skip


def ce_example(logits: list[float], label: int) -> dict[str, Any]:
    """Cross-entropy step by step: exp, normalise (softmax), then −log of the true class.

    The loss itself comes from log-softmax (logsumexp − logit), as torch computes it: exp
    overflows for a logit of 800 and softmax underflows to 0, but the loss is still 800.
    """
    z = torch.tensor([logits], dtype=torch.float64)
    y = torch.tensor([label])
    exp = z[0].exp()
    log_probs = z.log_softmax(dim=1)[0]
    logsumexp = z[0].logsumexp(dim=0).item()
    return {
        "loss": "ce", "logits": logits, "label": label,
        "exp": exp.tolist(), "exp_sum": exp.sum().item(), "softmax": log_probs.exp().tolist(),
        "p_label": log_probs[label].exp().item(), "logsumexp": logsumexp,
        "minus_log_p": -log_probs[label].item(),
        **_reduced("ce", z, y), **gradients("ce", z, y),
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
    check_label(c, len(z), given=label is not None)
    examples = {
        "l1": regression_example("l1", x, y),
        "mse": regression_example("mse", x, y),
        "ce": ce_example(z, c),
    }
    return _floats(examples, _no_negative_zero)


def sweep(errors: tuple[float, ...] = SWEEP_ERRORS) -> list[dict[str, Any]]:
    """L1 and MSE of one prediction against target 0 as the error grows, with autograd's
    gradient: L1's stays 1 whatever the error, MSE's is 2·error."""
    rows = []
    y = torch.zeros(1, dtype=torch.float64)
    for error in errors:
        x = torch.tensor([error], dtype=torch.float64)
        row: dict[str, Any] = {"error": error}
        for name in ("l1", "mse"):
            row[name] = {
                "loss": plain_loss(name, "mean")(x, y).item(),
                "grad": autograd_grad(name, "mean", x, y).item(),
            }
        rows.append(row)
    return rows


def _no_negative_zero(value: float) -> float:
    return value + 0.0  # -0.0 + 0.0 is 0.0: a loss of "-0.0000" reads as a sign error


def _floats(value: Any, fn: Callable[[float], Any]) -> Any:
    """`fn` applied to every float inside dicts, lists and tuples."""
    if isinstance(value, float):
        return fn(value)
    if isinstance(value, dict):
        return {k: _floats(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_floats(v, fn) for v in value]
    return value


def _strict_float(value: float) -> float | str:
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return _no_negative_zero(value)


def strict(value: Any) -> Any:
    """JSON-safe: inf/-inf/nan become the strings "inf"/"-inf"/"nan" (JSON has no such
    numbers; Python's `Infinity` tokens break strict parsers), and -0.0 becomes 0.0."""
    return _floats(value, _strict_float)


# --- Printing ----------------------------------------------------------------------------------


def _num(value: float, digits: int = 4) -> str:
    value = _no_negative_zero(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 10**-digits or abs(value) >= 1e6):
        return f"{value:.{digits - 1}e}"  # 0.0000 would hide a tiny probability
    return f"{value:.{digits}f}"


def _nums(values: list[float], digits: int = 4) -> str:
    return "[" + ", ".join(_num(v, digits) for v in values) + "]"


def _given(values: list[float]) -> str:
    return "[" + ", ".join(f"{_no_negative_zero(v):g}" for v in values) + "]"


def _operands(a: float, b: float, diff: float) -> tuple[str, str]:
    """a and b for "a − b = diff", with enough decimals that the subtraction reads right:
    "10.0000 − 10.0000 = 4.540e-05" would not (10.00004540 − 10.00000000 does)."""
    plain = _num(a), _num(b)
    if diff == 0 or not math.isfinite(diff) or (plain[0] != plain[1] and abs(diff) >= 1e-4):
        return plain
    if max(abs(a), abs(b)) >= 1e15:  # fixed notation would print dozens of digits
        return f"{a:.16e}", f"{b:.16e}"  # 17 significant digits tell any two doubles apart
    decimals = min(17, max(4, 3 - math.floor(math.log10(abs(diff)))))  # diff's 3 digits
    return f"{a:.{decimals}f}", f"{b:.{decimals}f}"


def _say(text: str = "", style: str | None = None) -> None:
    from cifar_bp.report import console

    # markup=False: "[inf, 1.0000]" is data, and rich would take "[inf, ...]" for a style tag.
    console.print(text, markup=False, style=style, soft_wrap=True, highlight=False)


def _table(rows: list[tuple[str, str, str]]) -> Any:

    from cifar_bp.report import table

    out = table("", ["reduction", "loss", "how"], [tuple(r) for r in rows])
    out.columns[-1].justify = "left"  # the explanations read better ragged-right
    return out


def _grad_lines(ex: dict[str, Any]) -> None:
    verdict = "agree" if ex["grad_agrees"] else "DISAGREE"
    _say(f"  gradient ∂loss/∂{'logits' if ex['loss'] == 'ce' else 'input'}: closed form "
         f"{ex['grad_formula']}")  # fmt: skip
    for r in GRAD_REDUCTIONS:
        auto, closed = _nums(ex["grad"][r]), _nums(ex["grad_closed_form"][r])
        _say(f"    {r:<4}  autograd {auto}   closed form {closed}")
    _say(f"    autograd and the closed form {verdict} (float64)")
    _say()


def print_examples(examples: dict[str, dict[str, Any]]) -> None:
    """The worked examples as the tutorial writes them out, with every reduction."""
    from cifar_bp.report import console

    _say("Plain torch.nn losses (torch's defaults: no label smoothing, no class weights):\n")
    for name, title, per_element in (("l1", "L1Loss", "|input − target|"),
                                     ("mse", "MSELoss", "(input − target)²")):  # fmt: skip
        ex = examples[name]
        n = len(ex["none"])
        _say(f"{title}  input {_given(ex['input'])}  target {_given(ex['target'])}", "bold")
        rows = [
            ("none", _nums(ex["none"]), f"{per_element}, one per element"),
            ("mean", _num(ex["mean"]), f"{_num(ex['sum'])} / {n} elements (the default)"),
            ("sum", _num(ex["sum"]), "added up, not divided"),
        ]
        console.print(_table(rows))
        _grad_lines(ex)
    print_ce(examples["ce"])


def print_ce(ex: dict[str, Any]) -> None:
    from cifar_bp.report import console

    c, z = ex["label"], ex["logits"]
    _say(f"CrossEntropyLoss  logits {_given(z)}  target class {c}", "bold")
    _say(f"  1. exp(logits)          = {_nums(ex['exp'])}   sum {_num(ex['exp_sum'])}")
    _say(f"  2. softmax = exp / sum  = {_nums(ex['softmax'])}")
    loss, p = _num(ex["minus_log_p"]), ex["p_label"]
    if p > 0:
        _say(f"  3. loss = −log(softmax[{c}]) = −log({_operands(1.0, p, 1.0 - p)[1]}) = {loss}")
    else:
        _say(f"  3. loss = −log(softmax[{c}]): softmax[{c}] underflows to 0, and −log(0) = inf")
    lse, z_c = _operands(ex["logsumexp"], z[c], ex["minus_log_p"])
    _say(f"     torch computes it as log-softmax: logsumexp(logits) − logits[{c}] = "
         f"{lse} − {z_c} = {loss}")  # fmt: skip
    rows = [
        ("none", _nums(ex["none"]), "one loss per sample (here one sample)"),
        ("mean", _num(ex["mean"]), "averaged over the samples"),
        ("sum", _num(ex["sum"]), "added over the samples"),
    ]
    console.print(_table(rows))
    _grad_lines(ex)


def print_sweep(rows: list[dict[str, Any]]) -> None:
    from cifar_bp.report import console, table

    cells = [
        (_num(r["error"], 2), *(_num(r[n][k]) for n in ("l1", "mse") for k in ("loss", "grad")))
        for r in rows
    ]
    columns = ["error x − y", "L1 loss", "L1 ∂/∂x", "MSE loss", "MSE ∂/∂x"]
    console.print(table("As the error grows: one prediction x, target y = 0", columns, cells))
    _say("(plain torch.nn losses; gradients from autograd; one element, so mean = sum)")
    _say("L1's gradient is ±1 whatever the error: it pushes as hard 0.01 from the target as 10 "
         "away.")  # fmt: skip
    _say("MSE's gradient is 2·error: it shrinks as the prediction closes in, and large errors "
         "pull hardest.")  # fmt: skip
