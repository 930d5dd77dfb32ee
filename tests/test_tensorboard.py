"""What a training run writes for TensorBoard, read back from its event files, and metrics.csv."""

from __future__ import annotations

import csv
import io
import math
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from cifar_bp.checkpoint import load_checkpoint
from cifar_bp.config import resolve_config
from cifar_bp.data import DeviceLoader, load_dataset
from cifar_bp.distributed import World
from cifar_bp.hardware import choose_hardware
from cifar_bp.tracking import (
    HPARAM_KEYS,
    HPARAMS_FILE,
    METRIC_TAGS,
    MetricsCsv,
    Tracker,
    pixels_of,
)
from tests.helpers import SMOKE, only_run, scalars, smoke_scalars

PARAMS = [f"model1.{layer}.{kind}" for layer in ("conv1", "conv2", "conv3", "linear1", "linear2")
          for kind in ("weight", "bias")]  # fmt: skip
# 256 images in batches of 64: 4 steps an epoch, 2 epochs, a log point every 2 steps.
SMALL = ["--set", "data.train_size=256", "--set", "data.test_size=128", "--epochs", "2",
         "--set", "log.every_n_steps=2", "-q"]  # fmt: skip
EPOCH_ENDS = [4, 8]


def accumulator(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0,
                                                        "histograms": 0, "tensors": 0})  # fmt: skip
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.helpers import Cli

    logdir = tmp_path_factory.mktemp("tb")
    result = Cli()("train", "--config", SMOKE, "--logdir", logdir, *SMALL)
    assert result.exit_code == 0, result.stderr
    run_dir = only_run(logdir)
    return run_dir, accumulator(run_dir)


def test_graph_is_the_reference_net(run):
    _, acc = run
    nodes = [node.name for node in acc.Graph().node]
    for layer in ("conv1", "conv2", "conv3", "linear1", "linear2"):
        assert any(f"[{layer}]" in name for name in nodes), layer
    # Traced on one image of the first batch: the input is 1x3x32x32.
    shapes = [n for n in acc.Graph().node if n.op == "IO Node" and "input" in n.name]
    dims = [d.size for d in shapes[0].attr["_output_shapes"].list.shape[0].dim]
    assert dims == [1, 3, 32, 32]


def test_weight_histograms_are_the_weights_at_the_epoch_ends(run):
    run_dir, acc = run
    for name in PARAMS:
        assert [e.step for e in acc.Histograms(f"weights/{name}")] == EPOCH_ENDS
    # The last histograms were taken after the final step: the checkpoint's weights.
    weights = load_checkpoint(run_dir / "last.pt")["model"]
    for name in PARAMS:
        last = acc.Histograms(f"weights/{name}")[-1].histogram_value
        w = weights[name].double()
        assert last.num == w.numel()
        assert last.sum == pytest.approx(w.sum().item(), rel=1e-4, abs=1e-6)
        assert (last.min, last.max) == pytest.approx((w.min().item(), w.max().item()))


def test_gradient_histograms_match_the_logged_norms(run):
    run_dir, acc = run
    norms = scalars(run_dir)
    for name in PARAMS:
        events = acc.Histograms(f"grads/{name}")
        assert [e.step for e in events] == EPOCH_ENDS
        logged = dict(norms[f"grad_norm/{name}"])
        for event in events:  # the same gradients as the norm at that step
            h = event.histogram_value
            assert math.sqrt(h.sum_squares) == pytest.approx(logged[event.step], rel=1e-4)


def png(acc, tag):
    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string))))
            for e in acc.Images(tag)]  # fmt: skip


def test_figures_are_logged_when_they_should_be(run):
    _, acc = run
    grid = png(acc, "inputs/first_batch")
    assert [step for step, _ in grid] == [0]
    assert grid[0][1].shape[2] == 3 and grid[0][1].shape[1] > 600  # a picture, not a stub
    for tag in ("confusion/test", "gradients/flow"):
        images = png(acc, tag)
        assert [step for step, _ in images] == EPOCH_ENDS, tag
        assert all(img.std() > 10 for _, img in images), tag  # drawn, not blank


