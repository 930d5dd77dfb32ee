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
QuietOpt = typer.Option(
    False, "--quiet", "-q", help="No progress: print only notes, the final summary and errors."
)
CompareQuietOpt = typer.Option(False, "--quiet", "-q", help="Print only the table and errors.")


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
    * `cifar-bp train --set optim.name=adam --set optim.lr=3e-3 --set train.ema_decay=0.999`
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
        reporter = make_reporter(quiet, main=world_from_env().is_main)
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


@app.command("inspect-grads")
def inspect_grads(
    config: Path | None = ConfigOpt,
    loss: str | None = typer.Option(
        None, "--loss", help="ce, mse, l1, or all (each on the same batch and weights)."
    ),
    reduction: str | None = typer.Option(
        None, "--reduction", help="mean, sum, or none (backward then needs a gradient tensor)."
    ),
    batch_size: int = typer.Option(1, "--batch-size", help="Images in the batch (tutorial: 1)."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Inspect a trained model (last.pt or run directory)."
    ),
    param: str | None = typer.Option(
        None, "--param", help="Also print part of this gradient, e.g. model1.conv1.weight."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for the fresh weights and batch."),
    device: str | None = DeviceOpt,
    set_: list[str] | None = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    logdir: Path | None = typer.Option(
        None, "--logdir", help="Also write the gradients to TensorBoard under this directory."
    ),
) -> None:
    """Stop where the tutorial's debugger stops: just before and just after loss.backward().

    Shows every parameter's .grad (None) before backward, the batch's loss, then per
    parameter the gradient's norm, mean, std, max |g|, share of zeros and ‖g‖/‖w‖; and
    checks that reduction sum gives exactly N (CE) or N·C (MSE, L1) times the mean's
    gradients.

    Examples:

    * `cifar-bp inspect-grads --loss all` (CE, MSE and L1 side by side)
    * `cifar-bp inspect-grads --reduction none --param model1.conv1.weight`
    * `cifar-bp inspect-grads --checkpoint runs/article --batch-size 64`
    """
    import json

    from cifar_bp import grads

    flags = flags_of(reduction=reduction, batch_size=batch_size, seed=seed, device=device)
    with user_errors():
        cfg, payload = grads.inspect_config(config, flags, set_ or [], checkpoint)
        losses = grads.loss_names(loss) if loss is not None else [cfg.loss.name]
        result = grads.inspect_grads(cfg, losses, payload, checkpoint, param)
        if json_out:
            for note in result.notes:
                typer.echo(f"note: {note}", err=True)
            typer.echo(json.dumps(result.as_dict(), indent=2))
        else:
            grads.print_inspection(result)
        if logdir is not None:
            where = grads.write_tensorboard(result, logdir)
            typer.echo(f"TensorBoard: tensorboard --logdir {where}", err=json_out)


@app.command()
def losses(
    inputs: str | None = typer.Option(
        None, "--input", help="L1/MSE predictions, e.g. 1,2,3 (tutorial's default)."
    ),
    targets: str | None = typer.Option(None, "--target", help="L1/MSE targets, e.g. 1,2,5."),
    logits: str | None = typer.Option(None, "--logits", help="CE logits, e.g. 0.1,0.2,0.3."),
    label: str | None = typer.Option(None, "--label", help="CE target class index, e.g. 1."),
    json_out: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """The tutorial's loss examples, computed live under reductions none, mean and sum.

    L1 and MSE compare inputs with targets element by element; cross-entropy turns logits
    into probabilities with softmax and takes −log of the true class's probability.

    Examples:

    * `cifar-bp losses` (L1 0.6667, MSE 1.3333, CE 1.1019)
    * `cifar-bp losses --input 1,2,3 --target 1,2,5 --logits 2,1,0.1 --label 0`
    """
    import json

    from cifar_bp import losses as lf

    with user_errors():
        if (inputs is None) != (targets is None):
            raise UsageError("--input and --target go together: give both, or neither")
        z = lf.parse_numbers(logits, "--logits") if logits is not None else None
        examples = lf.worked_examples(
            lf.parse_numbers(inputs, "--input") if inputs is not None else None,
            lf.parse_numbers(targets, "--target") if targets is not None else None,
            z,
            lf.parse_label(label, len(z or lf.TUTORIAL_LOGITS)) if label is not None else None,
        )
        if json_out:
            typer.echo(json.dumps(examples, indent=2))
        else:
            lf.print_examples(examples)


@app.command()
def compare(
    losses: str = typer.Option("ce,mse,l1", "--losses", help="Losses to train, e.g. ce,mse,l1."),
    reductions: str | None = typer.Option(
        None, "--reductions", help="Reductions, e.g. mean,sum [default: the config's]."
    ),
    config: Path | None = ConfigOpt,
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over the training set."),
    seed: int | None = typer.Option(None, "--seed", help="Shared seed: weights and data order."),
    device: str | None = DeviceOpt,
    set_: list[str] | None = SetOpt,
    logdir: str | None = typer.Option(None, "--logdir", help="Where the comparison is written."),
    run_name: str | None = typer.Option(
        None, "--run-name", help="Name of the comparison's directory [default: compare-<time>]."
    ),
    quiet: bool = CompareQuietOpt,
) -> None:
    """Train one run per loss × reduction from the same weights and data order, then compare.

    Each run gets its own sub-directory of one parent, so `tensorboard --logdir <parent>`
    overlays their curves; the final table shows train loss, test accuracy, mean gradient
    norm per layer and wall time per run. Every combination is validated before any trains.

    Example: `cifar-bp compare --config configs/smoke.yaml --losses ce,mse,l1 --reductions mean,sum`
    """
    from cifar_bp.compare import (
        comparison_table,
        make_compare_reporter,
        plan_comparison,
        run_comparison,
    )
    from cifar_bp.distributed import world_from_env
    from cifar_bp.report import console

    flags = flags_of(epochs=epochs, seed=seed, device=device, logdir=logdir, run_name=run_name)
    with user_errors():
        plan = plan_comparison(config, flags, set_ or [], losses, reductions)
        main_rank = world_from_env().is_main
        reporter = make_compare_reporter(quiet or not main_rank)
        try:
            outcomes = run_comparison(plan, reporter)
        finally:
            reporter.close()
        if main_rank:
            console.print(comparison_table(outcomes))
            where = plan.parent
            console.print(f"runs: {where}  (tensorboard --logdir {where})", soft_wrap=True)
        stopped = next((o.result.stopped_by for o in outcomes if o.result.stopped_by), None)
        if stopped:
            from cifar_bp.signals import EXIT_CODES

            raise typer.Exit(EXIT_CODES[stopped])


@app.command()
def bench(
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu or cuda."),
    images: int | None = typer.Option(
        None, "--images", help="Synthetic images per variant [default: 4096 CPU, 16384 CUDA]."
    ),
    repeats: int = typer.Option(5, "--repeats", help="Timed epochs per variant after 1 warm-up."),
    variants: str = typer.Option(
        "a,b,c",
        "--variants",
        help="a tutorial loop, b engine, c fastest; search: nchw,bs256,bs1024,bf16,fp16,compile.",
    ),
    compile_: bool = typer.Option(False, "--compile", help="Add torch.compile to (c)."),
    sync_debug: bool = typer.Option(
        False, "--sync-debug", help="CUDA: count host syncs in the engine's timed steps."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Images/s of the tutorial's loop (a) against this engine (b, c) on synthetic data.

    Each variant runs in its own process: median of the timed epochs, ratio to (a), peak memory.
    """
    from cifar_bp.bench import BenchOptions, print_benchmark, run_benchmark

    opts = BenchOptions(device, images, repeats, variants.split(","), compile_, sync_debug)
    with user_errors():
        print_benchmark(run_benchmark(opts), json_out)


def main() -> None:
    """Entry point: Click's own usage errors already exit 2; ours are mapped in user_errors."""
    try:
        app()
    except UsageError as err:  # raised outside a command body
        if STATE["debug"]:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
