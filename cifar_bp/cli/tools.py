"""The practitioner's tools: `bench`, `predict`, `export` and `lr-find`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cifar_bp.cli.app import (
    BatchOpt,
    ConfigOpt,
    DeviceOpt,
    JsonOpt,
    LogdirOpt,
    SeedOpt,
    SetOpt,
    app,
    flags_of,
)


@app.command()
def bench(
    device: Annotated[
        str, typer.Option("--device", help="auto (CUDA if present), cpu or cuda.")
    ] = "auto",
    images: Annotated[
        int | None,
        typer.Option(
            "--images", help="Synthetic images per variant [default: 4096 CPU, 16384 CUDA]."
        ),
    ] = None,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Timed epochs per variant after 1 warm-up.")
    ] = 5,
    variants: Annotated[
        str,
        typer.Option(
            "--variants",
            help=(
                "a tutorial loop, b engine, c fastest, d default train; search: nchw, bf16, "
                "fp16, compile; KEY@N runs a variant at batch N (e.g. b@256)."
            ),
        ),
    ] = "a,b,c,d",
    compile_: Annotated[bool, typer.Option("--compile", help="Add torch.compile to (c).")] = False,
    sync_debug: Annotated[
        bool,
        typer.Option(
            "--sync-debug",
            help="CUDA: count the host syncs in 20 untimed steps after the timed epochs, "
            "each watched from the loader's batch to the end of train_step.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Images/s of the tutorial's loop (a) against this engine (b, c) on synthetic data.

    Each variant runs in its own process: median of the timed epochs, ratio to (a), peak memory.
    The machine's matmul peak is measured in the same run, beside each variant's GFLOP/s.

    Examples:

    * `cifar-bp bench --device cpu --variants a,b,d --images 4096 --repeats 3`
    * `cifar-bp bench --variants d,d@64,d@512` (the default at other batch sizes)
    """
    from cifar_bp.benchmark import BenchOptions, print_benchmark, run_benchmark

    opts = BenchOptions(device, images, repeats, variants.split(","), compile_, sync_debug)
    print_benchmark(run_benchmark(opts), json_out)


CheckpointOpt = Annotated[
    Path, typer.Option("--checkpoint", help="A run directory (its last.pt) or a .pt file.")
]


@app.command()
def predict(
    images: Annotated[
        list[str], typer.Argument(help="Image files, folders or glob patterns.", show_default=False)
    ],
    checkpoint: CheckpointOpt,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to show per image.")] = 3,
    single_view: Annotated[
        bool,
        typer.Option(
            "--single-view",
            help="Score each image only as given, without the run's test-time views (the "
            "exported ONNX model's answer).",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Classify your own pictures: the top-k classes of each, with probabilities.

    Any size and mode: converted to RGB and resized to 32×32 (noted when it was), then
    normalised and scored as the run's evaluation scored: with its weight average where it
    kept one, and the logits of its test-time views averaged (the first line says which).
    Exit 1 when some file could not be classified.

    Example: `cifar-bp predict cat.jpg photos/ "shots/*.png" --checkpoint runs/article`
    """
    from cifar_bp.predict import predict as classify
    from cifar_bp.predict import print_predictions

    if not print_predictions(*classify(images, checkpoint, top_k, single_view), json_out):
        raise typer.Exit(1)


@app.command()
def export(
    checkpoint: CheckpointOpt,
    # Text, not a Path: a Path would drop the trailing slash that says "a folder".
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="File, or folder (an existing one, or one ending in /) to write model.onnx "
            "in [default: model.onnx in the run].",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Export the network to ONNX: pixels in [0, 1] in, logits out, any batch size.

    The run's normalisation is inside the graph and the weight average is used where the
    run kept one. The file is checked against torch with onnxruntime before it is kept.
    It scores each image as given: `cifar-bp predict --single-view` gives its answers.
    Needs the extra: `pip install 'cifar-bp[onnx]'`.

    Example: `cifar-bp export --checkpoint runs/article -o cifar10.onnx`
    """
    from cifar_bp.export import export_checkpoint, print_export

    print_export(export_checkpoint(checkpoint, output), json_out)


@app.command("lr-find")
def lr_find(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    start_lr: Annotated[float, typer.Option("--start-lr", help="First lr of the sweep.")] = 1e-6,
    end_lr: Annotated[float, typer.Option("--end-lr", help="Last lr of the sweep.")] = 1.0,
    steps: Annotated[
        int, typer.Option("--steps", help="Batches in the sweep (one lr each), at most 10000.")
    ] = 100,
    device: DeviceOpt = None,
    batch_size: BatchOpt = None,
    seed: SeedOpt = None,
    logdir: LogdirOpt = None,
    run_name: Annotated[
        str | None,
        typer.Option("--run-name", help="Folder name under --logdir [default: lr-find-DATE-TIME]."),
    ] = None,
    json_out: JsonOpt = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress: print only the results.")
    ] = False,
) -> None:
    """LR range test: sweep the lr exponentially from the config's starting weights.

    One batch per lr value, stopped once the smoothed loss exceeds 4× its best (or is not
    finite); prints a table and the lr where the smoothed loss falls fastest. Writes
    TensorBoard scalars lr_find/loss and lr_find/lr to a new folder, never an existing run.
    Ctrl-C or SIGTERM stops it after the current step and still writes what it measured
    (exit 130 or 143, as train does).

    Example: `cifar-bp lr-find -c configs/article.yaml --steps 100`
    """
    from cifar_bp.config import resolve_config
    from cifar_bp.lrfind import SweepOptions, print_sweep, run_sweep
    from cifar_bp.report import make_reporter
    from cifar_bp.signals import EXIT_CODES

    flags = flags_of(device=device, batch_size=batch_size, seed=seed, logdir=logdir,
                     run_name=run_name)  # fmt: skip
    cfg = resolve_config(config, flags, set_ or [])  # validates --run-name like train does
    options = SweepOptions(start_lr, end_lr, steps, run_name)
    options.check()  # before a progress bar starts: a mistake is one line on a clean screen
    reporter = make_reporter(quiet or json_out, prefix="lr-find: ")  # --json: stdout is JSON
    try:
        sweep = run_sweep(cfg, options, reporter)
    finally:
        reporter.close()
    print_sweep(sweep, json_out)
    if sweep.interrupted_by:
        raise typer.Exit(EXIT_CODES[sweep.interrupted_by])
