"""The tutorial's worked numbers through the project's own loss factory; the model's shape."""

from __future__ import annotations

import pytest
import torch

from cifar_bp.config import LossConfig, ModelConfig
from cifar_bp.losses import build_loss, make_criterion
from cifar_bp.model import build_model


def test_l1_and_mse_match_the_tutorial():
    x = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([1.0, 2.0, 5.0])
    assert make_criterion(LossConfig(name="l1"))(x, y).item() == pytest.approx(0.6667, abs=1e-4)
    assert make_criterion(LossConfig(name="mse"))(x, y).item() == pytest.approx(1.3333, abs=1e-4)
    assert make_criterion(LossConfig(name="l1", reduction="sum"))(x, y).item() == pytest.approx(2.0)


def test_cross_entropy_matches_the_tutorial():
    logits = torch.tensor([[0.1, 0.2, 0.3]])
    loss = make_criterion(LossConfig(name="ce"))(logits, torch.tensor([1]))
    assert loss.item() == pytest.approx(1.1019, abs=1e-4)
    assert logits.softmax(1)[0].tolist() == pytest.approx([0.3006, 0.3322, 0.3672], abs=1e-4)


def test_one_hot_losses_use_probabilities_or_logits():
    logits = torch.tensor([[2.0, 0.0] + [0.0] * 8])
    labels = torch.tensor([1])
    on_probs = build_loss(LossConfig(name="mse"))(logits, labels)
    probs = logits.softmax(1)
    expected = ((probs - torch.nn.functional.one_hot(labels, 10)) ** 2).mean()
    assert on_probs.item() == pytest.approx(expected.item())
    on_logits = build_loss(LossConfig(name="l1", input="logits"))(logits, labels)
    assert on_logits.item() == pytest.approx((2.0 + 1.0) / 10)


def test_ce_options_reach_torch():
    cfg = LossConfig(name="ce", label_smoothing=0.1, weight=[1.0] * 9 + [2.0], ignore_index=3)
    crit = make_criterion(cfg)
    assert crit.label_smoothing == 0.1 and crit.ignore_index == 3
    assert crit.weight.tolist()[-1] == 2.0


def test_model_shapes_and_names():
    model = build_model(ModelConfig(channels_last=False))
    names = [n for n, _ in model.named_parameters()]
    layers = ["conv1", "conv2", "conv3", "linear1", "linear2"]
    assert names == [f"model1.{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["model1.conv1.weight"] == (32, 3, 5, 5)
    assert shapes["model1.conv3.weight"] == (64, 32, 5, 5)
    assert shapes["model1.linear1.weight"] == (64, 1024)
    assert shapes["model1.linear2.weight"] == (10, 64)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # The tutorial's net has no activation functions.
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())


def test_relu_variant_keeps_parameter_names():
    plain = [n for n, _ in build_model(ModelConfig()).named_parameters()]
    relu = build_model(ModelConfig(activation="relu"))
    assert [n for n, _ in relu.named_parameters()] == plain
    assert sum(isinstance(m, torch.nn.ReLU) for m in relu.modules()) == 4
