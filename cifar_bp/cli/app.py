"""The Typer application, its shared options, and the one place errors become exit codes.

Exit codes: 0 success; 1 a runtime failure (missing data, a diverged run, a full disk);
2 a mistake the user can fix in the command or the config; 130/143 stopped by
Ctrl-C/SIGTERM after saving a checkpoint. torch is imported inside the commands, so
`cifar-bp --help` answers instantly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from cifar_bp.errors import CliError

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import NoArgsIsHelpError
    from click.exceptions import UsageError as ClickUsageError

DEBUG_ENV = "CIFAR_BP_DEBUG"


def report_error(err: CliError) -> int:
    """Print one line on stderr and return the exit code; under torchrun, name the rank."""
    rank = os.environ.get("RANK")
    who = f"rank {rank}: " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    typer.echo(f"error: {who}{err}", err=True)
    return err.exit_code


def usage_line(err: ClickUsageError) -> str:
    """Click's own usage errors (unknown option, bad value, missing argument) as one line that
    says where help is, instead of a usage line, a hint and a boxed panel."""
    ctx = getattr(err, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {err.format_message()}{where}"


def safe_streams() -> None:
    """An ASCII-only or non-UTF-8 terminal gets '?' for characters it cannot show (‖, −, ×),
    never a UnicodeEncodeError in the middle of a run."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a detached or closed stream
                reconfigure(errors="replace")


def _bare_flag(option: Any) -> Any:
    """A flag (--help, --json, --amp/--no-amp, ...) takes no value, so its help row shows no
    `<bool>` type: one place for every command, not a `metavar` on each flag."""
    if option is not None:
        option.metavar = ""
    return option


def _bare_flags(command: Any) -> None:
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False):
            _bare_flag(param)


class ErrorMappingGroup(TyperGroup):
    """Every command runs inside this: a `CliError` is one line and its exit code, Ctrl-C
    outside training is 'aborted' and 130, and `--debug` shows the traceback instead."""

    def get_help_option(self, ctx: Any) -> Any:
        _bare_flags(self)
        return _bare_flag(super().get_help_option(ctx))

    def get_command(self, ctx: Any, name: str) -> Any:
        command = super().get_command(ctx, name)
        if command is not None and not getattr(command, "_bare_help", False):
            _bare_flags(command)
            plain = command.get_help_option
            command.get_help_option = lambda c: _bare_flag(plain(c))
            command._bare_help = True
        return command

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:  # the root's own options: `cifar-bp --bogus`
            return super().make_context(*args, **kwargs)
        except ClickUsageError as err:
            if isinstance(err, NoArgsIsHelpError):
                raise
            typer.echo(usage_line(err), err=True)
            raise typer.Exit(err.exit_code) from None

    def invoke(self, ctx: Any) -> Any:
        safe_streams()
        try:
            return super().invoke(ctx)
        except ClickUsageError as err:  # a command's options, or an unknown command
            if isinstance(err, NoArgsIsHelpError):
                raise
            typer.echo(usage_line(err), err=True)
            raise typer.Exit(err.exit_code) from None
        except CliError as err:
            if os.environ.get(DEBUG_ENV):
                raise
            raise typer.Exit(report_error(err)) from None
        except KeyboardInterrupt:
            typer.echo("aborted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    name="cifar-bp",
    cls=ErrorMappingGroup,
    help=(
        "Train the tutorial's small CNN on CIFAR-10 and make backpropagation visible.\n\n"
        "Start with `cifar-bp train --config configs/smoke.yaml` (synthetic data, seconds on "
        "a CPU), then `tensorboard --logdir runs`. Settings come from a YAML config "
        "(configs/default.yaml unless --config is given), then named flags, then --set.\n\n"
        "Exit codes: 0 done, 1 runtime failure, 2 a mistake in the command or config, "
        "130/143 stopped by Ctrl-C/SIGTERM (checkpoint saved)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
config_app = typer.Typer(
    cls=ErrorMappingGroup, help="Inspect the resolved configuration.", no_args_is_help=True
)
app.add_typer(config_app, name="config")


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks for errors.")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


# --- Options shared by several commands: declared once here -------------------------------
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", dir_okay=False, help="YAML config file (default: configs/default.yaml)."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override any key, e.g. --set optim.lr=0.05 (repeatable; value is YAML)."
    ),
]
LossOpt = Annotated[str | None, typer.Option("--loss", help="Loss: ce (cross-entropy), mse or l1.")]
ReductionOpt = Annotated[
    str | None, typer.Option("--reduction", help="How per-element losses combine: mean or sum.")
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto (CUDA if present), cpu, cuda or cuda:N.")
]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", help="Passes over the training set.")]
BatchOpt = Annotated[
    int | None, typer.Option("--batch-size", help="Images per step (per process).")
]
LrOpt = Annotated[float | None, typer.Option("--lr", help="(Peak) learning rate.")]
AmpOpt = Annotated[
    bool | None,
    typer.Option(
        "--amp/--no-amp",
        help="Force mixed precision on or off [default: auto, bf16 where the hardware has it].",
    ),
]  # fmt: skip
RunNameOpt = Annotated[
    str | None, typer.Option("--run-name", help="Run directory name under --logdir.")
]
LogdirOpt = Annotated[
    str | None, typer.Option("--logdir", help="Where runs are written (default runs).")
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Seed for weights, data order and augmentation.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON.")]


# The flags that set config keys (config.FLAG_KEYS), declared once: `train` and `config show`
# both take exactly these, through `with_run_flags`.
RUN_FLAGS: dict[str, Any] = {
    "loss": LossOpt, "reduction": ReductionOpt, "device": DeviceOpt, "epochs": EpochsOpt,
    "batch_size": BatchOpt, "lr": LrOpt, "amp": AmpOpt, "run_name": RunNameOpt,
    "logdir": LogdirOpt, "seed": SeedOpt,
}  # fmt: skip


def with_run_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command` the RUN_FLAGS options after its `--config`; it receives the ones the
    user gave as one dict, `flags`."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
        for name, kind in RUN_FLAGS.items()
    ]
    kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name != "flags"]
    at = 1 if kept and kept[0].name == "config" else 0  # right after --config in --help

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        flags = flags_of(**{name: kwargs.pop(name) for name in RUN_FLAGS})
        return command(flags=flags, **kwargs)

    params = [*kept[:at], *added, *kept[at:]]
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def flags_of(**named: Any) -> dict[str, Any]:
    """The named flags the user gave (None means not given), keyed as config.FLAG_KEYS."""
    return {key: value for key, value in named.items() if value is not None}


def main() -> None:
    """Entry point. Click's own usage errors already exit 2; ours are mapped by the group."""
    app()
