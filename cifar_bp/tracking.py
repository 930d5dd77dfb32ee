"""What a run writes for TensorBoard, and the same scalars as `metrics.csv`.

Scalars, the config as text, the model graph, a grid of the first batch, weight and gradient
histograms, a gradient-flow figure per epoch, a confusion matrix per evaluation, a layout
for the Custom Scalars page and the HParams of a finished run. A Tracker made with no run
directory (the other ranks under torchrun) does nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_bp.config import Config
from cifar_bp.drawing import Drawer

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

# The keys that tell runs apart; the rest of the config is in the run's config text.
HPARAM_KEYS = (
    "loss.name", "loss.reduction", "optim.name", "optim.lr", "train.batch_size",
    "train.epochs", "train.seed", "model.activation", "train.amp",
)  # fmt: skip
# HParams columns: the last value of each of these scalars. Every run declares the same
# list, since TensorBoard takes the column list from whichever run it reads first.
METRIC_TAGS = (
    "test/accuracy", "val/accuracy", "train/accuracy",
    "test/loss", "val/loss", "train/loss_per_image", "train/loss",
)  # fmt: skip
GRID_IMAGES = 32  # of the first batch, 8 to a row
# HParams live in an event file of their own, named to be read before the writer's files
# (TensorBoard reads a run's files in name order and keeps the first HParams it meets).
HPARAMS_FILE = "events.out.tfevents.0000000000.hparams"


class Tracker:
    """A thin layer over `SummaryWriter` plus `metrics.csv`. `background_figures` draws the
    figures in a helper process (drawing.py says when that pays)."""

    def __init__(
        self, run_dir: Path | None, purge_step: int | None = None, background_figures: bool = False
    ) -> None:
        self.writer = None
        self.run_dir = run_dir
        self.csv: MetricsCsv | None = None
        self.drawer = Drawer(background_figures)
        if run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            if purge_step == 0:
                # Starting over in the folder of a run stopped before its first checkpoint:
                # nothing of that start is kept. A purge at step 0 would also hide HParams.
                discard_events(Path(run_dir))
                purge_step = None

            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step, flush_secs=30)
            self.csv = MetricsCsv(Path(run_dir) / "metrics.csv", purge_step)

    def scalars(self, values: dict[str, float], step: int, epoch: int | None = None) -> None:
        """One point per tag, and one row of metrics.csv."""
        if self.writer is None or self.csv is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.csv.append(step, epoch, values)

    def config_text(self, cfg: Config, why: Sequence[str] = ()) -> None:
        """The config as `config show` prints it: `auto` resolved, the reasons on top."""
        if self.writer is not None:
            lines = [f"# {line}" for line in why] + cfg.to_yaml().splitlines()
            # Indented four spaces, TensorBoard's markdown shows it as a code block.
            block = "\n".join("    " + line for line in lines)
            self.writer.add_text("config", block, 0)

    def run_start(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        cfg: Config,
        scaler: bool,
    ) -> None:
        """Once per new run: the graph, the first batch as the net sees it, the layout
        (with the loss-scale charts where a GradScaler runs)."""
        if self.writer is None:
            return
        import torch

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on a graph it handles fine
            self.writer.add_graph(model, images[:1])
        self.figure(
            "inputs/first_batch", 0, "image_grid", *input_grid(images, labels, classes, cfg)
        )
        names = [n for n, p in model.named_parameters()]
        self.writer.add_custom_scalars(layout(names, scaler, cfg.log.grad_norms))

    def histograms(self, named_params: Sequence[tuple[str, nn.Parameter]], step: int) -> None:
        """Weights and (already unscaled) gradients of every parameter."""
        if self.writer is None:
            return
        for name, param in named_params:
            self._histogram(f"weights/{name}", param.detach(), step)
            if param.grad is not None:
                self._histogram(f"grads/{name}", param.grad, step)

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        assert self.writer is not None
        # TensorBoard's bins end near ±1e20: values past them (a run blowing up) have no
        # histogram, and the health check, not the logger, is what stops such a run.
        with contextlib.suppress(ValueError):
            self.writer.add_histogram(tag, values.float().cpu(), step)

    def gradient_flow(
        self, names: Sequence[str], mean_abs: Sequence[float], max_abs: Sequence[float], step: int
    ) -> None:
        title = f"gradient flow at step {step}"
        self.figure("gradients/flow", step, "gradient_flow", list(names), list(mean_abs),
                    list(max_abs), title)  # fmt: skip

    def confusion(
        self, split: str, matrix: Sequence[Sequence[int]], classes: Sequence[str], step: int
    ) -> None:
        title = f"{split} at step {step}"
        self.figure(f"confusion/{split}", step, "confusion_matrix", matrix, list(classes), title)

    def figure(self, tag: str, step: int, kind: str, *args: Any) -> None:
        """`figures.<kind>(*args)` as an image (add_figure would need pyplot)."""
        if self.writer is not None:
            self.drawer.submit(tag, step, kind, *args)
            self._write_pictures()

    def _write_pictures(self, wait: bool = False) -> None:
        """Write the figures drawn so far (all of them with `wait`) into the event file."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        assert self.writer is not None
        file_writer = self.writer._get_file_writer()
        for p in self.drawer.finished(wait):
            image = Summary.Image(height=p.height, width=p.width, colorspace=3,
                                  encoded_image_string=p.png)  # fmt: skip
            file_writer.add_summary(Summary(value=[Summary.Value(tag=p.tag, image=image)]), p.step)

    def hparams(self, cfg: Config, status: str | None = None) -> None:
        """The run's defining keys, and at its end its status (success, failure, unknown),
        replacing what an earlier call wrote: a run extended by a resume shows its new
        epochs to a TensorBoard started after it, and a diverged run shows as a failure.

        TensorBoard reads the HParams file once, so the status is also appended to the
        event file it follows: a TensorBoard left open sees the run end. The metric columns
        are the last values of scalars the run logs anyway (no one-point `hparam/*` cards)."""
        if self.writer is None or self.run_dir is None:
            return
        ending = write_hparams(Path(self.run_dir) / HPARAMS_FILE, hparam_values(cfg), status)
        if ending is not None:
            self.writer._get_file_writer().add_summary(ending)
            self.writer.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self._write_pictures()
            self.writer.flush()

    def close(self) -> None:
        """Waits for the figures still being drawn, so that none is lost."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self._write_pictures(wait=True)
            self.drawer.close()
            with contextlib.suppress(Exception):
                self.writer.close()


def write_hparams(path: Path, values: dict[str, float | str], status: str | None) -> Any:
    """An event file holding only HParams, written whole and renamed into place; the
    session's end (with `status`) is in it, and returned, where a status is given."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
    from tensorboard.summary.writer.record_writer import RecordWriter
    from torch.utils.tensorboard.summary import hparams

    experiment, start, _ = hparams(values, dict.fromkeys(METRIC_TAGS, 0.0))
    summaries, ending = [experiment, start], None
    if status is not None:
        end = HParamsPluginData(
            session_end_info=SessionEndInfo(status=api_pb2.Status.Value(status))
        )
        plugin = SummaryMetadata.PluginData(plugin_name="hparams", content=end.SerializeToString())
        tag = "_hparams_/session_end_info"
        ending = Summary(
            value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))]
        )
        summaries.append(ending)
    now = time.time()
    events = [Event(wall_time=now, file_version="brain.Event:2")]
    events += [Event(wall_time=now, step=0, summary=x) for x in summaries]
    temporary = path.with_name(f".hparams-{os.getpid()}.tmp")  # no "tfevents": never read
    with temporary.open("wb") as out:
        records = RecordWriter(out)
        for event in events:
            records.write(event.SerializeToString())
    os.replace(temporary, path)
    return ending


