"""`losses`, `inspect-grads` and `compare`: the learner's commands, where backprop is seen."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from cifar_bp.cli.app import ConfigOpt, DeviceOpt, EpochsOpt, JsonOpt, SetOpt, app, flags_of
from cifar_bp.errors import CliError, UsageError


@app.command("inspect-grads")
def inspect_grads(
    config: ConfigOpt = None,
    loss: Annotated[
        str | None,
        typer.Option("--loss", help="ce, mse, l1, or all (each on the same batch and weights)."),
    ] = None,
    reduction: Annotated[
        str | None,
        typer.Option(
            "--reduction", help="mean, sum, or none (backward then needs a gradient tensor)."
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="Images in the batch: 64, as the tutorial trains; 1 reproduces the seed's "
            "backprop demo (DataLoader(batch_size=1)).",
        ),
    ] = 64,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Inspect a trained model (last.pt or run directory)."),
    ] = None,
    param: Annotated[
        str | None,
        typer.Option("--param", help="Also print part of this gradient, e.g. model1.conv1.weight."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed for the fresh weights and batch.")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Also check autograd against finite differences on every parameter (float64).",
        ),
    ] = False,
    device: DeviceOpt = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    logdir: Annotated[
        Path | None,
        typer.Option(
            "--logdir", help="Also write the gradients to TensorBoard under this directory."
        ),
    ] = None,
) -> None:
    """Stop where the tutorial's debugger stops: just before and just after loss.backward().

    Uses the config's loss, and names in its header every setting that makes it differ
    from the plain torch.nn loss (label smoothing, class weights, ignore_index, input).
    Shows every parameter's .grad (None) before backward, the batch's loss, then per
    parameter the gradient's norm, ‖g‖/‖w‖, share of zeros, mean, std and max |g|;
    ∂L/∂logits of the first images (where backward starts); and checks that reduction sum
    gives exactly N (CE) or N·C (MSE, L1) times the mean's gradients. --check compares
    autograd with central finite differences on sampled weights of every parameter, and
    exits 1 if any relative error reaches 1e-3.

    Examples:

    * `cifar-bp inspect-grads --loss all` (CE, MSE and L1 side by side)
    * `cifar-bp inspect-grads --check` (backprop verified, parameter by parameter)
    * `cifar-bp inspect-grads --batch-size 1 --reduction none --param model1.conv1.weight`
    * `cifar-bp inspect-grads --checkpoint runs/article`
    """
    from cifar_bp import grads, grads_log, grads_view

    flags = flags_of(reduction=reduction, batch_size=batch_size, seed=seed, device=device)
    cfg, payload = grads.inspect_config(config, flags, set_ or [], checkpoint)
    losses = grads.loss_names(loss) if loss is not None else [cfg.loss.name]
    # a --logdir that cannot be created is found before the work, not after it
    with grads_log.tensorboard_dir(logdir) as where:
        result = grads.inspect_grads(cfg, losses, payload, checkpoint, param, check)
        if json_out:
            for note in result.notes:
                typer.echo(f"note: {note}", err=True)
            echo_json(result.as_dict())
        else:
            grads_view.print_inspection(result)
        if where is not None:
            grads_log.write_tensorboard(result, where)
            command = f"tensorboard --logdir {shlex.quote(str(where))}"
            typer.echo(f"TensorBoard: {command}", err=json_out)
    failed = [c for c in result.checks or [] if not c.agrees]
    if failed:
        raise CliError(
            f"gradient check failed for {failed[0].loss}: relative error "
            f"{failed[0].max_rel_error:.1e} ≥ {failed[0].tolerance:g}"
        )


@app.command()
def losses(
    inputs: Annotated[
        str | None,
        typer.Option("--input", help="L1/MSE predictions, e.g. 1,2,3 (tutorial's default)."),
    ] = None,
    targets: Annotated[
        str | None, typer.Option("--target", help="L1/MSE targets, e.g. 1,2,5.")
    ] = None,
    logits: Annotated[
        str | None, typer.Option("--logits", help="CE logits, e.g. 0.1,0.2,0.3.")
    ] = None,
    label: Annotated[
        str | None, typer.Option("--label", help="CE target class index, e.g. 1.")
    ] = None,
    sweep: Annotated[
        bool,
        typer.Option("--sweep", help="Instead: L1 and MSE loss and gradient as the error grows."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """The tutorial's loss examples: the plain torch.nn losses under reductions none, mean
    and sum, and the gradient each one sends back.

    L1 and MSE compare inputs with targets element by element; cross-entropy turns logits
    into probabilities with softmax and takes −log of the true class's probability. The
    gradient ∂loss/∂input (CE: ∂loss/∂logits) comes from autograd, printed beside its closed
    form: L1 sign(x − y)/N, MSE 2(x − y)/N, CE softmax − one-hot (/N under mean). In --json,
    numbers too large for a float read "inf" (strings: JSON has no infinity).

    Examples:

    * `cifar-bp losses` (L1 0.6667, MSE 1.3333, CE 1.1019)
    * `cifar-bp losses --input 1,2,3 --target 1,2,5 --logits 2,1,0.1 --label 0`
    * `cifar-bp losses --sweep` (L1's gradient stays ±1, MSE's shrinks with the error)
    """
    from cifar_bp import lessons

    if sweep:
        if any(v is not None for v in (inputs, targets, logits, label)):
            raise UsageError(
                "--sweep uses its own errors: drop --input, --target, --logits, --label"
            )
        rows = lessons.sweep()
        if json_out:
            echo_json({"sweep": rows})
        else:
            lessons.print_sweep(rows)
        return
    if (inputs is None) != (targets is None):
        raise UsageError("--input and --target go together: give both, or neither")
    # worked_examples checks the label against the logits, the tutorial's default included
    examples = lessons.worked_examples(
        lessons.parse_numbers(inputs, "--input") if inputs is not None else None,
        lessons.parse_numbers(targets, "--target") if targets is not None else None,
        lessons.parse_numbers(logits, "--logits") if logits is not None else None,
        lessons.parse_label(label) if label is not None else None,
    )
    if json_out:
        echo_json(examples)
    else:
        lessons.print_examples(examples)


def echo_json(data: Any) -> None:
    """Strict JSON on stdout: non-finite numbers become strings, never `Infinity`/`NaN`."""
    import json

    from cifar_bp.lessons import strict

    typer.echo(json.dumps(strict(data), indent=2, allow_nan=False))


@app.command()
def compare(
    losses: Annotated[
        str, typer.Option("--losses", help="Losses to train, e.g. ce,mse,l1.")
    ] = "ce,mse,l1",
    reductions: Annotated[
        str | None,
        typer.Option("--reductions", help="Reductions, e.g. mean,sum [default: the config's]."),
    ] = None,
    config: ConfigOpt = None,
    epochs: EpochsOpt = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Shared seed: weights and data order.")
    ] = None,
    device: DeviceOpt = None,
    set_: SetOpt = None,
    logdir: Annotated[
        str | None, typer.Option("--logdir", help="Where the comparison is written.")
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(
            "--run-name", help="Name of the comparison's directory [default: compare-DATE-TIME]."
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the table and errors.")
    ] = False,
) -> None:
    """Train one run per loss × reduction from the same weights and data order, then compare.

    Each run gets its own sub-directory of one parent, so `tensorboard --logdir <parent>`
    overlays their curves; the final table names the optimizer and shows per run its status
    (a run that diverges becomes "diverged at step N" and the others still train), train loss
    per image (so mean and sum compare), test accuracy, wall time and mean gradient norm per
    layer. Every combination is validated before any trains.

    Examples:

    * `cifar-bp compare --config configs/smoke.yaml --losses ce,mse,l1 --reductions mean,sum`
    * `cifar-bp compare -c configs/smoke.yaml --losses ce --reductions mean,sum --set
      optim.name=sgd --set optim.lr=0.01` (SGD: sum takes N-times larger steps)
    """
    from cifar_bp.compare import (
        comparison_notes,
        comparison_tables,
        make_compare_reporter,
        plan_comparison,
        run_comparison,
    )
    from cifar_bp.distributed import shutdown, world_from_env
    from cifar_bp.report import console
    from cifar_bp.signals import EXIT_CODES

    flags = flags_of(epochs=epochs, seed=seed, device=device, logdir=logdir, run_name=run_name)
    plan = plan_comparison(config, flags, set_ or [], losses, reductions)
    main_rank = world_from_env().is_main
    reporter = make_compare_reporter(quiet or not main_rank)
    try:
        outcomes = run_comparison(plan, reporter)
    finally:
        reporter.close()
        shutdown(world_from_env())  # under torchrun: gloo's threads must not outlive it
    if main_rank:
        for part in comparison_tables(outcomes, console.width):
            console.print(part)
        for note in comparison_notes(outcomes):
            console.print(note, markup=False, soft_wrap=True)
        where = plan.parent
        command = f"tensorboard --logdir {shlex.quote(str(where))}"
        console.print(f"runs: {where}  ({command})", soft_wrap=True)
    stopped = next(
        (o.result.stopped_by for o in outcomes if o.result and o.result.stopped_by), None
    )
    if stopped:
        raise typer.Exit(EXIT_CODES[stopped])