def test_layout_leads_with_loss_accuracy_and_lr_and_groups_norms_per_layer(run):
    run_dir, acc = run
    raw = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    titles = [c.title for c in layout.category]
    assert titles[0].startswith("1. loss, accuracy, learning rate")
    first = [chart.title for chart in layout.category[0].chart]
    assert first[:3] == ["loss per image (mean and sum runs compare)", "accuracy", "learning rate"]
    tags = set(scalars(run_dir))
    norms = {c.title: c.multiline.tag for c in layout.category[1].chart}
    assert set(norms) >= {"conv1", "conv2", "conv3", "linear1", "linear2"}
    # Each layer's chart picks up exactly its weight and bias norms.
    for layer in ("conv1", "conv2", "conv3", "linear1", "linear2"):
        matched = {t for t in tags for rx in norms[layer] if re.search(rx, t)}
        assert matched == {f"grad_norm/model1.{layer}.weight", f"grad_norm/model1.{layer}.bias"}
    # No GradScaler here (bf16 or float32), so no loss-scale charts that nothing fills.
    speed = [c.title for c in layout.category[2].chart]
    assert speed == ["images per second", "seconds per epoch: the steps, and each evaluation"]
    per_image = layout.category[0].chart[0].multiline.tag
    assert {t for t in tags for rx in per_image if re.search(rx, t)} == {
        "train/loss_per_image", "test/loss"
    }  # fmt: skip


def test_config_text_is_config_show_with_the_reasons_on_top(run):
    _, acc = run
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    lines = [line.removeprefix("    ") for line in text.splitlines()]
    hardware = choose_hardware(resolve_config(SMOKE, {}, []), World())
    assert lines[:3] == [f"# {line}" for line in hardware.lines()]
    assert lines[0] == "# device: cpu" and lines[1].startswith("# precision: ")
    assert "  amp: auto" not in lines and "  compile: auto" not in lines
    assert f"  amp: {str(hardware.precision.dtype is not None).lower()}" in lines


def test_the_run_folders_config_keeps_auto_under_what_it_became(run):
    """A resume on another machine chooses again, so `auto` stays; the comments on top
    say what it became here."""
    run_dir, _ = run
    text = (run_dir / "config.yaml").read_text()
    hardware = choose_hardware(resolve_config(SMOKE, {}, []), World())
    assert text.splitlines()[:3] == [f"# chosen on this machine: {x}" for x in hardware.lines()]
    assert yaml.safe_load(text)["train"]["amp"] == "auto"
    cfg = resolve_config(run_dir / "config.yaml")  # the comments change nothing it says
    assert (cfg.data.train_size, cfg.train.epochs, cfg.log.every_n_steps) == (256, 2, 2)


def test_hparams_hold_the_defining_keys_as_numbers_or_text(run):
    run_dir, acc = run
    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert set(hp) == set(HPARAM_KEYS)
    assert hp["loss.name"].string_value == "ce" and hp["loss.reduction"].string_value == "mean"
    assert hp["optim.lr"].number_value == pytest.approx(0.002)
    assert hp["train.epochs"].number_value == 2
    # The precision the run trained in, as text: `auto` resolved, bf16 on a CPU only where
    # it is native.
    expected = choose_hardware(resolve_config(SMOKE, {}, []), World()).precision
    assert hp["train.amp"].string_value == ("false" if expected.dtype is None else expected.name)
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(METRIC_TAGS)
    # The columns read scalars the run logs anyway: no one-point hparam/* cards.
    assert not [t for t in scalars(run_dir) if t.startswith("hparam/")]


def hparams_of(run_dir) -> tuple[dict, str]:
    """The HParams TensorBoard reads for a run (the first it meets), and the run's status."""
    from tensorboard.plugins.hparams import api_pb2

    content = accumulator(run_dir).PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    end = HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    return start.session_start_info.hparams, api_pb2.Status.Name(end.session_end_info.status)


def test_a_finished_run_is_a_success_also_to_a_tensorboard_left_open(run):
    """The keys live in their own file, read first; TensorBoard reads it once, so the end of
    the run is also in the event file it keeps following."""
    run_dir, _ = run
    assert hparams_of(run_dir)[1] == "STATUS_SUCCESS"
    followed = [p for p in run_dir.glob("events.out.tfevents.*") if p.name != HPARAMS_FILE]
    assert len(followed) == 1
    assert set(hparams_tags(run_dir / HPARAMS_FILE)) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    content = hparams_tags(followed[0])
    assert list(content) == ["_hparams_/session_end_info"]  # the keys once, in their file
    end = HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    assert end.status == 1  # api_pb2.STATUS_SUCCESS


def hparams_tags(path) -> dict[str, bytes]:
    """The HParams summaries one event file holds, by tag."""
    acc = EventAccumulator(str(path))
    acc.Reload()
    try:
        return acc.PluginTagToContent("hparams")
    except KeyError:  # no summary of that plugin in this file
        return {}


