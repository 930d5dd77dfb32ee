"""The weight average (train.ema_decay) and test-time augmentation (train.eval_flip, eval_shift)."""

from __future__ import annotations

import json

import pytest
import torch

from cifar_bp.checkpoint import load_checkpoint
from cifar_bp.config import Config, LossConfig, ModelConfig
from cifar_bp.data import DeviceLoader, load_dataset
from cifar_bp.engine import WeightAverage, evaluate
from cifar_bp.hardware import Precision
from cifar_bp.losses import build_loss
from cifar_bp.model import build_model
from tests.helpers import SMOKE, scalars


def test_weight_average_lerps_with_a_ramped_decay():
    live = torch.nn.Linear(2, 1)
    avg = WeightAverage(live, decay=0.99)
    start = live.weight.detach().clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    avg.update()  # first update: decay min(0.99, 2/11) -> moves 9/11 of the way
    expected = start + 9 / 11
    assert torch.allclose(avg.model.weight, expected)
    for _ in range(200):
        avg.update()
    assert torch.allclose(avg.model.weight, live.weight, atol=1e-6)  # converges on a fixed point
    assert not avg.model.weight.requires_grad
    again = WeightAverage(live, decay=0.99)
    again.load_state_dict(avg.state_dict())
    assert again.updates == 201 and torch.equal(again.model.weight, avg.model.weight)


def _score(
    model: torch.nn.Module, flip: bool, batches, loss_cfg: LossConfig | None = None, shift: int = 0
):
    loss = build_loss(loss_cfg or LossConfig(label_smoothing=0.0))
    fp32 = Precision(torch.device("cpu"), None, False, "test")
    return evaluate(model, loss, batches, fp32, flip, shift)


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels_last=False))
    images, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2
    want_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    want_acc = (logits.argmax(1) == labels).float().mean().item()
    got = _score(model, True, [(images, labels)])
    assert got.loss == pytest.approx(want_loss, rel=1e-5)
    assert got.accuracy == pytest.approx(want_acc)
    plain = _score(model, False, [(images, labels)])
    assert plain.loss != pytest.approx(want_loss, rel=1e-5)  # the flip changes the answer


def moved(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Each image's content moved dy rows down and dx columns right, the border reflected:
    built pixel by pixel from index arithmetic, independently of the code under test."""
    side = images.shape[-1]

    def source(i: int, d: int) -> int:
        j = abs(i - d)  # reflect about 0 and about side - 1, as reflect padding does
        return 2 * (side - 1) - j if j > side - 1 else j

    rows = torch.tensor([source(i, dy) for i in range(side)])
    cols = torch.tensor([source(i, dx) for i in range(side)])
    return images[:, :, rows][:, :, :, cols]


@pytest.mark.parametrize("flip", [False, True])
def test_eval_shift_adds_views_moved_diagonally_both_ways(flip):
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels_last=False))
    images, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    views = [images, images.flip(3)] if flip else [images]
    views = [m for v in views for m in (v, moved(v, 2, 2), moved(v, -2, -2))]
    with torch.no_grad():
        logits = sum(model(v) for v in views) / len(views)
    got = _score(model, flip, [(images, labels)], shift=2)
    assert got.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert got.accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert got.loss != pytest.approx(_score(model, flip, [(images, labels)]).loss)


def test_training_evaluates_and_keeps_the_weight_average(cli, tmp_path):
    args = ["train", "--config", SMOKE, "--logdir", tmp_path, "--run-name", "avg", "-q",
            "--epochs", "1", "--set", "data.train_size=512", "--set", "data.test_size=128",
            "--set", "train.ema_decay=0.9"]  # fmt: skip
    assert cli(*args).exit_code == 0
    run_dir = tmp_path / "avg"
    payload = load_checkpoint(run_dir / "last.pt")
    average, live = payload["average"]["weights"], payload["model"]
    assert payload["average"]["updates"] == 8  # one per step
    assert not torch.equal(average["model1.conv1.weight"], live["model1.conv1.weight"])
    logged = scalars(run_dir)["test/loss"][-1][1]
    # `evaluate` scores the average, as training did: the same loss on the same split.
    report = cli("evaluate", "--checkpoint", run_dir, "--json")
    assert json.loads(report.stdout)["results"]["test"]["loss"] == pytest.approx(logged, rel=1e-5)
    model = build_model(ModelConfig(channels_last=False))
    model.load_state_dict(live)
    cfg = Config.model_validate(payload["config"])
    data = load_dataset(cfg.data, cfg.train.seed)
    batches = DeviceLoader(data.test, cfg.data, 128, torch.device("cpu"), train=False).epoch(0)
    raw = _score(model, cfg.train.eval_flip, batches, cfg.loss)
    assert raw.loss != pytest.approx(logged, rel=1e-5)  # the live weights score differently
    # ... and their accuracy is logged beside the average's.
    live_logged = scalars(run_dir)["test/accuracy_live"][-1][1]
    assert live_logged == pytest.approx(raw.accuracy)


def test_a_checkpoint_from_before_eval_shift_is_scored_as_its_run_scored_it(cli, tmp_path):
    args = ["train", "--config", SMOKE, "--logdir", tmp_path, "--run-name", "old", "-q",
            "--epochs", "1", "--set", "data.train_size=256", "--set", "data.test_size=128",
            "--set", "train.eval_flip=true"]  # fmt: skip
    assert cli(*args).exit_code == 0
    path = tmp_path / "old" / "last.pt"
    payload = torch.load(path, weights_only=False)
    del payload["config"]["train"]["eval_shift"]  # as written before the key existed
    torch.save(payload, path)
    logged = scalars(tmp_path / "old")["test/loss"][-1][1]
    report = json.loads(cli("evaluate", "--checkpoint", path, "--json").stdout)
    assert report["results"]["test"]["loss"] == pytest.approx(logged, rel=1e-5)
    shifted = cli("evaluate", "--checkpoint", path, "--json", "--set", "train.eval_shift=2")
    assert json.loads(shifted.stdout)["results"]["test"]["loss"] != pytest.approx(
        report["results"]["test"]["loss"]
    )


@pytest.mark.parametrize(
    ("sets", "line"),
    [
        (["train.eval_flip=true", "train.eval_shift=2"],
         "evaluation: 6 views per image (mirror, ±2 px diagonal shifts), logits averaged"),
        (["train.eval_flip=true", "train.eval_shift=0"],
         "evaluation: 2 views per image (mirror), logits averaged"),
        (["train.eval_flip=false", "train.eval_shift=0"], None),
    ],
)  # fmt: skip
def test_train_says_how_many_views_it_scores(cli, tmp_path, sets, line):
    args = ["train", "--config", SMOKE, "--logdir", tmp_path, "--epochs", "1",
            "--set", "data.train_size=128", "--set", "data.test_size=64"]  # fmt: skip
    result = cli(*args, *(x for s in sets for x in ("--set", s)))
    assert result.exit_code == 0, result.stderr
    said = [t for t in (result.stdout + result.stderr).splitlines() if t.startswith("evaluation:")]
    assert said == ([line] if line else [])
