"""The reference network: the tutorial's shapes and parameter names."""

from __future__ import annotations

import torch

from cifar_bp.config import ModelConfig
from cifar_bp.model import build_model


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