def test_an_extended_run_shows_its_new_epochs_and_a_diverged_one_its_failure(cli, tmp_path):
    """TensorBoard keeps the first HParams it reads for a run: a resume that changes them
    must replace the old ones, and a run that fails must be listed, as a failure."""
    tiny = ["--set", "data.train_size=128", "--set", "data.test_size=64", "-q"]
    base = ["train", "--config", SMOKE, "--logdir", tmp_path, *tiny]
    assert cli(*base, "--run-name", "r", "--epochs", "1").exit_code == 0
    assert cli("train", "--resume", tmp_path / "r", "--epochs", "2", "-q").exit_code == 0
    hp, status = hparams_of(tmp_path / "r")
    assert (hp["train.epochs"].number_value, status) == (2, "STATUS_SUCCESS")
    blowup = ["--set", "optim.name=sgd", "--lr", "1e12", "--reduction", "sum", "--no-amp"]
    assert cli(*base, "--run-name", "d", *blowup).exit_code == 1
    hp, status = hparams_of(tmp_path / "d")
    assert (hp["optim.lr"].number_value, status) == (1e12, "STATUS_FAILURE")


def test_metrics_csv_holds_every_scalar_point(run):
    run_dir, _ = run
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    series = scalars(run_dir)
    from_csv: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in row.items():
            if tag not in ("step", "epoch") and value != "":
                from_csv.setdefault(tag, []).append((int(row["step"]), float(value)))
    assert set(from_csv) == set(series)
    for tag, points in series.items():  # TensorBoard keeps float32, the CSV the float64
        assert [s for s, _ in from_csv[tag]] == [s for s, _ in points], tag
        assert [v for _, v in from_csv[tag]] == pytest.approx([v for _, v in points], rel=1e-6)
    # 4 log points and 2 evaluations; the epoch column counts from 1.
    assert [(r["step"], r["epoch"]) for r in rows] == [
        ("2", "1"), ("4", "1"), ("4", "1"), ("6", "2"), ("8", "2"), ("8", "2")
    ]  # fmt: skip


@pytest.mark.slow
def test_histograms_off_writes_none_and_every_n_steps_follows_the_setting(cli, tmp_path):
    base = ["train", "--config", SMOKE, *SMALL, "--epochs", "1"]
    off = cli(*base, "--logdir", tmp_path / "off", "--set", "log.histograms=false")
    assert off.exit_code == 0, off.stderr
    assert accumulator(only_run(tmp_path / "off")).Tags()["histograms"] == []
    every = cli(*base, "--logdir", tmp_path / "every", "--set", "log.histograms_every_n_steps=1")
    assert every.exit_code == 0, every.stderr
    acc = accumulator(only_run(tmp_path / "every"))
    assert len(acc.Tags()["histograms"]) == 2 * len(PARAMS)
    assert [e.step for e in acc.Histograms("grads/model1.linear2.bias")] == [1, 2, 3, 4]


