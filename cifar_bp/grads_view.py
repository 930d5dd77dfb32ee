"""`inspect-grads` on a terminal: the inspection's tables, readable at any width.

Full parameter names (model1.linear1.weight is 21 characters) and numbers to four
significant digits leave room for about five columns in 80, so the per-parameter
statistics come as two narrow tables instead of one wide one that rich would cut to "…";
on a narrower terminal `Fitted` deals a table's columns out over several tables.
"""

from __future__ import annotations

from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from cifar_bp.cifar10 import CLASSES
from cifar_bp.gradcheck import GradCheck
from cifar_bp.grads import CHECKSUM_PARAM, FactorCheck, Inspection, ParamBefore, Pass
from cifar_bp.report import column_groups, console, fmt, table

NONE_BACKWARD = (
    "backward: a tensor of losses needs the vector to multiply by; loss.backward(gradient="
    "torch.ones_like(loss)) weights every element by 1, which equals backward of their sum"
)


def _g(value: float) -> str:
    return f"{value:.4g}"  # four significant digits, whatever the magnitude


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _say(text: str) -> None:
    console.print(text, markup=False, soft_wrap=True, highlight=False)


class Fitted:
    """A table that splits itself, when the console it prints on is too narrow, into as
    many tables as it takes: the first `keys` columns (the parameter's name) repeat in
    each, the others are dealt out left to right, so that rich never cuts a name, header
    or number to "…" to make it fit.

    No column wraps: rich shrinks the widest wrappable column first, below its longest
    word, so only unwrapped columns have a width known here: the longest cell or header,
    plus two of padding and one of border; the table has one more border.
    """

    def __init__(
        self, title: str, columns: list[str], rows: list[tuple[Any, ...]], keys: int = 1
    ) -> None:
        self.title, self.columns, self.keys = title, columns, keys
        self.cells = [[fmt(cell) for cell in row] for row in rows]
        self.show_header = True

    def groups(self, width: int) -> list[list[int]]:
        """The columns after the keys, dealt into groups that fit `width` beside the keys."""
        need = [max(cell_len(text) for text in [header, *(row[i] for row in self.cells)]) + 3
                for i, header in enumerate(self.columns)]  # fmt: skip
        return column_groups(need, self.keys, width)

    def parts(self, width: int) -> list[Table]:
        groups = self.groups(width)
        out = []
        for n, group in enumerate(groups, 1):
            pick = [*range(self.keys), *group]
            # a part's title wraps to the part's width: later parts get a short one
            title = self.title if n == 1 else f"part {n} of {len(groups)}, continued"
            if n == 1 and len(groups) > 1:
                title += f" (part 1 of {len(groups)})"
            part = table(title, [self.columns[i] for i in pick],
                         [[row[i] for i in pick] for row in self.cells])  # fmt: skip
            part.show_header = self.show_header
            for column in part.columns:
                column.no_wrap = True
            out.append(part)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.parts(options.max_width)


def before_table(rows: list[ParamBefore]) -> Fitted:
    return Fitted(
        "Before backward: forward done, no .grad yet",
        ["parameter", "shape", "requires_grad", ".grad"],
        [(r.name, _shape(r.shape), r.requires_grad, r.grad) for r in rows],
    )


def after_tables(p: Pass) -> list[Fitted]:
    """Size (‖g‖, relative to the weights, zeros) first, then the distribution of values."""
    title = f"After {p.backward_call}: {p.loss}, reduction {p.reduction}"
    size: list[tuple[Any, ...]] = [
        (s.name, _shape(s.shape), _g(s.norm), _g(s.grad_to_weight), f"{s.zero_fraction:.1%}")
        for s in p.after
    ]
    size.append(("total", "", _g(p.total_norm), "", ""))
    spread = [(s.name, _g(s.mean), _g(s.std), _g(s.max_abs)) for s in p.after]
    return [
        Fitted(title, ["parameter", "grad shape", "‖g‖", "‖g‖/‖w‖", "zeros"], size),
        Fitted("The values inside each gradient", ["parameter", "mean", "std", "max |g|"],
               spread),
    ]  # fmt: skip


def side_by_side_table(passes: list[Pass]) -> Fitted:
    """Per-parameter gradient norms of each loss, on the same batch and initial weights."""
    columns = ["parameter", "shape", *(f"‖g‖ {p.loss}" for p in passes)]
    rows: list[tuple[Any, ...]] = [
        (s.name, _shape(s.shape), *(_g(p.after[i].norm) for p in passes))
        for i, s in enumerate(passes[0].after)
    ]
    rows.append(("total", "", *(_g(p.total_norm) for p in passes)))
    title = f"Gradient norms per loss (reduction {passes[0].reduction})"
    return Fitted(title, columns, rows)


def same_start_line(passes: list[Pass]) -> str:
    """Why the columns compare: the same starting weights, proven by a hash of their bytes."""
    sums = {p.checksum for p in passes}
    verdict = "the same for every loss" if len(sums) == 1 else "DIFFERENT between losses"
    return (f"Same starting weights: the sha256 of {CHECKSUM_PARAM}'s bytes before each "
            f"pass is {', '.join(sorted(sums))}, {verdict}.")  # fmt: skip


