"""The loss factory: the tutorial's worked numbers and the options that reach torch.nn."""

from __future__ import annotations

import pytest
import torch

from cifar_bp.config import LossConfig
from cifar_bp.losses import build_loss, elements_averaged, make_criterion, summed_over_images


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


@pytest.mark.parametrize(
    "settings",
    [
        {"name": "ce"},
        {"name": "ce", "weight": [3.0] * 10},
        {"name": "ce", "ignore_index": 3},
        {"name": "ce", "weight": [0.5 + i / 10 for i in range(10)], "ignore_index": 3,
         "label_smoothing": 0.1},
        {"name": "mse"},
        {"name": "l1", "input": "logits"},
    ],
    ids=["plain", "weights", "ignore-index", "everything", "mse", "l1-logits"],
)  # fmt: skip
def test_a_mean_loss_summed_over_images_is_the_sum_loss(settings):
    """Per-image figures (TensorBoard, compare, evaluation) divide this by the image count:
    mean and sum runs must land on one scale whatever divides the mean."""
    torch.manual_seed(0)
    logits, labels = torch.randn(9, 10), torch.randint(0, 10, (9,))
    labels[:3] = 3  # some labels an ignore_index drops
    mean = build_loss(LossConfig(**settings, reduction="mean"))
    total = build_loss(LossConfig(**settings, reduction="sum"))
    want = total(logits, labels)
    assert summed_over_images(total, want, labels) == want
    got = summed_over_images(mean, mean(logits, labels), labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert elements_averaged(LossConfig(**settings), labels) == pytest.approx(
        (want / mean(logits, labels)).item(), rel=1e-5
    )
