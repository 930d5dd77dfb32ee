"""`cifar_bp.lessons`: the plain losses and their closed-form gradients, on random inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cifar_bp import lessons
from cifar_bp.errors import UsageError

SHAPES = [(3,), (4, 5), (2, 3, 4), (1,)]
CE_SHAPES = [(1, 3), (5, 10), (8, 4)]


def reference(name: str, reduction: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss written from its definition, independent of torch.nn's modules."""
    if name == "ce":
        per = -x.log_softmax(dim=1).gather(1, y[:, None])[:, 0]
    else:
        per = (x - y).abs() if name == "l1" else (x - y) ** 2
    return {"none": per, "mean": per.mean(), "sum": per.sum()}[reduction]


def random_pair(name: str, shape: tuple[int, ...], gen: torch.Generator):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if name == "ce":
        return x, torch.randint(0, shape[1], (shape[0],), generator=gen)
    return x, torch.randn(shape, generator=gen, dtype=torch.float64) * 3


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["l1", "mse", "ce"])
def test_plain_losses_match_torch_nn_and_the_definition(name, reduction):
    gen = torch.Generator().manual_seed(1)
    modules = {"l1": torch.nn.L1Loss, "mse": torch.nn.MSELoss, "ce": torch.nn.CrossEntropyLoss}
    for shape in CE_SHAPES if name == "ce" else SHAPES:
        x, y = random_pair(name, shape, gen)
        ours = lessons.plain_loss(name, reduction)(x, y)
        assert torch.equal(ours, modules[name](reduction=reduction)(x, y)), shape
        assert torch.allclose(ours, reference(name, reduction, x, y), rtol=1e-12), shape


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["l1", "mse", "ce"])
def test_closed_form_gradient_is_autograds(name, reduction):
    gen = torch.Generator().manual_seed(2)
    for shape in CE_SHAPES if name == "ce" else SHAPES:
        x, y = random_pair(name, shape, gen)
        auto = lessons.autograd_grad(name, reduction, x, y)
        # and autograd of the definition, so neither side is only checked against itself
        leaf = x.clone().requires_grad_(True)
        reference(name, reduction, leaf, y).backward()
        assert torch.allclose(auto, leaf.grad, rtol=1e-10, atol=1e-14), shape
        closed = lessons.closed_form_grad(name, reduction, x, y)
        assert torch.allclose(auto, closed, rtol=1e-10, atol=1e-14), shape
        assert lessons.gradients(name, x, y)["grad_agrees"] is True


def test_mean_gradient_is_sum_gradient_divided_by_what_mean_divides_by():
    gen = torch.Generator().manual_seed(3)
    x, y = random_pair("mse", (4, 5), gen)
    g = lessons.gradients("mse", x, y)["grad"]
    assert [v / 20 for v in g["sum"]] == pytest.approx(g["mean"], rel=1e-12)
    z, c = random_pair("ce", (6, 10), gen)
    g = lessons.gradients("ce", z, c)["grad"]
    assert [v / 6 for v in g["sum"]] == pytest.approx(g["mean"], rel=1e-12)
    softmax_minus_onehot = z.softmax(1) - F.one_hot(c, 10)
    assert g["sum"] == pytest.approx(softmax_minus_onehot.flatten().tolist(), rel=1e-12)


def test_a_wrong_closed_form_is_caught(monkeypatch):
    """The agreement flag can fail: a closed form off by a factor 2 is reported."""
    real = lessons.closed_form_grad
    monkeypatch.setattr(lessons, "closed_form_grad", lambda *a: 2 * real(*a))
    x, y = random_pair("l1", (3,), torch.Generator().manual_seed(4))
    assert lessons.gradients("l1", x, y)["grad_agrees"] is False


def test_strict_maps_non_finite_numbers_to_strings():
    data = {"a": [float("inf"), -float("inf"), float("nan"), 1.5], "b": (2.0,), "c": "x"}
    assert lessons.strict(data) == {"a": ["inf", "-inf", "nan", 1.5], "b": [2.0], "c": "x"}


def test_strict_and_the_examples_never_hold_a_negative_zero():
    """-0.0 (e.g. −log_softmax of a certain class) would print and parse as "-0.0"."""
    assert math.copysign(1.0, lessons.strict({"a": [-0.0]})["a"][0]) == 1.0
    ce = lessons.worked_examples(logits=[40.0, 0.0], label=0)["ce"]
    zeros = [ce["minus_log_p"], ce["mean"], ce["sum"], *ce["none"]]
    assert zeros == [0.0] * 4 and all(math.copysign(1.0, v) == 1.0 for v in zeros)


@pytest.mark.parametrize(
    "a, b, diff, expected",
    [
        (1.3019, 0.2, 1.1019, ("1.3019", "0.2000")),  # the tutorial's: unchanged
        (40.0, 40.0, 0.0, ("40.0000", "40.0000")),  # equal, and the result is 0: reads right
        (10.0000453989, 10.0, 4.53989e-05, ("10.00004540", "10.00000000")),
        (1e6 + 0.6931, 1e6, 0.6931, ("1000000.6931", "1000000.0000")),  # not 1.000e+06 twice
    ],
)
def test_subtraction_operands_show_the_difference(a, b, diff, expected):
    assert lessons._operands(a, b, diff) == expected


def test_default_label_is_checked_against_the_logits():
    with pytest.raises(UsageError, match="the tutorial's class 1 does not exist: give --label 0"):
        lessons.worked_examples(logits=[5.0])
    with pytest.raises(UsageError, match="--label 2: expected a class index from 0 to 1"):
        lessons.worked_examples(logits=[5.0, 1.0], label=2)
    assert lessons.worked_examples(logits=[5.0], label=0)["ce"]["mean"] == 0.0
