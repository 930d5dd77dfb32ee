"""`cifar-bp export`: the trained network as an ONNX file that runs without this package.

The graph takes float32 N×3×32×32 RGB pixels in [0, 1] and does the run's normalisation
itself, so a deployment only has to scale its pixels; the batch dimension is dynamic.
The file is checked against torch with onnxruntime before it takes its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_bp.cifar10 import CHANNELS, SIDE
from cifar_bp.errors import CliError, first_line
from cifar_bp.predict import Trained, load_trained

TOLERANCE = 1e-4  # max abs difference of the logits, onnxruntime against torch
CHECK_BATCHES = (16, 3)  # two sizes: proves the batch dimension is really dynamic
INSTALL_HINT = "pip install 'cifar-bp[onnx]'"
FILE_NAME = "model.onnx"


class Normalized(nn.Module):
    """The network behind its input normalisation: [0, 1] pixels in, logits out."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, CHANNELS, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, CHANNELS, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.mean) / self.std)


@dataclass
class Exported:
    path: Path
    max_diff: float
    batches: tuple[int, ...]
    exporter: str
    averaged: bool
    runtime: str
    outputs: int  # the network's logits per image; a folder run may name fewer classes
    classes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "max_abs_diff": self.max_diff, "tolerance": TOLERANCE,
            "batches": list(self.batches), "exporter": self.exporter,
            "weight_average": self.averaged, "onnxruntime": self.runtime,
            "outputs": self.outputs, "classes": self.classes,
        }  # fmt: skip


def require_onnx() -> None:
    """One clear line, not an ImportError, when the optional extra is not installed."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CliError(f"export needs {' and '.join(missing)}: {INSTALL_HINT}")


def default_output(checkpoint: Path) -> Path:
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return run_dir / FILE_NAME


def output_path(checkpoint: Path, output: str | Path | None) -> tuple[Path, bool]:
    """Where the file goes, and whether its folder must be made: an existing directory or
    a name ending in a slash (give it as a str: `Path` drops the slash) is a folder."""
    if output is None:
        return default_output(checkpoint), False
    text = os.fspath(output)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        folder = Path(text)
        return folder / FILE_NAME, not folder.is_dir()
    return Path(text), False


def export_checkpoint(checkpoint: Path, output: str | Path | None = None) -> Exported:
    """Export, verify with onnxruntime, and only then move the file to its name."""
    require_onnx()
    trained = load_trained(checkpoint)
    out, make_folder = output_path(checkpoint, output)
    if make_folder:
        try:
            out.parent.mkdir(parents=True)
        except OSError as err:
            raise CliError(f"cannot make {out.parent}: {err.strerror or err}") from None
    if not out.parent.is_dir():
        raise CliError(f"cannot write {out}: {out.parent} is not a directory")
    wrapped = Normalized(trained.model, trained.mean, trained.std).eval()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        exporter = write_onnx(wrapped, tmp)
        add_metadata(tmp, trained)
        max_diff, runtime, outputs = check_against_torch(wrapped, tmp)
        if not max_diff <= TOLERANCE:
            raise CliError(
                f"onnxruntime and torch disagree: max abs logit difference {max_diff:.2e} > "
                f"{TOLERANCE:.0e}; nothing written"
            )
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if make_folder and not out.exists():
            with contextlib.suppress(OSError):
                out.parent.rmdir()  # made for this file alone
    averaged = trained.scoring.averaged
    return Exported(out, max_diff, CHECK_BATCHES, exporter, averaged, runtime, outputs,
                    trained.classes)  # fmt: skip


def write_onnx(model: nn.Module, path: Path) -> str:
    """The TorchScript exporter first (fast, no onnxscript needed); the dynamo exporter
    where a newer torch has removed it. Returns which one wrote the file."""
    example = torch.rand(2, CHANNELS, SIDE, SIDE)
    names = {"input_names": ["pixels"], "output_names": ["logits"]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice, on every call
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=17,
                dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, **names,
            )  # fmt: skip
        return "torchscript"
    except Exception as legacy_err:
        try:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, verbose=False,
                dynamic_shapes={"pixels": {0: batch}}, **names,
            )  # fmt: skip
            return "dynamo"
        except Exception as err:
            raise CliError(
                f"ONNX export failed: {first_line(legacy_err)}; dynamo exporter: {first_line(err)}"
            ) from None


def add_metadata(path: Path, trained: Trained) -> None:
    """Class names and input statistics travel inside the file, for whoever deploys it."""
    import onnx

    model = onnx.load(str(path))
    meta = {
        # Logit i is classes[i]; a run with fewer classes than outputs left the rest untrained.
        "classes": json.dumps(trained.classes),
        "input": "float32 Nx3x32x32 RGB in [0, 1]; normalisation is inside the graph",
        "mean": json.dumps(list(trained.mean)),
        "std": json.dumps(list(trained.std)),
        "weights": "weight average" if trained.scoring.averaged else "final weights",
    }
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@torch.no_grad()
def check_against_torch(model: nn.Module, path: Path) -> tuple[float, str, int]:
    """Max abs logit difference over seeded random batches of each CHECK_BATCHES size, the
    onnxruntime version, and the network's output width (which the file must match)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    diffs = []
    for n in CHECK_BATCHES:
        pixels = torch.rand(n, CHANNELS, SIDE, SIDE, generator=gen)
        (logits,) = session.run(["logits"], {"pixels": pixels.numpy()})
        expected = model(pixels)
        if logits.shape != tuple(expected.shape):
            raise CliError(
                f"the ONNX model returned shape {logits.shape} for a batch of {n}; the "
                f"network returns {tuple(expected.shape)}"
            )
        diffs.append((torch.from_numpy(logits) - expected).abs().max())
    # A NaN stays visible in the max.
    return torch.stack(diffs).max().item(), onnxruntime.__version__, expected.shape[1]


def print_export(result: Exported, json_out: bool) -> None:
    import typer

    if json_out:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    weights = "weight average" if result.averaged else "final weights"
    sizes = " and ".join(str(n) for n in result.batches)
    typer.echo(f"exported the {weights} ({result.exporter} exporter)")
    typer.echo("  input  'pixels' float32 N×3×32×32, RGB in [0, 1] (normalised in the graph)")
    typer.echo(f"  output 'logits' float32 N×{result.outputs}{_named(result)}")
    typer.echo(f"checked with onnxruntime {result.runtime} on batches of {sizes}:")
    typer.echo(
        f"  max abs logit difference {result.max_diff:.1e} against torch "
        f"(tolerance {TOLERANCE:.0e})"
    )
    typer.echo(str(result.path))


def _named(result: Exported) -> str:
    """Which logits carry a class name, when the run named fewer classes than outputs."""
    named = len(result.classes)
    if named >= result.outputs:
        return ""
    return f" (the first {named} are the run's classes: {', '.join(result.classes)})"
