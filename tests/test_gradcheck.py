"""Backprop checked: autograd against central finite differences on the reference net."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cifar_bp.config import LossConfig, ModelConfig
from cifar_bp.gradcheck import TOLERANCE, check_gradients, sample_indices
from cifar_bp.model import build_model
from tests.helpers import SMOKE

PARAMS = [f"model1.{layer}.{kind}" for layer in ("conv1", "conv2", "conv3", "linear1", "linear2")
          for kind in ("weight", "bias")]  # fmt: skip


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels_last=True))  # the layout `train` uses by default
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=gen)  # the chain rule holds per image
    return model, images, torch.tensor([3, 9])


@pytest.mark.parametrize(
    "loss",
    [
        LossConfig(name="ce", label_smoothing=0.0),
        LossConfig(name="ce", reduction="sum", label_smoothing=0.1, weight=[1.0] * 9 + [2.0]),
        LossConfig(name="mse", reduction="none"),
        LossConfig(name="l1", input="logits"),
    ],
    ids=["ce", "ce-smoothed-weighted-sum", "mse-none", "l1-logits"],
)
def test_every_parameter_of_the_reference_net_agrees(batch, loss):
    check = check_gradients(*batch, loss)
    assert [p.name for p in check.params] == PARAMS
    for p in check.params:
        assert p.samples == 3, p.name
        assert p.max_rel_error < TOLERANCE, p
        assert p.autograd != 0 and p.finite_difference == pytest.approx(p.autograd, rel=1e-3)
    assert check.agrees and check.max_rel_error < 1e-4  # float64: far inside the tolerance


class WrongBackward(torch.autograd.Function):
    """y = w·x, whose backward claims twice the true gradient for w."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w, 2 * (grad * x).sum(dim=0)


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 10))

    def forward(self, x):
        return WrongBackward.apply(x.flatten(1)[:, :10], self.w)


def test_a_wrong_backward_is_caught():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    check = check_gradients(Broken(), images, torch.tensor([1, 2, 3, 4]), LossConfig(name="mse"))
    assert not check.agrees
    assert check.params[0].max_rel_error == pytest.approx(0.5, rel=1e-4)  # |2g − g| / |2g|


def test_samples_are_the_largest_and_meaningful_gradients():
    grad = torch.tensor([0.0, 1e-9, 0.5, -2.0, 0.1, 0.03])
    gen = torch.Generator().manual_seed(0)
    picks = sample_indices(grad, 3, gen)
    assert picks[0] == 3 and len(set(picks)) == 3
    assert set(picks) <= {2, 3, 4, 5}  # never the ~0 gradients, whose ratio is noise


def test_cli_check_reports_every_parameter(cli):
    args = ["--config", SMOKE, "--set", "data.train_size=64", "--batch-size", "4", "--check"]
    result = cli("inspect-grads", *args, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["batch_size"] == 4
    (check,) = out["check"]
    assert [p["name"] for p in check["params"]] == PARAMS
    assert all(0 <= p["max_rel_error"] < 1e-3 for p in check["params"])
    assert check["agrees"] is True and check["images"] == 4


def test_check_table_fits_80_columns_with_full_names(batch):
    from rich.console import Console

    from cifar_bp.grads_view import check_table, check_verdict

    check = check_gradients(*batch, LossConfig(name="ce"), samples=1)
    console = Console(width=80, record=True)
    console.print(check_table(check))
    text = console.export_text()
    assert all(name in text for name in PARAMS) and "…" not in text
    assert max(map(len, text.splitlines())) <= 80
    assert "backprop's chain rule agrees" in check_verdict(check)
