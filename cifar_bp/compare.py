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

from cifar_bp.cifar10 import NUM_CLASSES
from cifar_bp.config import Config, resolve_config
from cifar_bp.engine import check_trainable
from cifar_bp.errors import Diverged, UsageError
from cifar_bp.hardware import resolve_device, resolve_precision
from cifar_bp.losses import LOSS_NAMES
from cifar_bp.report import PlainReporter, QuietReporter, RichReporter, column_groups, table
from cifar_bp.rundir import plan_run_dir
from cifar_bp.trainer import RunResult

REDUCTION_NAMES = ("mean", "sum")  # `none` cannot train: backward() needs a scalar
# Optimizers whose step does not grow with the gradient's scale (Adam's normalisation,
# Muon's orthogonalisation): for them mean vs sum is a constant factor they divide away.
SCALE_INVARIANT = ("adam", "adamw", "muon")


@dataclass
class Plan:
    parent: Path
    runs: list[tuple[str, Config]]  # (label such as "ce-mean", that run's config)


@dataclass
class ComparedRun:
    label: str
    cfg: Config
    result: RunResult | None  # None when the run diverged
    diverged_at: int | None = None  # the global step Diverged named
    seconds: float = 0.0  # wall time, set-up and evaluation included


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
    resolve_precision(cfg.train, resolve_device(cfg.train.device))
    plan_run_dir(cfg)


