"""`cifar-bp lr-find`: the learning-rate range test (Smith 2015, popularised by fastai).

From the config's own starting weights, train with a learning rate that grows
exponentially from `start` to `end`, one batch per value, and watch the loss: it falls
slowly, then fast, then blows up. The steepest fall of the smoothed loss is a good lr for
the optimizer as configured. The sweep always writes a new folder and never a training run.
Ctrl-C or SIGTERM ends it after the current step, and what it measured is still written.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifar_bp.config import Config
from cifar_bp.errors import CliError, UsageError
from cifar_bp.report import QuietReporter, RichReporter
from cifar_bp.signals import StopRequest

DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds this multiple of its best
MAX_STEPS = 10_000
STEEPEST = "steepest descent of the smoothed loss"
PLAIN_LINES = 10  # progress lines per sweep where there is no live bar
Y_CAP = 2.0  # the figure's y-axis stops at this multiple of the starting loss
CHECKPOINTS = ("last.pt", "best.pt")  # names train saves under; either marks a run folder


@dataclass(frozen=True)
class SweepOptions:
    start_lr: float = 1e-6
    end_lr: float = 1.0
    steps: int = 100
    run_name: str | None = None  # default lr-find-<time>

    def check(self) -> None:
        if not (math.isfinite(self.start_lr) and math.isfinite(self.end_lr)):
            raise UsageError(
                f"--start-lr {self.start_lr:g} and --end-lr {self.end_lr:g}: both must be finite"
            )
        if not 0 < self.start_lr < self.end_lr:
            raise UsageError(
                f"--start-lr {self.start_lr:g} and --end-lr {self.end_lr:g}: need 0 < start < end"
            )
        if not 3 <= self.steps <= MAX_STEPS:
            raise UsageError(f"--steps must be between 3 and {MAX_STEPS}, got {self.steps}")

    def lr_at(self, i: int) -> float:
        """Exponential: the same ratio from each step to the next, start at 0, end at steps-1."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / (self.steps - 1))

    @property
    def beta(self) -> float:
        # The EMA spans about a tenth of the sweep whatever its length, i.e. a fixed share
        # of the lr decades covered (fastai's fixed 0.98 lags 50 steps: half a short sweep).
        return max(0.5, 1 - 10 / self.steps)


@dataclass
class Sweep:
    run_dir: Path
    options: SweepOptions
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str | None = None  # why it ended before the last step
    interrupted_by: str | None = None  # SIGINT or SIGTERM, when a signal ended it
    suggestion: float | None = None
    rule: str = ""
    min_lr: float | None = None  # the lr at the smoothed loss's minimum

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        out["smoothing_beta"] = self.options.beta
        return out


def plan_dir(logdir: Path, run_name: str | None) -> Path:
    """A fresh folder under logdir; an existing --run-name is refused, never reused, and so
    is a logdir inside a training run (the sweep's folder would land among its files)."""
    from cifar_bp.rundir import check_logdir

    check_logdir(logdir)
    check_not_in_run(logdir)
    if run_name is not None:
        run_dir = logdir / run_name
        if run_dir.exists():
            raise UsageError(
                f"{run_dir} already exists: lr-find never writes into an existing folder; "
                "choose another --run-name"
            )
        return run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = logdir / f"lr-find-{stamp}", 1
    while run_dir.exists():  # two sweeps started within the same second
        n += 1
        run_dir = logdir / f"lr-find-{stamp}-{n}"
    return run_dir


def run_marker(folder: Path) -> str | None:
    """What train leaves in every run folder, its identity (run.json) or a checkpoint, if
    `folder` holds one."""
    from cifar_bp.rundir import IDENTITY

    return next((n for n in (IDENTITY, *CHECKPOINTS) if (folder / n).is_file()), None)


def check_not_in_run(logdir: Path) -> None:
    for folder in (logdir, *logdir.parents):
        marker = run_marker(folder)
        if marker is None:
            continue
        # Path(".").parent is "." again: name the real parent then.
        parent = folder.parent if folder.name not in ("", "..") else folder.absolute().parent
        where = "a run folder" if folder == logdir else f"inside the run folder {folder}"
        raise UsageError(
            f"--logdir {logdir} is {where} (it holds {marker}): lr-find never writes into an "
            f"existing run; give the folder that holds the runs, e.g. --logdir {parent}"
        )


def sweep_config(cfg: Config) -> Config:
    """The config as trained, less what would fight the hand-set lr: no schedule (OneCycle
    also rewrites momentum when built), no weight average (unused here) and no compile
    (compiling costs more than a sweep's hundred steps; the numbers do not change)."""
    optim = cfg.optim.model_copy(update={"scheduler": "none"})
    train = cfg.train.model_copy(update={"ema_decay": None, "compile": False})
    return cfg.model_copy(update={"optim": optim, "train": train})


