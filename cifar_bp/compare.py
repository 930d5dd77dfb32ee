"""`cifar-bp compare`: one training run per loss × reduction, from identical starting points.

Every run uses the same config apart from `loss.name`/`loss.reduction`, so the same
`train.seed` gives all of them the same initial weights and the same data order. The runs
go into sub-directories of one parent (runs/compare-<time>/ce-mean/, ...), so
`tensorboard --logdir` on the parent overlays their curves.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from cifar_bp.config import Config, resolve_config
from cifar_bp.engine import amp_dtype, check_trainable, resolve_device
from cifar_bp.errors import UsageError
from cifar_bp.losses import LOSS_NAMES
from cifar_bp.report import PlainReporter, QuietReporter, RichReporter, table
from cifar_bp.tracking import plan_run_dir
from cifar_bp.trainer import RunResult

REDUCTION_NAMES = ("mean", "sum")  # `none` cannot train: backward() needs a scalar


@dataclass
class Plan:
    parent: Path
    runs: list[tuple[str, Config]]  # (label such as "ce-mean", that run's config)


@dataclass
class Outcome:
    label: str
    result: RunResult
    final_loss: float | None  # the train loss of the last logged window
    seconds: float  # wall time, set-up and evaluation included


def parse_names(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    """`ce,mse` → ["ce", "mse"]; unknown or repeated names are a UsageError."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in allowed]
    if bad or not names:
        hint = " (reduction none cannot be trained: backward() needs a scalar)" * ("none" in bad)
        raise UsageError(
            f"{flag} {text!r}: expected a comma-separated list of {', '.join(allowed)}{hint}"
        )
    if len(set(names)) != len(names):
        raise UsageError(f"{flag} {text!r}: each name may appear only once")
    return names


def plan_parent(logdir: Path, stem: str, name: str | None) -> Path:
    """A new directory under `logdir` to hold several runs. Nothing is created yet."""
    if name is not None:
        parent = logdir / name
        if parent.exists():
            raise UsageError(f"{parent} already exists: choose another --run-name")
        return parent
    stamp = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent, n = logdir / stamp, 1
    while parent.exists():  # two started within the same second
        n += 1
        parent = logdir / f"{stamp}-{n}"
    return parent


def plan_comparison(
    config_path: Path | None,
    flags: dict[str, Any],
    sets: list[str],
    losses: str,
    reductions: str | None,
) -> Plan:
    """Resolve and check every run's config before any of them trains; create nothing."""
    base = resolve_config(config_path, flags, sets)
    loss_list = parse_names(losses, "--losses", LOSS_NAMES)
    reduction_list = (
        parse_names(reductions, "--reductions", REDUCTION_NAMES)
        if reductions is not None
        else [base.loss.reduction]
    )
    parent = plan_parent(Path(base.log.logdir), "compare", base.log.run_name)
    tree = base.model_dump(mode="json")
    runs = []
    for loss in loss_list:
        for reduction in reduction_list:
            label = f"{loss}-{reduction}"
            run_flags = {"loss": loss, "reduction": reduction, "logdir": str(parent),
                         "run_name": label}  # fmt: skip
            cfg = resolve_config(None, run_flags, [], base=tree)
            check_run(cfg)
            runs.append((label, cfg))
    return Plan(parent, runs)


def check_run(cfg: Config) -> None:
    """The checks `train` makes before it creates anything, made for every run up front."""
    check_trainable(cfg)
    amp_dtype(cfg.train, resolve_device(cfg.train.device))
    plan_run_dir(cfg)


class RunLabels:
    """Mixed into a reporter: every line names its run, and the last train loss is kept."""

    prefix = ""
    last_loss: float | None = None

    def start_run(self, label: str, index: int, total: int) -> None:
        self.prefix = self.label_prefix(label)
        self.last_loss = None
        self.note(f"run {index + 1}/{total}")  # type: ignore[attr-defined]

    def label_prefix(self, label: str) -> str:
        return f"[{label}] "

    def progress(self, done: int, loss: float, images_per_s: float) -> None:
        self.last_loss = loss
        super().progress(done, loss, images_per_s)  # type: ignore[misc]


class QuietCompareReporter(RunLabels, QuietReporter):
    pass


class PlainCompareReporter(RunLabels, PlainReporter):
    pass


class RichCompareReporter(RunLabels, RichReporter):
    """One live display for the whole comparison: each run's epochs add labelled bars."""

    def label_prefix(self, label: str) -> str:
        from rich.markup import escape

        return escape(f"[{label}] ")  # else rich would read "[ce-mean]" as a style tag


CompareReporter = QuietCompareReporter | PlainCompareReporter | RichCompareReporter


def make_compare_reporter(quiet: bool) -> CompareReporter:
    """As `make_reporter`: a live display on a terminal, plain lines otherwise, or nothing."""
    if quiet:
        return QuietCompareReporter()
    if sys.stdout.isatty():
        return RichCompareReporter()
    return PlainCompareReporter()


def run_comparison(plan: Plan, reporter: CompareReporter) -> list[Outcome]:
    """Train the planned runs one after another; stop early if one was interrupted."""
    from cifar_bp.trainer import train

    outcomes = []
    for index, (label, cfg) in enumerate(plan.runs):
        reporter.start_run(label, index, len(plan.runs))
        started = time.perf_counter()
        result = train(cfg, reporter)
        seconds = time.perf_counter() - started
        outcomes.append(Outcome(label, result, reporter.last_loss, seconds))
        if result.stopped_by:
            break
    return outcomes


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def comparison_table(outcomes: list[Outcome]) -> Table:
    """Runs as columns, so a run's numbers read top to bottom and runs compare across."""

    def metric(o: Outcome, *keys: str) -> str:
        return _g(next((o.result.metrics[k] for k in keys if k in o.result.metrics), None))

    rows: list[tuple[Any, ...]] = [
        ("final train loss", *(_g(o.final_loss) for o in outcomes)),
        ("test accuracy", *(metric(o, "test/accuracy", "val/accuracy") for o in outcomes)),
        ("wall time", *(f"{o.seconds:.1f}s" for o in outcomes)),
    ]
    for name in outcomes[0].result.grad_norm_means:
        means = (_g(o.result.grad_norm_means.get(name)) for o in outcomes)
        rows.append((f"mean ‖g‖ {name.removeprefix('model1.')}", *means))
    if any(o.result.stopped_by for o in outcomes):
        rows.append(("stopped by", *(o.result.stopped_by or "" for o in outcomes)))
    # mean ‖g‖: the parameter's gradient norm averaged over the run's log points.
    out = table("Comparison", ["", *(o.label for o in outcomes)], rows)
    out.columns[0].no_wrap = True
    return out
