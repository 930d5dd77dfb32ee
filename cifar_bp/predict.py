"""`cifar-bp predict`: classify your own pictures with a trained run.

Each image is read with PIL, converted to RGB and resized to 32×32 the way the tutorial's
course does (torchvision's `Resize((32, 32))`: bilinear with antialiasing, aspect ratio
not kept), then normalised with the checkpoint's own statistics, and scored as the run's
evaluation scored its images: the weight average where it kept one, and the logits of its
test-time views (train.eval_flip, train.eval_shift) averaged, so that a folder of the
run's test images gets the accuracy `evaluate` reports.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_bp.cifar10 import SIDE
from cifar_bp.engine import Scoring
from cifar_bp.errors import CliError, UsageError

# What a folder or glob contributes; any file named on its own is tried whatever its name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BATCH = 256  # images per forward pass: bounds memory for a folder of thousands


@dataclass
class Trained:
    """What a checkpoint offers for inference: the net, its input statistics, its classes."""

    model: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: list[str]
    scoring: Scoring  # the weight average where the run kept one; the run's test-time views


def load_trained(path: Path) -> Trained:
    """The checkpoint's network in eval mode on the CPU, preferring the weight average.

    The one place that knows the checkpoint's layout (predict and export both use it); its
    config is checked where every command reads it (checkpoint.run_config).
    """
    from cifar_bp.checkpoint import (
        facts_of,
        load_checkpoint,
        load_model_state,
        run_config,
        weights_of,
    )
    from cifar_bp.cifar10 import CLASSES
    from cifar_bp.model import build_model

    payload = load_checkpoint(path)
    cfg = run_config(payload, path)
    # channels_last is a training-speed choice; inference here is CPU, one layout is simpler.
    model = build_model(cfg.model.model_copy(update={"channels_last": False}), "cpu")
    load_model_state(model, weights_of(payload), path)
    data = cfg.data
    mean, std = (data.mean, data.std) if data.normalize else ((0.0,) * 3, (1.0,) * 3)
    facts = facts_of(payload)
    classes = list(facts.classes or CLASSES)
    scoring = Scoring(facts.averaged, cfg.train.eval_flip, cfg.train.eval_shift)
    return Trained(model.eval(), tuple(mean), tuple(std), classes, scoring)


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        top = [{"class": name, "prob": prob} for name, prob in self.top]
        return {"path": self.path, "top": top, "notes": self.notes}


def expand_paths(specs: list[str]) -> list[Prediction | Path]:
    """Files as given; folders and glob patterns become their images, sorted.

    An argument that yields nothing becomes an error entry, so it is reported in order; a
    file named twice (say by a folder and a glob) is classified once.
    """
    found: list[Prediction | Path] = []
    for given in specs:
        spec = os.path.expanduser(given)  # a quoted "~/pics/*.jpg" reaches us unexpanded
        path = Path(spec)
        if path.is_file():
            found.append(path)
            continue
        if path.is_dir():
            matches = _images_in(path)
        elif glob.has_magic(spec):
            matches = sorted(
                {img for hit in glob.glob(spec) for img in _images_in(Path(hit))}, key=str
            )
        else:
            found.append(Prediction(spec, error="no such file or directory"))
            continue
        found.extend(matches or [Prediction(spec, error="matched no images")])
    if all(isinstance(item, Prediction) for item in found):
        raise UsageError(f"no image found in {', '.join(specs)}")
    unique, seen = [], set()
    for item in found:
        if isinstance(item, Path):
            if item.resolve() in seen:
                continue
            seen.add(item.resolve())
        unique.append(item)
    return unique


def _images_in(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix.lower() in IMAGE_SUFFIXES else []
    if path.is_dir():
        return sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
    return []


def read_image(path: Path) -> tuple[torch.Tensor, list[str]]:
    """uint8 3×32×32 RGB, and what had to be done to get there."""
    from PIL import Image, UnidentifiedImageError

    from cifar_bp.folder import eight_bit

    try:
        with Image.open(path) as img:
            img.load()
            notes = [] if img.mode == "RGB" else [f"converted {img.mode} to RGB"]
            rgb = eight_bit(img).convert("RGB")
    except UnidentifiedImageError:
        raise CliError(f"{path}: not an image PIL can read") from None
    except OSError as err:
        raise CliError(f"{path}: cannot read it: {err.strerror or err}") from None
    except Exception as err:  # a damaged file can raise almost anything inside PIL
        raise CliError(f"{path}: cannot decode it: {err}") from None
    if rgb.size != (SIDE, SIDE):
        w, h = rgb.size
        notes.append(f"resized {w}×{h} to {SIDE}×{SIDE}")
        rgb = rgb.resize((SIDE, SIDE), Image.Resampling.BILINEAR)  # = torchvision Resize
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return pixels.view(SIDE, SIDE, 3).permute(2, 0, 1).contiguous(), notes


def preprocess(images: torch.Tensor, trained: Trained) -> torch.Tensor:
    """uint8 N×3×32×32 → the float input the network was trained on."""
    mean = torch.tensor(trained.mean).view(1, 3, 1, 1)
    std = torch.tensor(trained.std).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def probabilities(trained: Trained, images: torch.Tensor) -> torch.Tensor:
    """Softmax over the run's named classes for uint8 N×3×32×32, in float32, a batch at a
    time. A run with fewer classes than the net has outputs never trained the rest, so they
    take no share of the probability."""
    from cifar_bp.engine import view_logits

    t, views, named = trained, (trained.scoring.flip, trained.scoring.shift), len(trained.classes)
    batches = (preprocess(images[i : i + BATCH], t) for i in range(0, len(images), BATCH))
    logits = (view_logits(t.model, x, *views)[:, :named] for x in batches)
    return torch.cat([torch.softmax(chunk, dim=1) for chunk in logits])


def predict(
    specs: list[str], checkpoint: Path, top_k: int, single_view: bool = False
) -> tuple[Trained, list[Prediction]]:
    """One entry per file, in order: its top-k classes, or why it could not be read; and
    the network that answered (`single_view`: the image as given, as the ONNX export does)."""
    trained = load_trained(checkpoint)
    if single_view:
        trained.scoring = replace(trained.scoring, flip=False, shift=0)
    n = len(trained.classes)
    if not 1 <= top_k <= n:
        raise UsageError(f"--top-k must be between 1 and {n} (the run's classes), got {top_k}")
    entries = expand_paths(specs)
    results: list[Prediction] = []
    readable: list[tuple[Prediction, torch.Tensor]] = []
    for entry in entries:
        if isinstance(entry, Prediction):
            results.append(entry)
            continue
        pred = Prediction(str(entry))
        try:
            image, pred.notes = read_image(entry)
            readable.append((pred, image))
        except CliError as err:
            pred.error = str(err).removeprefix(f"{entry}: ")
        results.append(pred)
    if readable:
        probs = probabilities(trained, torch.stack([image for _, image in readable]))
        values, index = probs.topk(top_k, dim=1)
        for (pred, _), vals, idx in zip(readable, values.tolist(), index.tolist(), strict=True):
            pred.top = [(trained.classes[i], v) for i, v in zip(idx, vals, strict=True)]
    return trained, results


def print_predictions(trained: Trained, results: list[Prediction], json_out: bool) -> bool:
    """Print the results (errors also on stderr); True when every file was classified."""
    import json

    import typer

    for pred in results:
        if pred.error is not None:
            typer.echo(f"error: {pred.path}: {pred.error}", err=True)
    if json_out:
        how = trained.scoring.as_dict()
        entries = [pred.as_dict() | (how if pred.error is None else {}) for pred in results]
        typer.echo(json.dumps(entries, indent=2, ensure_ascii=False))
    else:
        typer.echo(trained.scoring.describe())
        for pred in results:
            if pred.error is None:
                notes = f"  ({'; '.join(pred.notes)})" if pred.notes else ""
                typer.echo(f"{pred.path}{notes}")
                for rank, (name, prob) in enumerate(pred.top, start=1):
                    typer.echo(f"  {rank}. {name:<12} {prob:6.1%}")
    return all(pred.error is None for pred in results)