def logit_table(p: Pass, labels: list[int]) -> Fitted:
    """∂L/∂logits, one column per image: the signal backward starts from."""
    shown = labels[: len(p.logit_grads)]
    columns = ["class", *(f"#{i} {CLASSES[c]}" for i, c in enumerate(shown))]
    rows = []
    for k, name in enumerate(CLASSES):
        marked = zip(p.logit_grads, shown, strict=True)
        cells = [f"{g[k]:+.3g}" + ("*" if c == k else " ") for g, c in marked]
        rows.append((name, *cells))
    title = f"∂L/∂logits of the first {len(shown)} images ({p.loss}, reduction {p.reduction})"
    return Fitted(title, columns, rows)


def logit_hint(p: Pass, factor: FactorCheck | None) -> str:
    """What to look for in the logit table, by loss."""
    if p.loss == "ce":
        hint = "softmax − one-hot"
        if any("label_smoothing" in s for s in p.settings):
            hint += " (the one-hot smoothed)"
        hint += ": the true class (*) is the one negative entry, pulled up; the rest pushed down"
    elif any("input probs" in s for s in p.settings):
        hint = ("2·(p − one-hot) (MSE) or sign(p − one-hot) (L1), sent back through the "
                "softmax: small, and each column sums to 0")  # fmt: skip
    else:
        hint = "2·(logits − one-hot) (MSE) or sign(logits − one-hot) (L1), straight back"
    if p.reduction != "mean":
        return f"Each column: {hint}; one per image, not divided (reduction {p.reduction})."
    by = f"{factor.divisor} = {factor.expected:g}" if factor is not None else "N"
    return f"Each column: {hint}; divided by {by} (reduction mean)."


def factor_table(factors: list[FactorCheck]) -> Fitted:
    rows = [
        (f.loss, f"{f.divisor} = {f.expected:g}", f"{f.measured:.6g}", f"{f.max_rel_error:.1e}")
        for f in factors
    ]
    return Fitted(
        "sum vs mean: the gradients differ by what mean divides by",
        ["loss", "mean divides by", "‖g_sum‖/‖g_mean‖", "max rel. err"],
        rows,
    )


def check_table(check: GradCheck) -> Fitted:
    rows = [
        (c.name, c.samples, f"{c.autograd:.6g}", f"{c.finite_difference:.6g}",
         f"{c.max_rel_error:.1e}")
        for c in check.params
    ]  # fmt: skip
    title = (f"Backprop checked: autograd vs central differences (float64, eps {check.eps:g}), "
             f"{check.loss}, reduction {check.reduction}, first {check.images} images")  # fmt: skip
    columns = ["parameter", "weights", "autograd", "finite diff.", "max rel. err"]
    return Fitted(title, columns, rows)


def check_verdict(check: GradCheck) -> str:
    worst = (f"(autograd, finite diff.: the sampled weight with the largest error) Largest "
             f"relative error {check.max_rel_error:.1e}")  # fmt: skip
    if check.agrees:
        return f"{worst} < {check.tolerance:g}: backprop's chain rule agrees with the slopes."
    return f"{worst} ≥ {check.tolerance:g}: autograd and finite differences DISAGREE."


def preview_table(name: str, label: str, values: list[list[float]], loss: str) -> Fitted:
    rows = [tuple(f"{v:+.3e}" for v in row) for row in values]
    out = Fitted(f"{name}.grad{label} ({loss})", [""] * max(map(len, rows)), rows, keys=0)
    out.show_header = False  # the title says which slice the values are
    return out


def loss_line(p: Pass) -> str:
    if p.loss_value is not None:
        return f"{p.loss} loss, reduction {p.reduction}: {p.loss_value:.6g}"
    s = p.loss_summary or {}
    return (
        f"{p.loss} loss, reduction none: a {_shape(p.loss_shape)} tensor, one loss per "
        f"element (min {s['min']:.4g}, mean {s['mean']:.4g}, max {s['max']:.4g}, "
        f"sum {s['sum']:.4g})"
    )


def print_header(insp: Inspection) -> None:
    for note in insp.notes:
        _say(f"note: {note}")
    _say(f"model: {insp.model_source}")
    shown = ", ".join(map(str, insp.labels[:16])) + (", …" if len(insp.labels) > 16 else "")
    _say(f"data:  {insp.data_source}; batch of {len(insp.labels)}, labels [{shown}]")
    for p in insp.passes:
        settings = "; ".join(p.settings) or "plain torch.nn loss, no other settings"
        _say(f"loss:  {p.loss}, reduction {p.reduction}; {settings}")


def print_inspection(insp: Inspection) -> None:
    print_header(insp)
    console.print(before_table(insp.passes[0].before))
    for p in insp.passes:
        _say(loss_line(p))
    if insp.passes[0].loss_value is None:
        _say(NONE_BACKWARD)
    if len(insp.passes) == 1:
        for out in after_tables(insp.passes[0]):
            console.print(out)
    else:
        console.print(side_by_side_table(insp.passes))
        _say(same_start_line(insp.passes))
    factors = {f.loss: f for f in insp.factors}
    for p in insp.passes:
        console.print(logit_table(p, insp.labels))
        _say(logit_hint(p, factors.get(p.loss)))
    console.print(factor_table(insp.factors))
    if insp.param is not None:
        for loss, values in insp.values.items():
            console.print(preview_table(insp.param, insp.preview, values, loss))
    for check in insp.checks or []:
        console.print(check_table(check))
        _say(check_verdict(check))
