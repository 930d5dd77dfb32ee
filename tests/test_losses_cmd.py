"""`cifar-bp losses`: the tutorial's worked numbers and gradients, through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cifar_bp.config import LossConfig
from cifar_bp.losses import elements_averaged


def test_prints_the_tutorial_numbers(cli):
    result = cli("losses")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for number in ("0.6667", "1.3333", "1.1019", "[0.3006, 0.3322, 0.3672]", "−log(0.3322)",
                   "autograd [0.0000, 0.0000, -0.3333]", "autograd [0.0000, 0.0000, -1.3333]",
                   "autograd [0.3006, -0.6678, 0.3672]"):  # fmt: skip
        assert number in out, number
    assert out.count("autograd and the closed form agree") == 3
    for reduction in ("none", "mean", "sum"):
        assert out.count(f" {reduction} ") >= 3, reduction  # one row per loss


def test_json_gives_the_tutorial_numbers_to_4_decimals(cli):
    result = cli("losses", "--json")
    assert result.exit_code == 0, result.stderr
    ex = json.loads(result.stdout)
    assert round(ex["l1"]["mean"], 4) == 0.6667
    assert ex["l1"]["none"] == [0.0, 0.0, 2.0] and ex["l1"]["sum"] == 2.0
    assert round(ex["mse"]["mean"], 4) == 1.3333
    assert ex["mse"]["none"] == [0.0, 0.0, 4.0] and ex["mse"]["sum"] == 4.0
    ce = ex["ce"]
    assert [round(p, 4) for p in ce["softmax"]] == [0.3006, 0.3322, 0.3672]
    assert round(ce["p_label"], 4) == 0.3322
    assert round(ce["minus_log_p"], 4) == round(ce["mean"], 4) == 1.1019
    assert ce["none"] == [pytest.approx(ce["mean"])] and ce["sum"] == pytest.approx(ce["mean"])


def test_json_has_the_gradients_of_mean_and_sum(cli):
    ex = json.loads(cli("losses", "--json").stdout)
    expected = {"l1": [0, 0, -1 / 3], "mse": [0, 0, -4 / 3], "ce": [0.3006, -0.6678, 0.3672]}
    for name, mean in expected.items():
        grad = ex[name]["grad"]
        assert grad["mean"] == pytest.approx(mean, abs=5e-5), name
        assert ex[name]["grad_closed_form"]["mean"] == pytest.approx(grad["mean"], abs=1e-12)
        assert ex[name]["grad_agrees"] is True
    # sum is mean times what mean divides by: 3 elements (L1, MSE), 1 sample (CE)
    assert ex["l1"]["grad"]["sum"] == [0.0, 0.0, -1.0]
    assert ex["mse"]["grad"]["sum"] == [0.0, 0.0, -4.0]
    assert ex["ce"]["grad"]["sum"] == pytest.approx(ex["ce"]["grad"]["mean"])


def test_plain_cross_entropy_without_schema_smoothing(cli):
    """The config schema's label_smoothing 0.1 must not reach the tutorial's losses."""
    args = ("losses", "--logits", "2,1,0.1", "--label", "0")
    ex = json.loads(cli(*args, "--json").stdout)["ce"]
    plain = torch.nn.CrossEntropyLoss()(torch.tensor([[2.0, 1.0, 0.1]]), torch.tensor([0]))
    assert round(plain.item(), 4) == 0.4170
    for value in (ex["minus_log_p"], ex["mean"], ex["sum"], *ex["none"]):
        assert round(value, 4) == 0.4170
    out = cli(*args).stdout
    assert "−log(0.6590) = 0.4170" in out
    assert "0.5137" not in out  # what smoothing 0.1 gave
    ce_table = out[out.index("CrossEntropyLoss") :]
    assert "│ mean      │   0.4170 │" in ce_table and "│ sum       │   0.4170 │" in ce_table


def test_extreme_logits_use_log_softmax_and_strict_json(cli):
    result = cli("losses", "--logits", "800,0", "--label", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert "Infinity" not in result.stdout and "NaN" not in result.stdout

    def no_constants(name: str) -> float:
        raise AssertionError(f"non-standard JSON constant {name}")

    ex = json.loads(result.stdout, parse_constant=no_constants)["ce"]
    assert ex["minus_log_p"] == ex["mean"] == ex["sum"] == 800.0
    assert ex["exp"] == ["inf", 1.0] and ex["exp_sum"] == "inf"  # exp(800) overflows float64
    assert ex["grad"]["mean"] == pytest.approx([1.0, -1.0])
    out = cli("losses", "--logits", "800,0", "--label", "1").stdout
    assert "[inf, 1.0000]" in out  # printed, not eaten by rich as a [style] tag
    assert "= 800.0000 − 0.0000 = 800.0000" in out and "│ mean      │   800.0000 │" in out


def test_overflowing_regression_loss_is_the_string_inf(cli):
    result = cli("losses", "--json", "--input", "1e200,0", "--target", "-1e200,0")
    ex = json.loads(result.stdout)
    assert ex["mse"]["sum"] == "inf" and ex["mse"]["none"] == ["inf", 0.0]
    assert ex["l1"]["sum"] == 2e200
    assert ex["mse"]["grad"]["sum"] == [4e200, 0.0]  # the gradient is still finite


def test_sweep_shows_constant_l1_and_growing_mse_gradients(cli):
    rows = json.loads(cli("losses", "--sweep", "--json").stdout)["sweep"]
    errors = [r["error"] for r in rows]
    assert errors == sorted(errors) and len(errors) >= 5
    for r in rows:
        assert r["l1"]["loss"] == pytest.approx(r["error"])
        assert r["l1"]["grad"] == 1.0
        assert r["mse"]["loss"] == pytest.approx(r["error"] ** 2)
        assert r["mse"]["grad"] == pytest.approx(2 * r["error"])
    out = cli("losses", "--sweep").stdout
    assert "L1 ∂/∂x" in out and "MSE ∂/∂x" in out and "2·error" in out
    bad = cli("losses", "--sweep", "--logits", "1,2")
    assert bad.exit_code == 2 and "--sweep" in bad.stderr


def test_users_own_numbers(cli):
    result = cli("losses", "--json", "--input", "0,0", "--target", "1,3",
                 "--logits", "0,0", "--label", "0")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    ex = json.loads(result.stdout)
    assert ex["l1"]["mean"] == 2.0 and ex["l1"]["sum"] == 4.0
    assert ex["mse"]["mean"] == 5.0 and ex["mse"]["none"] == [1.0, 9.0]
    assert ex["ce"]["mean"] == pytest.approx(math.log(2))
    assert cli("losses", "--logits", "0,0", "--label", "1").exit_code == 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--input", "1,x", "--target", "1,2"], "--input '1,x'"),
        (["--input", "1,2,3", "--target", "1,2"], "3 numbers but --target has 2"),
        (["--input", "1,2"], "--input and --target go together"),
        (["--input", "1,nan", "--target", "1,2"], "finite numbers"),
        (["--logits", "", "--label", "0"], "--logits ''"),
        (["--label", "3"], "from 0 to 2"),
        (["--logits", "1,2", "--label", "two"], "--label 'two'"),
    ],
)
def test_bad_numbers_give_one_line_and_exit_2(cli, args, expected):
    result = cli("losses", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_elements_averaged_counts_what_mean_divides_by():
    labels = torch.tensor([5, 0, 3, 0])
    assert elements_averaged(LossConfig(name="ce"), labels) == 4
    assert elements_averaged(LossConfig(name="mse"), labels) == 40
    assert elements_averaged(LossConfig(name="l1"), labels) == 40
    weights = [1.0] * 5 + [2.5] + [1.0] * 4
    assert elements_averaged(LossConfig(name="ce", weight=weights), labels) == 5.5
    assert elements_averaged(LossConfig(name="ce", ignore_index=0), labels) == 2


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_one_logit_without_label_is_one_line_not_a_traceback(cli, json_flag):
    """The tutorial's default class 1 does not exist for a single logit."""
    result = cli("losses", "--logits", "5", *json_flag)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "error: --logits has 1 logit, so the tutorial's class 1 does not exist: give --label 0"
    )
    one = cli("losses", "--logits", "5", "--label", "1")
    assert one.exit_code == 2 and "--label 1: expected a class index 0" in one.stderr
    ex = json.loads(cli("losses", "--logits", "5", "--label", "0", "--json").stdout)["ce"]
    assert ex["softmax"] == [1.0] and ex["mean"] == 0.0


def test_a_certain_class_costs_zero_not_minus_zero(cli):
    out = cli("losses", "--logits", "40,0", "--label", "0").stdout
    assert "-0.0000" not in out
    assert "−log(1.0000) = 0.0000" in out and "40.0000 − 40.0000 = 0.0000" in out
    assert "│ none      │ [0.0000] │" in out
    text = cli("losses", "--logits", "40,0", "--label", "0", "--json").stdout
    assert "-0.0" not in text
    ex = json.loads(text)["ce"]
    for value in (ex["minus_log_p"], ex["mean"], ex["sum"], *ex["none"]):
        assert value == 0.0 and math.copysign(1.0, value) == 1.0


def test_a_tiny_loss_prints_operands_that_subtract_to_it(cli):
    """10.0000 − 10.0000 = 4.540e-05 reads as a wrong subtraction: show the digits."""
    out = cli("losses", "--logits", "10,0", "--label", "0").stdout
    assert "= 10.00004540 − 10.00000000 = 4.540e-05" in out
    assert "−log(0.99995460) = 4.540e-05" in out
    assert "= 1.3019 − 0.2000 = 1.1019" in cli("losses").stdout  # ordinary numbers: 4 decimals