class LabelledReporter:
    """The terminal's reporter for a whole comparison: every line names its run.

    A plain wrapper: it sets the wrapped reporter's prefix at each run's start and passes
    everything else through, so rich, plain and quiet output all work unchanged.
    """

    def __init__(self, inner: QuietReporter) -> None:
        self.inner = inner

    def start_run(self, label: str, index: int, total: int) -> None:
        if isinstance(self.inner, PlainReporter):
            self.inner.prefix = f"[{label}] "  # printed as is: the console reads no markup
        self.inner.note(f"run {index + 1}/{total}")

    def note(self, message: str) -> None:
        self.inner.note(message)

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.inner.epoch_start(epoch, epochs, steps, done)

    def progress(self, done: int, loss: float, images_per_s: float) -> None:
        self.inner.progress(done, loss, images_per_s)

    def epoch_end(self, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        self.inner.epoch_end(epoch, metrics, seconds)

    def close(self) -> None:
        self.inner.close()


def make_compare_reporter(quiet: bool) -> LabelledReporter:
    """As `make_reporter`: a live display on a terminal, plain lines otherwise, or nothing."""
    if quiet:
        return LabelledReporter(QuietReporter())
    return LabelledReporter(RichReporter() if sys.stdout.isatty() else PlainReporter())


def run_comparison(plan: Plan, reporter: LabelledReporter) -> list[ComparedRun]:
    """Train the planned runs one after another; a diverged run becomes an outcome and the
    others still train; stop early only if one was interrupted."""
    from cifar_bp.trainer import train

    outcomes = []
    for index, (label, cfg) in enumerate(plan.runs):
        reporter.start_run(label, index, len(plan.runs))
        started = time.perf_counter()
        try:
            outcome = ComparedRun(label, cfg, train(cfg, reporter))
        except Diverged as err:
            # The lesson, not a failure: sum-reduced SGD steps are N times larger.
            reporter.note(f"diverged at step {err.step}: {err}")
            outcome = ComparedRun(label, cfg, None, diverged_at=err.step)
        outcome.seconds = time.perf_counter() - started
        outcomes.append(outcome)
        if outcome.result is not None and outcome.result.stopped_by:
            break
    return outcomes


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def final_loss_per_image(outcome: ComparedRun) -> float | None:
    """The final train loss per image, so mean and sum runs compare."""
    return outcome.result.final_loss_per_image if outcome.result is not None else None


def status(outcome: ComparedRun) -> str:
    if outcome.diverged_at is not None:
        return f"diverged at step {outcome.diverged_at}"
    assert outcome.result is not None
    return f"stopped by {outcome.result.stopped_by}" if outcome.result.stopped_by else "finished"


def comparison_tables(outcomes: list[ComparedRun], width: int) -> list[Table]:
    """Runs as columns, so a run's numbers read top to bottom and runs compare across; as
    many runs to a table as fit in `width` columns, so no name or number is cut short."""
    rows = comparison_rows(outcomes)
    labels = ["", *(o.label for o in outcomes)]

    def need(i: int) -> int:  # a column's longest unbreakable word, plus padding and border
        cells = [str(row[i]) for row in [labels, *rows]]
        words = cells if i == 0 else [w for cell in cells for w in cell.split()]  # 0: no_wrap
        return max(map(len, words), default=1) + 3

    groups = column_groups([need(i) for i in range(len(labels))], 1, width)
    optim = outcomes[0].cfg.optim
    title = f"Comparison (optimizer {optim.name}, lr {optim.lr:g})"
    out = []
    for group in groups:
        part = "" if len(groups) == 1 else f", runs {group[0]}–{group[-1]} of {len(outcomes)}"
        pick = [0, *group]
        chosen = table(title + part, [labels[i] for i in pick],
                       [[row[i] for i in pick] for row in rows])  # fmt: skip
        chosen.columns[0].no_wrap = True
        out.append(chosen)
    return out


def comparison_rows(outcomes: list[ComparedRun]) -> list[tuple[Any, ...]]:
    """The table's rows: a label, then one cell per run."""

    def metric(o: ComparedRun, *keys: str) -> str:
        found = o.result.metrics if o.result is not None else {}
        return _g(next((found[k] for k in keys if k in found), None))

    rows: list[tuple[Any, ...]] = [
        ("status", *(status(o) for o in outcomes)),
        ("train loss per image", *(_g(final_loss_per_image(o)) for o in outcomes)),
        ("test accuracy", *(metric(o, "test/accuracy", "val/accuracy") for o in outcomes)),
        ("wall time", *(f"{o.seconds:.1f}s" for o in outcomes)),
    ]
    finished = [o.result for o in outcomes if o.result is not None]
    # mean ‖g‖: the parameter's gradient norm averaged over the run's log points.
    for name in finished[0].grad_norm_means if finished else []:
        means = (_g(o.result.grad_norm_means.get(name) if o.result else None) for o in outcomes)
        rows.append((f"mean ‖g‖ {name.removeprefix('model1.')}", *means))
    return rows


def per_image_note(outcomes: list[ComparedRun]) -> str:
    """How each run's loss was brought to one image, for the reductions in the table."""
    how = []
    if any(o.cfg.loss.reduction == "sum" for o in outcomes):
        how.append(f"sum ÷ the images summed (N = {outcomes[0].cfg.train.batch_size} a full batch)")
    if any(o.cfg.loss.reduction == "mean" and o.cfg.loss.name != "ce" for o in outcomes):
        c = NUM_CLASSES
        how.append(f"MSE/L1 mean × {c} (mean averaged all N·{c} one-hot entries)")
    if any(o.cfg.loss.reduction == "mean" and o.cfg.loss.name == "ce" for o in outcomes):
        weighted = any(
            o.cfg.loss.weight is not None or o.cfg.loss.ignore_index >= 0 for o in outcomes
        )
        how.append(
            "CE mean × the class weight it divided by, ÷ N" if weighted
            else "CE mean as it is (already averaged over the N images)"
        )  # fmt: skip
    return "train loss per image: " + "; ".join(how)


def comparison_notes(outcomes: list[ComparedRun]) -> list[str]:
    """What to read into the table: how the optimizer treats the loss's scale, and any loss
    setting that is not the plain torch.nn loss."""
    cfg = outcomes[0].cfg
    name = cfg.optim.name
    notes = [per_image_note(outcomes)]
    if name in SCALE_INVARIANT:
        notes.append(
            f"{name} divides each step by the gradient's own running size, so mean and sum "
            "take the same steps (up to eps): here reduction only rescales the loss"
            + ("; grad_clip, though, clips them differently" if cfg.optim.grad_clip else "")
        )
    else:
        notes.append(
            f"{name}'s step is lr × gradient: sum makes it N (CE) or N·C (MSE, L1) times "
            "larger than mean, so the same lr can diverge under sum"
        )
    if cfg.loss.label_smoothing and any(o.cfg.loss.name == "ce" for o in outcomes):
        notes.append(f"ce runs use label_smoothing {cfg.loss.label_smoothing:g} from the config")
    notes.append(reproducibility_note(cfg))
    return notes


def reproducibility_note(cfg: Config) -> str:
    """Whether 'the same starting point' also means bitwise the same arithmetic here."""
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        return (
            "every run starts from the same weights and data order; on this CPU the kernels "
            "are deterministic, so a rerun of any column is bitwise identical"
        )
    if cfg.train.deterministic:
        return (
            "same weights and data order; train.deterministic makes each run bitwise reproducible"
        )
    return (
        "same weights and data order, but CUDA's fastest kernels are not bitwise reproducible: "
        "set train.deterministic=true for bitwise-identical reruns"
    )
