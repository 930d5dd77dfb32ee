"""The tutorial's reference network, with its layer names kept exactly."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cifar_bp.cifar10 import NUM_CLASSES
from cifar_bp.config import ModelConfig


class ReferenceNet(nn.Module):
    """`model1` is the tutorial's Sequential, so parameters read `model1.conv1.weight` etc.

    The tutorial's net has no activation functions: only the max-pools are non-linear.
    `activation="relu"` inserts a ReLU after each conv and after linear1 as a clearly
    labelled variant; ReLUs hold no parameters, so the parameter names do not change.
    """

    def __init__(self, activation: str = "none") -> None:
        super().__init__()
        relu = activation == "relu"
        layers: list[tuple[str, nn.Module]] = []
        for i, (c_in, c_out) in enumerate([(3, 32), (32, 32), (32, 64)], start=1):
            layers.append((f"conv{i}", nn.Conv2d(c_in, c_out, 5, padding=2)))
            if relu:
                layers.append((f"relu{i}", nn.ReLU()))
            layers.append((f"maxpool{i}", nn.MaxPool2d(2)))
        layers += [("flatten", nn.Flatten()), ("linear1", nn.Linear(1024, 64))]
        if relu:
            layers.append(("relu4", nn.ReLU()))
        layers.append(("linear2", nn.Linear(64, NUM_CLASSES)))
        self.model1 = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model1(x)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> ReferenceNet:
    model = ReferenceNet(cfg.activation).to(device)
    if cfg.channels_last:
        # NHWC lets oneDNN/cuDNN pick their fastest convolution kernels.
        model = model.to(memory_format=torch.channels_last)
    return model