def run_sweep(cfg: Config, options: SweepOptions, reporter: QuietReporter | None = None) -> Sweep:
    """The sweep, its suggestion, and its files in a new folder; a signal ends it early."""
    from cifar_bp.distributed import World
    from cifar_bp.engine import check_trainable
    from cifar_bp.rundir import create_run_dir, new_run_id

    options.check()
    check_trainable(cfg)
    run_dir = plan_dir(Path(cfg.log.logdir), options.run_name)
    m, loader = build(sweep_config(cfg))
    sweep = Sweep(run_dir, options)
    # The handlers go in only now, as in train: a signal while the data loads aborts at once.
    with StopRequest(World()) as stop:
        # Only now: a config that fails to build leaves no folder. mkdir(exist_ok=False)
        # inside, so a folder that appeared meanwhile is an error, never written into.
        create_run_dir(run_dir, cfg, new_run_id(), kind="lr-find")
        measure(sweep, m, loader, reporter or QuietReporter(), stop)
        suggest(sweep)
        write_results(sweep)  # still under the handlers: a repeated SIGTERM cannot cut it
    return sweep


def measure(sweep: Sweep, m: Any, loader: Any, reporter: QuietReporter, stop: StopRequest) -> None:
    """One step per lr until the last, divergence, or a signal (after the step it cut)."""
    from cifar_bp.engine import Meters, train_step

    options, meters = sweep.options, Meters(m.device)
    every = 1 if isinstance(reporter, RichReporter) else max(1, options.steps // PLAIN_LINES)
    reporter.epoch_start(1, 1, options.steps, 0)
    started, seen = time.perf_counter(), 0
    for i, (images, labels) in zip(range(options.steps), batches(loader), strict=False):
        lr = options.lr_at(i)
        for group in m.optimizer.param_groups:
            group["lr"] = lr
        train_step(m, images, labels, meters)
        values = meters.read()  # one read-back per step: the sweep needs every loss
        meters.reset_window()
        going = record(sweep, lr, values["loss_sum"] if values["steps"] else math.nan)
        seen += len(labels)
        if sweep.smoothed and ((i + 1) % every == 0 or not going):
            rate = seen / max(time.perf_counter() - started, 1e-9)
            reporter.progress(len(sweep.smoothed), sweep.smoothed[-1], rate)
        if stop.name is not None:  # exit as signalled even where this step also diverged
            sweep.interrupted_by = stop.name
            sweep.stopped = sweep.stopped or f"interrupted by {stop.name}"
        if not going or sweep.interrupted_by:
            return


def build(cfg: Config) -> tuple[Any, Any]:
    """Machinery and training batches exactly as `train` would build them."""
    from cifar_bp.data import DeviceLoader, load_dataset
    from cifar_bp.distributed import World
    from cifar_bp.hardware import choose_hardware
    from cifar_bp.setup import build_machinery

    hardware = choose_hardware(cfg, World())
    device = hardware.device
    data = load_dataset(cfg.data, cfg.train.seed)
    loader = DeviceLoader(
        data.train, cfg.data, cfg.train.batch_size, device, train=True,
        seed=cfg.train.seed, channels_last=cfg.model.channels_last,
    )  # fmt: skip
    if len(loader) == 0:
        raise CliError(f"the train split ({len(data.train)} images) is smaller than one batch")
    # build_machinery seeds with train.seed: every sweep of a config starts from the same
    # weights, the ones `train` would start from.
    return build_machinery(cfg, hardware, World(), len(loader)), loader


def batches(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """As many epochs as the sweep needs, each in its seeded order."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch, first_global_step=epoch * len(loader))
        epoch += 1


def record(sweep: Sweep, lr: float, loss: float) -> bool:
    """Add one step; False (with the reason in `sweep.stopped`) once it has diverged."""
    i = len(sweep.lrs)
    if not math.isfinite(loss):
        sweep.stopped = f"non-finite loss at step {i} (lr {lr:.2e})"
        return False
    beta = sweep.options.beta
    # The EMA before bias correction is kept implicitly: undo the last step's correction.
    raw = sweep.smoothed[-1] * (1 - beta**i) if i else 0.0
    average = beta * raw + (1 - beta) * loss
    smooth = average / (1 - beta ** (i + 1))  # bias-corrected: no pull towards 0 at the start
    sweep.lrs.append(lr)
    sweep.losses.append(loss)
    sweep.smoothed.append(smooth)
    best = min(sweep.smoothed)
    if smooth > DIVERGE_FACTOR * best:
        sweep.stopped = (
            f"smoothed loss {smooth:.3g} > {DIVERGE_FACTOR:g}× best {best:.3g} at lr {lr:.2e}"
        )
        return False
    return True


def suggest(sweep: Sweep) -> None:
    """The lr where the smoothed loss falls fastest per decade of lr, before its minimum.

    Central differences over the whole curve, searched strictly before the minimum: the
    minimum itself sits at the edge of divergence, too high an lr to train with.
    """
    if len(sweep.smoothed) < 3:
        sweep.rule = "too few finite steps to judge: lower --start-lr"
        return
    low = min(range(len(sweep.smoothed)), key=sweep.smoothed.__getitem__)
    sweep.min_lr = sweep.lrs[low]
    if low < 2:
        sweep.rule = "the loss did not fall over the first steps: lower --start-lr"
        return
    x = torch.tensor(sweep.lrs, dtype=torch.float64).log10()
    y = torch.tensor(sweep.smoothed, dtype=torch.float64)
    (slope,) = torch.gradient(y, spacing=(x,))
    sweep.suggestion = sweep.lrs[int(slope[:low].argmin())]
    sweep.rule = STEEPEST


def write_results(sweep: Sweep) -> None:
    """TensorBoard scalars (step = sweep index), a loss-vs-lr figure, and lr_find.json."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(sweep.run_dir))
    try:
        for i, (lr, loss, smooth) in enumerate(
            zip(sweep.lrs, sweep.losses, sweep.smoothed, strict=True)
        ):
            writer.add_scalar("lr_find/lr", lr, i)
            writer.add_scalar("lr_find/log10_lr", math.log10(lr), i)
            writer.add_scalar("lr_find/loss", smooth, i)
            writer.add_scalar("lr_find/raw_loss", loss, i)
        writer.add_text("lr_find/suggestion", summary_lines(sweep)[0], 0)
        if sweep.lrs:
            writer.add_figure("lr_find/loss_vs_lr", figure(sweep), 0)
    finally:
        writer.close()
    (sweep.run_dir / "lr_find.json").write_text(json.dumps(sweep.as_dict(), indent=2) + "\n")


def figure(sweep: Sweep) -> Any:
    """Smoothed and raw loss against lr on a log axis, the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(sweep.lrs, sweep.losses, alpha=0.3, label="loss")
    ax.plot(sweep.lrs, sweep.smoothed, label="smoothed loss")
    ax.set_ylim(*y_range(sweep))
    if sweep.suggestion is not None:
        ax.axvline(
            sweep.suggestion, color="red", ls="--", label=f"suggested {sweep.suggestion:.1e}"
        )
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="LR range test")
    ax.legend()
    fig.tight_layout()
    return fig


def y_range(sweep: Sweep) -> tuple[float, float]:
    """From just below the lowest loss to at most Y_CAP × the starting loss: the descent,
    the part that is read, fills the plot instead of being flattened by the final spike."""
    values = sweep.losses + sweep.smoothed
    low, high = min(values), max(values)
    if sweep.smoothed[0] > 0:
        high = max(min(high, Y_CAP * sweep.smoothed[0]), low)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.1
    return low - margin, high + margin


def summary_lines(sweep: Sweep) -> list[str]:
    if sweep.suggestion is not None:
        first = f"suggested lr: {sweep.suggestion:.2e} ({sweep.rule})"
    else:
        first = f"no suggestion: {sweep.rule}"
    lines = [first]
    if sweep.min_lr is not None:
        lines.append(
            f"lowest smoothed loss at lr {sweep.min_lr:.2e} ('min loss / 10' rule: "
            f"{sweep.min_lr / 10:.2e})"
        )
    done = len(sweep.lrs)
    if sweep.stopped:
        lines.append(f"stopped after {done} of {sweep.options.steps} steps: {sweep.stopped}")
    return lines


def print_sweep(sweep: Sweep, json_out: bool, rows: int = 20) -> None:
    import typer

    if json_out:
        typer.echo(json.dumps(sweep.as_dict(), indent=2))
        if sweep.interrupted_by:  # stdout holds only the JSON
            typer.echo(f"interrupted by {sweep.interrupted_by} after {len(sweep.lrs)} of "
                       f"{sweep.options.steps} steps; the results so far are in {sweep.run_dir}",
                       err=True)  # fmt: skip
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("step", "lr", "loss", "smoothed", title="LR range test")
    n = len(sweep.lrs)
    shown = {round(k * (n - 1) / max(rows - 1, 1)) for k in range(rows)} if n else set()
    marks = {}
    if sweep.min_lr is not None:
        marks[sweep.lrs.index(sweep.min_lr)] = "  ← lowest"
    if sweep.suggestion is not None:
        marks[sweep.lrs.index(sweep.suggestion)] = "  ← suggested"
    shown |= set(marks)
    for i in sorted(shown):
        mark = marks.get(i, "")
        table.add_row(str(i), f"{sweep.lrs[i]:.2e}", f"{sweep.losses[i]:.4f}",
                      f"{sweep.smoothed[i]:.4f}{mark}")  # fmt: skip
    Console().print(table)
    for line in summary_lines(sweep):
        typer.echo(line)
    if sweep.suggestion is not None:
        typer.echo(f"train with it: --set optim.lr={sweep.suggestion:.2e}")
    done = " (the steps measured before the signal)" if sweep.interrupted_by else ""
    typer.echo(f"written to {sweep.run_dir}{done}")
    typer.echo(f"plot: tensorboard --logdir {shlex.quote(str(sweep.run_dir))}")
