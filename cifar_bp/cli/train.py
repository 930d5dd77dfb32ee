"""`train`, `config show` and `evaluate`: the commands that train and score a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cifar_bp.cli.app import ConfigOpt, DeviceOpt, JsonOpt, SetOpt, app, config_app, with_run_flags

QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress: print only notes, the summary and errors."),
]


@app.command()
@with_run_flags
def train(
    flags: dict[str, Any],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue a run: a checkpoint, a run directory, or 'auto' (newest run).",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Resume even where the config, the data or the run folder do not match.",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the reference CNN: forward, loss, backward, optimizer step; logs to TensorBoard.

    Examples:

    * `cifar-bp train --config configs/smoke.yaml --loss mse`
    * `cifar-bp train --config configs/article.yaml --run-name article`
    * `cifar-bp train --set optim.name=adam --set optim.lr=3e-3 --set train.ema_decay=0.999`
    * `cifar-bp train --resume runs/article` (after Ctrl-C: picks up at the same step)
    """
    from cifar_bp.distributed import shutdown, world_from_env
    from cifar_bp.report import make_reporter, print_run_summary
    from cifar_bp.resume import prepare_resume
    from cifar_bp.signals import EXIT_CODES
    from cifar_bp.trainer import train as run_training

    start = prepare_resume(resume, config, flags, set_ or [], force)
    reporter = make_reporter(quiet, main=world_from_env().is_main)
    for note in start.notes:
        reporter.note(note)
    try:
        result = run_training(start.cfg, reporter, start, force)
    finally:
        reporter.close()
        shutdown(world_from_env())  # under torchrun: gloo's threads must not outlive it
    if world_from_env().is_main:
        print_run_summary(result, quiet)
    if result.stopped_by:
        raise typer.Exit(EXIT_CODES[result.stopped_by])


@config_app.command("show")
@with_run_flags
def config_show(
    flags: dict[str, Any],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_given: Annotated[
        bool,
        typer.Option("--as-given", help="Keep 'auto' values instead of resolving them."),
    ] = False,
) -> None:
    """Print the fully resolved config (file, then flags, then --set) as YAML.

    `auto` settings (device, precision, compile) are shown as this machine resolves them,
    with the reason as a comment at the top; `--as-given` keeps them as written.

    Examples:

    * `cifar-bp config show` (what `cifar-bp train` would run here)
    * `cifar-bp config show -c configs/quick.yaml --loss mse --set optim.lr=0.01`
    """
    from cifar_bp.config import resolve_config
    from cifar_bp.hardware import resolve_auto

    cfg = resolve_config(config, flags, set_ or [])
    if not as_given:
        cfg, lines = resolve_auto(cfg)
        typer.echo("".join(f"# {line}\n" for line in lines), nl=False)
    typer.echo(cfg.to_yaml(), nl=False)


@app.command()
def evaluate(
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", help="A last.pt/best.pt or a run directory.")
    ],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Take the data section from this file.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="data.*, train.eval_flip/eval_shift overrides, e.g. data.root=/x"
        ),
    ] = None,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Score a checkpoint: test loss, accuracy, per-class accuracy and the confusion matrix.

    By default on the data it was trained with, and with the run's test-time views
    (train.eval_flip: the mirror too; train.eval_shift: copies moved that many pixels), so
    the figures match its logs. --config/--set choose other data or views, e.g. --set
    train.eval_shift=0; the model always comes from the checkpoint. The first line says
    which weights and how many views were scored.

    Examples:

    * `cifar-bp evaluate --checkpoint runs/article` (its last.pt)
    * `cifar-bp evaluate --checkpoint runs/article/best.pt --set train.eval_shift=0 --json`
    * `cifar-bp evaluate --checkpoint runs/article --set data.source=folder --set
      data.root=~/my-photos` (a folder of class sub-folders)
    """
    from cifar_bp.evaluation import evaluate_checkpoint
    from cifar_bp.report import print_evaluation

    outcome = evaluate_checkpoint(checkpoint, config, set_ or [], device)
    print_evaluation(outcome, json_out)
