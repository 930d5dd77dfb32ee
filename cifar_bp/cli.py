"""The command line: parse, call plain functions, report. No training logic lives here.

torch is imported inside the commands, so `cifar-bp --help` answers instantly.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from cifar_bp.errors import CliError, UsageError

app = typer.Typer(
    name="cifar-bp",
    help=(
        "Train the tutorial's small CNN on CIFAR-10 and make backpropagation visible.\n\n"
        "Start with `cifar-bp train --config configs/smoke.yaml` (synthetic data, seconds on "
        "a CPU), then `tensorboard --logdir runs`. Settings come from a YAML config "
        "(configs/default.yaml unless --config is given), then named flags, then --set."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

STATE = {"debug": bool(os.environ.get("CIFAR_BP_DEBUG"))}

# Options shared by the commands that resolve a config.
ConfigOpt = typer.Option(
    None, "--config", "-c", help="YAML config file (default: configs/default.yaml).",
    exists=False, dir_okay=False,
)  # fmt: skip
SetOpt = typer.Option(
    None, "--set", help="Override any key, e.g. --set optim.lr=0.05 (repeatable; value is YAML)."
)
LossOpt = typer.Option(None, "--loss", help="Loss: ce (cross-entropy), mse or l1.")
ReductionOpt = typer.Option(
    None, "--reduction", help="How per-element losses combine: mean or sum."
)
DeviceOpt = typer.Option(None, "--device", help="auto (CUDA if present), cpu, cuda or cuda:N.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Print only the final summary and errors.")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    STATE["debug"] = STATE["debug"] or debug


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A user's mistake is one line on stderr and an exit code, never a traceback."""
    try:
        yield
    except CliError as err:
        if STATE["debug"]:
            raise
        rank = os.environ.get("RANK")
        who = (
            f"rank {rank}: "
            if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1"
            else ""
        )
        typer.echo(f"error: {who}{err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("aborted", err=True)
        raise typer.Exit(130) from None


def flags_of(**named: Any) -> dict[str, Any]:
    return {key: value for key, value in named.items() if value is not None}


@app.command()
def train(
    config: Path | None = ConfigOpt,
    loss: str | None = LossOpt,
    reduction: str | None = ReductionOpt,
    device: str | None = DeviceOpt,
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over the training set."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Images per step (per process)."
    ),
    lr: float | None = typer.Option(None, "--lr", help="(Peak) learning rate."),
    amp: bool | None = typer.Option(None, "--amp/--no-amp", help="Mixed precision (autocast)."),
    run_name: str | None = typer.Option(
        None, "--run-name", help="Run directory name under --logdir."
    ),
    logdir: str | None = typer.Option(
        None, "--logdir", help="Where runs are written (default runs)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed for weights, data order and augmentation."
    ),
    set_: list[str] | None = SetOpt,
    resume: str | None = typer.Option(
        None,
        "--resume",
        help="Continue a run: a checkpoint, a run directory, or 'auto' (newest run).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Resume even if the config changed unsafely."
    ),
    quiet: bool = QuietOpt,
) -> None:
    """Train the reference CNN: forward, loss, backward, optimizer step; logs to TensorBoard.

    Examples:

    * `cifar-bp train --config configs/smoke.yaml --loss mse`
    * `cifar-bp train --config configs/article.yaml --run-name article`
    * `cifar-bp train --resume runs/article` (after Ctrl-C: picks up at the same step)
    """
    from cifar_bp.distributed import world_from_env
    from cifar_bp.report import make_reporter, print_run_summary
    from cifar_bp.resume import prepare_resume
    from cifar_bp.trainer import train as run_training

    flags = flags_of(
        loss=loss, reduction=reduction, device=device, epochs=epochs, batch_size=batch_size,
        lr=lr, amp=amp, run_name=run_name, logdir=logdir, seed=seed,
    )  # fmt: skip
    with user_errors():
        cfg, payload, run_dir, notes = prepare_resume(resume, config, flags, set_ or [], force)
        reporter = make_reporter(quiet or not world_from_env().is_main)
        for note in notes:
            reporter.note(note)
        try:
            result = run_training(cfg, reporter, payload, run_dir)
        finally:
            reporter.close()
        if world_from_env().is_main:
            print_run_summary(result, quiet)
        if result.stopped_by:
            from cifar_bp.signals import EXIT_CODES

            raise typer.Exit(EXIT_CODES[result.stopped_by])


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="A last.pt/best.pt or a run directory."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Take the data section from this file."
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Data overrides, e.g. --set data.root=/x"
    ),
    device: str | None = DeviceOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Score a checkpoint: test loss, accuracy and per-class accuracy.

    By default on the data it was trained with; --config/--set choose other data
    (the model always comes from the checkpoint).
    """
    from cifar_bp.evaluation import evaluate_checkpoint
    from cifar_bp.report import print_evaluation

    with user_errors():
        outcome = evaluate_checkpoint(checkpoint, config, set_ or [], device)
        print_evaluation(outcome, json_out)


@config_app.command("show")
def config_show(
    config: Path | None = ConfigOpt,
    loss: str | None = LossOpt,
    reduction: str | None = ReductionOpt,
    device: str | None = DeviceOpt,
    epochs: int | None = typer.Option(None, "--epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr"),
    amp: bool | None = typer.Option(None, "--amp/--no-amp"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Print the fully resolved config (file, then flags, then --set) as YAML."""
    from cifar_bp.config import resolve_config

    flags = flags_of(
        loss=loss, reduction=reduction, device=device, epochs=epochs, batch_size=batch_size,
        lr=lr, amp=amp,
    )  # fmt: skip
    with user_errors():
        typer.echo(resolve_config(config, flags, set_ or []).to_yaml(), nl=False)


def main() -> None:
    """Entry point: Click's own usage errors already exit 2; ours are mapped in user_errors."""
    try:
        app()
    except UsageError as err:  # raised outside a command body
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