def discard_events(run_dir: Path) -> None:
    """Remove a run folder's TensorBoard events and metrics.csv."""
    for path in [*run_dir.glob("events.out.tfevents.*"), run_dir / "metrics.csv"]:
        path.unlink(missing_ok=True)


def hparam_values(cfg: Config) -> dict[str, float | str]:
    """Numbers stay numbers (a slider, a sortable column); everything else is text, so a
    boolean reads `true` rather than 1.0000."""
    tree = cfg.model_dump(mode="json")
    out: dict[str, float | str] = {}
    for key in HPARAM_KEYS:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        if key == "train.amp" and node is True:
            out[key] = cfg.train.amp_dtype  # the autocast dtype this run trained in
        elif isinstance(node, bool) or node is None:
            out[key] = str(node).lower()
        elif isinstance(node, int | float):
            out[key] = float(node)
        else:
            out[key] = str(node)
    return out


def layout(
    param_names: Sequence[str], scaler: bool, grad_norms: bool = True
) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars page: what matters first, then one chart per layer's norms.

    TensorBoard merges the layouts of the runs it shows, chart by chart without repeats, so
    the runs of a compare parent share one page. Loss per image puts mean and sum runs on
    one scale. The loss-scale charts come only with a GradScaler (float16), the only
    precision that writes `amp/*`, and the norm charts only with `log.grad_norms`: an empty
    chart would only puzzle.
    """
    learning = {
        "loss per image (mean and sum runs compare)": [
            "Multiline", [r"^train/loss_per_image$", r"^(val|test)/loss$"]
        ],
        "accuracy": ["Multiline", [r"^(train|val|test)/accuracy(_live)?$"]],
        "learning rate": ["Multiline", [r"^train/lr$"]],
        "loss as optimized (sum runs are batch-size times larger)": [
            "Multiline", [r"^train/loss$"]
        ],
    }  # fmt: skip
    norms = {"all parameters (L2 norm of every gradient)": ["Multiline", [r"^grad_norm/total$"]]}
    for layer in dict.fromkeys(name.rpartition(".")[0] for name in param_names):
        title = layer.removeprefix("model1.") or "top"
        norms[title] = ["Multiline", [rf"^grad_norm/{re.escape(layer)}\.[^.]+$"]]
    speed = {
        "images per second": ["Multiline", [r"^train/images_per_s$"]],
        "seconds per epoch: the steps, and each evaluation": [
            "Multiline",
            [r"^train/epoch_seconds$", r"^(val|test)/eval_seconds$"],
        ],
    }
    if scaler:
        speed["AMP loss scale"] = ["Multiline", [r"^amp/scale$"]]
        speed["AMP skipped steps"] = ["Multiline", [r"^amp/skipped_steps$"]]
    pages = {"1. loss, accuracy, learning rate": learning, "2. gradient norms per layer": norms}
    if not grad_norms:
        del pages["2. gradient norms per layer"]
    return pages | {"3. speed and mixed precision": speed}


def input_grid(
    images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], cfg: Config
) -> tuple[np.ndarray, list[int], list[str], str]:
    """`figures.image_grid`'s arguments: the first images of a batch as fed to the net
    (augmented), un-normalized."""
    pixels = pixels_of(images[:GRID_IMAGES], cfg)
    title = "first training batch as the network sees it (after augmentation)"
    return pixels, labels[:GRID_IMAGES].tolist(), list(classes), title


def pixels_of(images: torch.Tensor, cfg: Config) -> np.ndarray:
    """N×3×H×W normalized floats back to N×H×W×3 in [0, 1]."""
    import torch

    x = images.detach().float().cpu()
    if cfg.data.normalize:
        mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
        x = x * std + mean
    return x.clamp(0, 1).permute(0, 2, 3, 1).contiguous().numpy()


class MetricsCsv:
    """`metrics.csv`: step, epoch, then one column per scalar in order of first appearance.

    A row per call (a log point, an evaluation). A new column rewrites the file with the
    wider header; otherwise a row is appended in one write. On resume, rows the
    checkpoint does not cover (step >= purge_step) are dropped, as TensorBoard drops its
    events, so a resumed run has no duplicate rows.
    """

    def __init__(self, path: Path, purge_step: int | None) -> None:
        self.path = path
        self.columns = ["step", "epoch"]
        self.rows: list[dict[str, str]] = []
        if path.is_file():
            self.columns, self.rows = read_rows(path, purge_step)
            self.rewrite()

    def append(self, step: int, epoch: int | None, values: dict[str, float]) -> None:
        row = {"step": str(step), "epoch": "" if epoch is None else str(epoch)}
        row |= {tag: repr(float(value)) for tag, value in values.items()}
        self.rows.append(row)
        new = [tag for tag in values if tag not in self.columns]
        if new or not self.path.is_file():
            self.columns += new
            self.rewrite()
            return
        with self.path.open("a", newline="") as out:
            out.write(self.format([row], header=False))

    def format(self, rows: list[dict[str, str]], header: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, restval="", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def rewrite(self) -> None:
        """Write to a temporary file and rename it over: a crash leaves the old or the new."""
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(self.format(self.rows, header=True))
        os.replace(temporary, self.path)


def read_rows(path: Path, purge_step: int | None) -> tuple[list[str], list[dict[str, str]]]:
    """The rows to keep; a line cut short by a crash (too few fields) is dropped."""
    with path.open(newline="") as source:
        reader = csv.DictReader(source)
        columns = list(reader.fieldnames or ["step", "epoch"])
        rows = []
        for row in reader:
            if None in row.values() or None in row:
                continue
            try:
                step = int(row["step"])
            except (KeyError, ValueError):
                continue
            if purge_step is None or step < purge_step:
                rows.append(row)
    return columns, rows
