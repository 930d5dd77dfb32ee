"""`cifar-bp train` on configs/smoke.yaml through the real CLI, read back from TensorBoard."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar.layout_pb2 import Layout
from typer.testing import CliRunner

from cifar_bp.cli import app
from cifar_bp.config import resolve_config
from cifar_bp.distributed import World
from cifar_bp.engine import Meters, grad_norms, train_step
from cifar_bp.hardware import choose_hardware
from cifar_bp.setup import build_machinery
from tests.helpers import SMOKE, only_run, scalars, smoke_scalars

PARAMS = [f"model1.{layer}.{kind}" for layer in ("conv1", "conv2", "conv3", "linear1", "linear2")
          for kind in ("weight", "bias")]  # fmt: skip


@pytest.fixture(scope="module", params=["ce", "mse", "l1"])
def smoke_run(request, tmp_path_factory):
    logdir = tmp_path_factory.mktemp(f"runs-{request.param}")
    result = CliRunner().invoke(
        app, ["train", "--config", str(SMOKE), "--loss", request.param, "--logdir", str(logdir)]
    )
    return request.param, result, only_run(logdir)


def test_smoke_train_learns(smoke_run):
    loss, result, run_dir = smoke_run
    assert result.exit_code == 0, result.stderr
    series = scalars(run_dir)
    losses = [v for _, v in series["train/loss"]]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, f"{loss} loss did not fall"
    assert series["test/accuracy"][-1][1] > 0.5
    assert "Run summary" in result.stdout and str(run_dir) in result.stdout


def test_smoke_run_writes_every_tag(smoke_run):
    _, _, run_dir = smoke_run
    series = scalars(run_dir)
    expected = {"train/loss", "train/lr", "train/images_per_s", "grad_norm/total",
                "train/accuracy", "test/loss", "test/accuracy"}  # fmt: skip
    expected |= {f"grad_norm/{name}" for name in PARAMS}
    assert expected <= set(series)
    for tag in expected:
        assert all(math.isfinite(v) for _, v in series[tag]), tag
    # 3 epochs of 16 steps; epoch metrics land on the epoch's last step.
    assert [s for s, _ in series["test/accuracy"]] == [16, 32, 48]
    total = series["grad_norm/total"][-1][1]
    parts = [series[f"grad_norm/{n}"][-1][1] for n in PARAMS]
    assert total == pytest.approx(math.sqrt(sum(p * p for p in parts)), rel=1e-5)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "last.pt").is_file()


def test_smoke_run_logs_config_text_and_hparams(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    loss, _, run_dir = smoke_run
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "source: synthetic" in text and f"name: {loss}" in text
    start = HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["loss.name"].string_value == loss
    assert start.hparams["train.epochs"].number_value == 3
    # No one-point hparam/* cards: the metric columns are the run's own last scalars.
    assert not [tag for tag in scalars(run_dir) if tag.startswith("hparam/")]
    assert "test/accuracy" in {
        m.name.tag
        for m in HParamsPluginData.FromString(
            acc.PluginTagToContent("hparams")["_hparams_/experiment"]
        ).experiment.metric_infos
    }


def test_evaluate_scores_the_checkpoint_on_its_own_and_other_data(cli, smoke_run):
    import json

    _, _, run_dir = smoke_run
    own = cli("evaluate", "--checkpoint", run_dir, "--json")
    assert own.exit_code == 0, own.stderr
    result = json.loads(own.stdout)["results"]["test"]
    # The same weights on the same test split: exactly what the last epoch logged.
    assert result["accuracy"] == pytest.approx(scalars(run_dir)["test/accuracy"][-1][1])
    assert result["count"] == 256 and len(result["per_class"]) == 10
    other = cli("evaluate", "--checkpoint", run_dir / "last.pt", "--set", "data.test_size=100")
    assert other.exit_code == 0, other.stderr
    assert "(100 images)" in other.stdout and "accuracy per class" in other.stdout
    # What was scored comes first: smoke.yaml keeps no weight average and no extra views.
    scoring = "scoring: the trained weights (no weight average), 1 view per image (as given)"
    assert other.stdout.splitlines()[0] == scoring
    refused = cli("evaluate", "--checkpoint", run_dir, "--set", "model.activation=relu")
    assert (
        refused.exit_code == 2
        and "data.*, train.eval_flip, train.eval_shift and train.device" in refused.stderr
    )


def test_run_directory_is_never_overwritten(cli, tmp_path):
    args = ["train", "--config", SMOKE, "--logdir", tmp_path, "--run-name", "once",
            "--epochs", "1", "--set", "data.train_size=256", "-q"]  # fmt: skip
    assert cli(*args).exit_code == 0
    before = sorted(p.name for p in (tmp_path / "once").iterdir())
    again = cli(*args)
    assert again.exit_code == 2
    assert "already exists" in again.stderr and "--resume" in again.stderr
    assert sorted(p.name for p in (tmp_path / "once").iterdir()) == before


def test_images_per_s_counts_steps_not_the_evaluation_before_them(cli, tmp_path, monkeypatch):
    import time

    import cifar_bp.trainer as trainer

    scored = trainer.evaluate_split

    def slow_evaluation(run, split):  # a slow evaluation between the epochs' steps
        time.sleep(1.0)
        return scored(run, split)

    monkeypatch.setattr(trainer, "evaluate_split", slow_evaluation)
    # One log point per epoch (its last step), so each rate spans one epoch's steps.
    sets = ("data.train_size=256", "log.every_n_steps=1000", "log.histograms=false")
    series = smoke_scalars(cli, tmp_path, "--epochs", "3", sets=sets)
    rates = [v for _, v in series["train/images_per_s"]]
    seconds = [v for _, v in series["train/epoch_seconds"]]
    assert len(rates) == len(seconds) == 3
    for rate, epoch_s in zip(rates, seconds, strict=True):
        # The time the rate was measured over lies within the epoch's steps; a window that
        # spanned the 1 s evaluation before epochs 2 and 3 would be a second longer.
        window_s = 256 / rate
        assert 0.5 * epoch_s < window_s < epoch_s + 0.5
    # Where that time went is logged beside the steps' own time.
    evaluations = [v for _, v in series["test/eval_seconds"]]
    assert len(evaluations) == 3 and all(v >= 1.0 for v in evaluations)


def test_offline_cifar10_gives_one_clear_message(cli, tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    result = cli("train", "--config", SMOKE, "--logdir", tmp_path / "runs",
                 "--set", "data.source=cifar10", "--set", f"data.root={empty}",
                 "--set", "data.download=false")  # fmt: skip
    assert result.exit_code == 1
    assert "CIFAR-10 not found" in result.stderr
    assert "cifar-10-python.tar.gz" in result.stderr and "configs/smoke.yaml" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing left behind


def _machinery(init_scale: float):
    sets = ["train.amp=false", "train.grad_scaler=true", f"train.init_scale={init_scale}"]
    cfg = resolve_config(SMOKE, {}, sets)
    return cfg, build_machinery(cfg, choose_hardware(cfg, World()), World(), steps=10)


def test_grad_scaler_norms_are_the_unscaled_norms():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    _, m = _machinery(2.0**20)
    reference = [p.detach().clone() for p in m.params]
    # The true gradients, computed by hand without any scaler.
    model = type(m.model)()
    model.load_state_dict(m.model.state_dict())
    m.loss_fn(model(images), labels).backward()
    expected = grad_norms(list(model.parameters()))
    norms = train_step(m, images, labels, Meters(m.device))
    assert torch.allclose(norms, expected, rtol=1e-5)
    assert m.scaler.get_scale() == 2.0**20  # nothing overflowed
    assert not all(torch.equal(a, b) for a, b in zip(reference, m.params, strict=True))


def test_grad_scaler_skipped_steps_are_counted():
    torch.manual_seed(0)
    # Large inputs give conv1 gradients above 1, which overflow float32 once scaled by 3e38.
    images, labels = 1e4 * torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    _, m = _machinery(3e38)  # so large that the scaled gradients overflow float32
    meters = Meters(m.device)
    halvings = 0
    for _ in range(40):
        before = [p.detach().clone() for p in m.params]
        scale = m.scaler.get_scale()
        train_step(m, images, labels, meters)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, m.params, strict=True))
        if m.scaler.get_scale() < scale:  # a skipped step: the scale halves (backoff 0.5)
            halvings += 1
            assert unchanged and m.scaler.get_scale() == pytest.approx(scale / 2)
        else:
            assert not unchanged
    assert halvings > 0
    assert meters.read()["skipped"] == halvings


def test_grad_scaler_state_reaches_tensorboard(cli, tmp_path):
    sets = ("train.grad_scaler=true", "train.init_scale=3e38", "data.normalize=true",
            "data.std=[1e-4, 1e-4, 1e-4]", "log.every_n_steps=1", "data.train_size=512",
            "train.max_nonfinite_steps=50")  # fmt: skip
    series = smoke_scalars(cli, tmp_path, "--epochs", "1", sets=sets)
    skipped = [v for _, v in series["amp/skipped_steps"]]
    # With a GradScaler the layout has the charts for these two series.
    raw = EventAccumulator(str(only_run(tmp_path)), size_guidance={"tensors": 0})
    raw.Reload()
    layout = Layout.FromString(
        raw.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    charts = {c.title: list(c.multiline.tag) for c in layout.category[2].chart}
    assert charts["AMP loss scale"] == [r"^amp/scale$"]
    assert charts["AMP skipped steps"] == [r"^amp/skipped_steps$"]
    scale = [v for _, v in series["amp/scale"]]
    assert skipped[-1] > 0 and skipped == sorted(skipped)
    assert scale[-1] == pytest.approx(3e38 * 0.5 ** skipped[-1], rel=1e-6)


@pytest.mark.parametrize("images", [64, 160, 256])  # 2, 5 and 8 steps in all
def test_onecycle_on_a_tiny_run_trains_with_a_finite_schedule(cli, tmp_path, images):
    # OneCycleLR divides by each phase's length: a warm-up under one step used to crash.
    sets = (f"data.train_size={images}", "optim.scheduler=onecycle", "log.every_n_steps=1")
    series = smoke_scalars(cli, tmp_path, "--epochs", "1", "--batch-size", "32", sets=sets)
    lrs = [v for _, v in series["train/lr"]]
    assert len(lrs) == images // 32 and all(math.isfinite(v) and v > 0 for v in lrs)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--loss", "mse", "--set", "loss.label_smoothing=0.1"],
         "loss: mse ignores label_smoothing 0.1 (cross-entropy settings)"),
        (["--loss", "l1", "--set", "loss.weight=[1,1,1,1,1,1,1,1,1,2]", "--set",
          "loss.ignore_index=3"],
         "loss: l1 ignores class weights, ignore_index 3 (cross-entropy settings)"),
        (["--loss", "ce", "--set", "loss.label_smoothing=0.1"], None),
    ],
)  # fmt: skip
def test_train_says_which_loss_settings_its_loss_ignores(cli, tmp_path, args, line):
    result = cli("train", "--config", SMOKE, "--logdir", tmp_path, "--epochs", "1",
                 "--set", "data.train_size=128", "--set", "data.test_size=64", *args)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    said = [t for t in (result.stdout + result.stderr).splitlines() if t.startswith("loss: ")]
    assert said == ([line] if line else [])
