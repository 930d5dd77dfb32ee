"""`cifar-bp losses`: the tutorial's worked numbers, computed live by the loss factory."""

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
    for number in ("0.6667", "1.3333", "1.1019", "[0.3006, 0.3322, 0.3672]", "−log(0.3322)"):
        assert number in out, number
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