def test_without_gradient_norms_the_layout_has_no_empty_charts(cli, tmp_path):
    result = cli("train", "--config", SMOKE, *SMALL, "--epochs", "1", "--logdir", tmp_path,
                 "--set", "log.grad_norms=false")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_dir = only_run(tmp_path)
    acc = accumulator(run_dir)
    layout = layout_pb2.Layout.FromString(
        acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    tags = set(scalars(run_dir))
    assert not [t for t in tags if t.startswith("grad_norm/")]
    assert [c.title for c in layout.category] == [
        "1. loss, accuracy, learning rate",
        "3. speed and mixed precision",
    ]
    for chart in (chart for category in layout.category for chart in category.chart):
        assert any(re.search(rx, t) for rx in chart.multiline.tag for t in tags), chart.title


def test_input_grid_shows_the_pixels_the_net_was_fed():
    # Evaluation batches are normalized but not augmented: undoing the normalization must
    # give back the stored pixels.
    cfg = resolve_config(SMOKE, {}, ["data.normalize=true", "data.train_size=64"])
    data = load_dataset(cfg.data, 0)
    loader = DeviceLoader(data.train, cfg.data, 64, torch.device("cpu"), train=False)
    images, _ = next(iter(loader.epoch(0)))
    assert images.mean().abs() < 0.5 < images.std()  # normalized, not 0..1
    pixels = pixels_of(images, cfg) * 255
    stored = data.train.images[:64].permute(0, 2, 3, 1).float().numpy()
    assert np.abs(pixels - stored).max() < 0.01


def rows_of(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_grows_its_header_and_drops_rows_a_resume_replays(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsCsv(path, purge_step=1)
    for step in (2, 4):
        log.append(step, 1, {"train/loss": 1.0 / step})
    log.append(4, 1, {"test/accuracy": 0.5})  # a new column: the header grows
    log.append(6, 2, {"train/loss": 0.1})
    assert [r["step"] for r in rows_of(path)] == ["2", "4", "4", "6"]
    assert rows_of(path)[2] == {"step": "4", "epoch": "1", "train/loss": "", "test/accuracy": "0.5"}
    # A crash left half a line; the checkpoint was at step 4: step 6 is trained again.
    with path.open("a") as f:
        f.write("8,2,0.0")
    resumed = MetricsCsv(path, purge_step=5)
    resumed.append(6, 2, {"train/loss": 0.2})
    rows = rows_of(path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        ("2", "0.5"), ("4", "0.25"), ("4", ""), ("6", "0.2")
    ]  # fmt: skip
    assert not list(tmp_path.glob(".*.tmp"))  # the rewrite left no temporary behind


def test_tracker_on_other_ranks_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a writer given no folder would write ./runs here
    tracker = Tracker(None, purge_step=1)
    model = torch.nn.Linear(2, 2)
    tracker.scalars({"train/loss": 1.0}, 1, 1)
    tracker.histograms(list(model.named_parameters()), 1)
    tracker.confusion("test", [[1, 0], [0, 1]], ("a", "b"), 1)
    tracker.gradient_flow(["weight", "bias"], [0.1, 0.2], [0.3, 0.4], 1)
    tracker.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_resumed_run_continues_metrics_csv_without_duplicates(cli, tmp_path):
    args = ["train", "--config", SMOKE, "--logdir", tmp_path, "--run-name", "r",
            *SMALL, "--epochs", "1"]  # fmt: skip
    assert cli(*args).exit_code == 0
    path = tmp_path / "r" / "metrics.csv"
    # As if the process had logged steps 5 and 6 and died before its next checkpoint.
    with path.open("a") as f:
        f.write("5,2,0.002,\n6,2,0.002,\n")
    resumed = cli("train", "--resume", tmp_path / "r", "--epochs", "2", "-q")
    assert resumed.exit_code == 0, resumed.stderr
    rows = rows_of(path)
    assert [(r["step"], r["epoch"]) for r in rows] == [
        ("2", "1"), ("4", "1"), ("4", "1"), ("6", "2"), ("8", "2"), ("8", "2")
    ]  # fmt: skip
    # TensorBoard dropped the same steps: both hold one train/loss per log point.
    logged = scalars(tmp_path / "r")["train/loss"]
    kept = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in kept] == [step for step, _ in logged] == [2, 4, 6, 8]
    assert [float(r["train/loss"]) for r in kept] == pytest.approx([v for _, v in logged])


def drawn(tmp_path, background: bool) -> EventAccumulator:
    tracker = Tracker(tmp_path, purge_step=1, background_figures=background)
    pids = set()
    for step in (1, 2):
        tracker.confusion("test", [[3, 1], [0, 4]], ("cat", "dog"), step)
        tracker.gradient_flow(["conv1.weight", "conv1.bias"], [0.1, 0.0], [0.3, 0.4], step)
        tracker.flush()  # writes what is ready, waits for nothing
        pool = tracker.drawer.pool
        pids |= set(pool._processes) if pool is not None else set()
    assert tracker.drawer.background is background  # no silent fallback to drawing here
    assert len(pids) == background  # one helper process, kept for the whole run
    tracker.close()  # waits for the rest
    return accumulator(tmp_path)


def test_figures_drawn_in_a_helper_process_are_the_ones_drawn_in_place(tmp_path):
    here, helper = drawn(tmp_path / "here", False), drawn(tmp_path / "helper", True)
    for tag in ("confusion/test", "gradients/flow"):
        assert [e.step for e in helper.Images(tag)] == [1, 2], tag
        pairs = zip(png(here, tag), png(helper, tag), strict=True)
        assert all(np.array_equal(a, b) and a.std() > 10 for (_, a), (_, b) in pairs), tag
    assert len(list(tmp_path.joinpath("helper").glob("events.*"))) == 1  # one event file


def test_a_gpu_run_draws_its_figures_in_a_helper_process(tmp_path):
    from cifar_bp.setup import open_tracker

    for device, background in (("cuda", True), ("cpu", False)):
        tracker = open_tracker(tmp_path / device, 1, torch.device(device))
        assert tracker.drawer.background is background
        tracker.close()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_per_image_counts_a_short_last_batch_as_it_is(cli, tmp_path, reduction):
    # 100 images in batches of 64: the second step holds 36, and a log point after each step
    # shows that step alone; the CE sum over 36 images is 36 times the loss per image.
    series = smoke_scalars(cli, tmp_path, "--epochs", "1", "--reduction", reduction,
                           sets=("data.train_size=100", "log.every_n_steps=1"))  # fmt: skip
    loss, per_image = dict(series["train/loss"]), dict(series["train/loss_per_image"])
    images = {1: 64, 2: 36} if reduction == "sum" else {1: 1, 2: 1}
    for step, count in images.items():
        assert per_image[step] == pytest.approx(loss[step] / count, rel=1e-5), step
