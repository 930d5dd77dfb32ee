"""`cifar-bp inspect-grads`: .grad before and after backward, through the real CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar_bp.config import ModelConfig
from cifar_bp.grads import checksum
from cifar_bp.model import build_model
from tests.helpers import ROOT, SMOKE, only_run, scalars

TINY = ["--config", SMOKE, "--set", "data.train_size=64", "--set", "data.test_size=16"]
PARAMS = [f"model1.{layer}.{kind}" for layer in ("conv1", "conv2", "conv3", "linear1", "linear2")
          for kind in ("weight", "bias")]  # fmt: skip


def inspect_json(cli, *args: str) -> dict:
    result = cli("inspect-grads", *TINY, "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def by_reduction():
    """`--loss all` on a batch of 4, once per reduction (same batch and weights each time)."""
    from tests.helpers import Cli

    cli = Cli()
    return {r: inspect_json(cli, "--loss", "all", "--batch-size", "4", "--reduction", r)
            for r in ("mean", "sum", "none")}  # fmt: skip


def test_grad_is_none_before_and_finite_after(by_reduction):
    for out in by_reduction.values():
        assert [p["loss"] for p in out["passes"]] == ["ce", "mse", "l1"]
        for p in out["passes"]:
            assert [b["name"] for b in p["before"]] == PARAMS
            assert all(b["grad"] is None and b["requires_grad"] for b in p["before"])
            assert [a["name"] for a in p["after"]] == PARAMS
            for a in p["after"]:
                stats = (a["norm"], a["mean"], a["std"], a["max_abs"], a["grad_to_weight"])
                assert all(math.isfinite(v) for v in stats), a
                assert a["norm"] > 0, a["name"]
            assert p["total_norm"] == pytest.approx(
                math.sqrt(sum(a["norm"] ** 2 for a in p["after"])), rel=1e-9
            )


def test_loss_all_starts_from_identical_weights(by_reduction):
    out = by_reduction["mean"]
    sums = {p["checksum"] for r in by_reduction.values() for p in r["passes"]}
    assert len(sums) == 1
    # ...and they are the weights `train` starts from: seeded by train.seed, then built.
    torch.manual_seed(0)
    fresh = build_model(ModelConfig(channels_last=False))
    assert sums == {checksum(fresh.model1.conv1.weight)}
    assert out["model"].startswith("fresh") and out["batch_size"] == 4


@pytest.mark.parametrize("loss, factor", [("ce", 4), ("mse", 40), ("l1", 40)])
def test_sum_gradients_are_mean_gradients_times_the_averaged_count(by_reduction, loss, factor):
    mean, total = ({p["loss"]: p for p in by_reduction[r]["passes"]} for r in ("mean", "sum"))
    for m, s in zip(mean[loss]["after"], total[loss]["after"], strict=True):
        assert s["norm"] / m["norm"] == pytest.approx(factor, rel=1e-5), m["name"]
    (check,) = [f for f in by_reduction["mean"]["factors"] if f["loss"] == loss]
    assert check["expected"] == factor
    assert check["measured"] == pytest.approx(factor, rel=1e-5)
    assert check["max_rel_error"] < 1e-5


def test_reduction_none_backward_with_ones_equals_sum(by_reduction, cli):
    none, total = ({p["loss"]: p for p in by_reduction[r]["passes"]} for r in ("none", "sum"))
    assert none["ce"]["loss_shape"] == [4] and none["mse"]["loss_shape"] == [4, 10]
    for loss, p in none.items():
        assert p["loss_value"] is None and "ones_like" in p["backward_call"]
        assert p["loss_summary"]["sum"] == pytest.approx(total[loss]["loss_value"], rel=1e-5)
        assert p["total_norm"] == pytest.approx(total[loss]["total_norm"], rel=1e-5)
    shown = cli("inspect-grads", *TINY, "--reduction", "none", "--loss", "mse", "--batch-size", "2")
    assert "backward(gradient=torch.ones_like(loss))" in shown.stdout
    assert "a 2×10 tensor" in shown.stdout


def test_class_weights_change_what_mean_divides_by(cli):
    weights = [1.0] * 10
    out = inspect_json(cli, "--batch-size", "4", "--set", f"loss.weight={weights}")
    labels = out["labels"]
    weights[labels[0]] = 3.0
    out = inspect_json(cli, "--batch-size", "4", "--set", f"loss.weight={weights}")
    (check,) = out["factors"]
    expected = sum(weights[c] for c in labels)
    assert check["expected"] == expected != len(labels)
    assert check["measured"] == pytest.approx(expected, rel=1e-5)


def test_tables_show_before_after_and_factor(cli):
    result = cli("inspect-grads", *TINY)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Before backward" in out and "None" in out and "After loss.backward()" in out
    assert "model1.linear2.bias" in out and "N = 64" in out  # the default batch: 64
    assert "checksum" not in out
    side = cli("inspect-grads", *TINY, "--loss", "all", "--batch-size", "4").stdout
    assert "‖g‖ ce" in side and "‖g‖ mse" in side and "‖g‖ l1" in side and "N·C = 4·10" in side
    assert "checksum" not in side and "the same for every loss" in side.replace("\n", " ")


def test_default_batch_is_the_tutorials_64_and_1_is_the_seed_demo(cli):
    assert inspect_json(cli)["batch_size"] == 64
    one = inspect_json(cli, "--batch-size", "1")
    assert one["batch_size"] == 1 and len(one["labels"]) == 1
    (check,) = one["factors"]
    assert check["expected"] == 1  # with one image, sum and mean coincide: nothing to see
    help_text = cli("inspect-grads", "--help").stdout
    assert "--batch-size" in help_text and "seed's" in help_text


def at_80_columns(*args: str):
    from typer.testing import CliRunner

    from cifar_bp.cli import app

    result = CliRunner().invoke(app, ["inspect-grads", *TINY, *args], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("args", [[], ["--loss", "all"], ["--param", "model1.linear1.weight"]])
def test_full_names_and_numbers_at_80_columns(args):
    out = at_80_columns("--batch-size", "4", *args)
    rows = [line for line in out.splitlines() if line.startswith(("│", "┃", "┏", "└"))]
    assert rows and max(map(len, rows)) <= 80
    assert not any("…" in row for row in rows), [r for r in rows if "…" in r]
    for name in PARAMS:  # in full, in a table cell, in every parameter table
        assert sum(f"│ {name} " in row for row in rows) >= 2, name
    assert "‖g‖" in out and ("‖g‖/‖w‖" in out or "‖g‖ mse" in out)


def test_header_names_every_setting_that_is_not_the_plain_loss(cli):
    smoothed = cli("inspect-grads", *TINY, "--batch-size", "4",
                   "--set", "loss.label_smoothing=0.1").stdout  # fmt: skip
    assert "label_smoothing 0.1" in smoothed  # a non-default setting, made visible
    plain = cli("inspect-grads", *TINY, "--batch-size", "4",
                "--set", "loss.label_smoothing=0").stdout  # fmt: skip
    assert "plain torch.nn loss" in plain and "label_smoothing" not in plain
    weights = [1.0] * 9 + [2.0]
    custom = cli("inspect-grads", *TINY, "--batch-size", "4", "--loss", "all",
                 "--set", f"loss.weight={weights}", "--set", "loss.ignore_index=7",
                 "--set", "loss.input=logits").stdout  # fmt: skip
    header = custom[: custom.index("Before backward")]
    assert "class weights [1, 1, 1, 1, 1, 1, 1, 1, 1, 2]" in header
    assert "ignore_index 7" in header
    assert header.count("input logits: the raw logits against one-hot targets") == 2
    passes = inspect_json(cli, "--batch-size", "4", "--set", "loss.input=logits",
                          "--loss", "mse")["passes"]  # fmt: skip
    assert passes[0]["settings"] == ["input logits: the raw logits against one-hot targets"]


def test_logit_gradients_are_softmax_minus_one_hot(cli):
    """dL/dlogits of the first images: with plain CE and sum, exactly softmax − one-hot."""
    from cifar_bp import grads
    from cifar_bp.config import resolve_config

    sets = ["--set", "loss.label_smoothing=0", "--batch-size", "4"]
    out = inspect_json(cli, *sets, "--reduction", "sum")
    (p,) = out["passes"]
    assert len(p["logit_grads"]) == 3 and all(len(g) == 10 for g in p["logit_grads"])
    tiny = ["data.train_size=64", "data.test_size=16", "loss.label_smoothing=0"]
    cfg = resolve_config(SMOKE, {"batch_size": 4}, tiny)
    model, _ = grads.make_model(cfg, torch.device("cpu"), None, None)
    images, labels, _, _ = grads.first_batch(cfg, torch.device("cpu"))
    assert labels.tolist() == out["labels"]
    with torch.no_grad():
        expected = model(images).softmax(1) - torch.nn.functional.one_hot(labels, 10)
    assert torch.tensor(p["logit_grads"]) == pytest.approx(expected[:3], abs=1e-6)
    mean = inspect_json(cli, *sets, "--reduction", "mean")["passes"][0]["logit_grads"]
    assert torch.tensor(mean) * 4 == pytest.approx(expected[:3], abs=1e-6)
    shown = cli("inspect-grads", *TINY, *sets).stdout
    assert "∂L/∂logits of the first 3 images" in shown and "softmax − one-hot" in shown


def test_json_is_strict(cli):
    result = cli("inspect-grads", *TINY, "--batch-size", "4", "--json",
                 "--set", "loss.label_smoothing=0")  # fmt: skip

    def no_constants(name: str) -> float:
        raise AssertionError(name)

    assert json.loads(result.stdout, parse_constant=no_constants)["batch_size"] == 4


def test_missing_data_falls_back_to_synthetic_and_says_so(cli, tmp_path):
    args = ["--set", f"data.root={tmp_path}", "--set", "data.download=true", "--batch-size", "4"]
    result = cli("inspect-grads", *args)
    assert result.exit_code == 0, result.stderr
    assert "note: CIFAR-10 not found" in result.stdout and "synthetic" in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded
    as_json = cli("inspect-grads", *args, "--json")
    assert "note: CIFAR-10 not found" in as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["data"].startswith("synthetic") and out["notes"]


def test_checkpoint_and_param_values(cli, tmp_path):
    trained = cli("train", *TINY, "--epochs", "1", "--batch-size", "16", "--logdir", tmp_path, "-q")
    assert trained.exit_code == 0, trained.stderr
    run_dir = only_run(tmp_path)
    result = cli("inspect-grads", "--checkpoint", run_dir, "--param", "model1.conv1.weight",
                 "--batch-size", "4")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert f"checkpoint {run_dir / 'last.pt'}" in result.stdout.replace("\n", "")
    assert "model1.conv1.weight.grad[0, 0]: the first 5×5 kernel" in result.stdout
    out = json.loads(cli("inspect-grads", "--checkpoint", run_dir, "--json", "--batch-size", "4",
                         "--param", "model1.conv1.weight").stdout)  # fmt: skip
    values = out["values"]["ce"]
    assert len(values) == 5 and all(len(row) == 5 for row in values)
    weights = torch.load(run_dir / "last.pt", weights_only=True)["model"]["model1.conv1.weight"]
    assert out["passes"][0]["checksum"] == checksum(weights)  # the trained weights, not fresh
    assert out["data"] == "synthetic"  # the checkpoint's own config chose the data
    bias = inspect_json(cli, "--param", "model1.linear2.bias", "--batch-size", "4")
    assert [len(row) for row in bias["values"]["ce"]] == [5, 5]


def test_logdir_writes_readable_tensorboard(cli, tmp_path):
    result = cli("inspect-grads", *TINY, "--loss", "all", "--logdir", tmp_path, "--batch-size", "4")
    assert result.exit_code == 0, result.stderr
    parent = only_run(tmp_path)
    assert sorted(p.name for p in parent.iterdir()) == ["ce-mean", "l1-mean", "mse-mean"]
    for run in parent.iterdir():
        series = scalars(run)
        assert {f"grad_norm/{n}" for n in PARAMS} | {"grad_norm/total", "loss"} <= set(series)
        assert all(math.isfinite(v) and v > 0 for v in (series["grad_norm/total"][0][1],))
        acc = EventAccumulator(str(run), size_guidance={"histograms": 0})
        acc.Reload()
        assert {f"grads/{n}" for n in PARAMS} <= set(acc.Tags()["histograms"])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--loss", "hinge"], "--loss 'hinge': choose ce, mse, l1 or all"),
        (["--param", "conv1.weight"], "model1.conv1.weight"),
        (["--reduction", "avg"], "loss.reduction"),
        (["--checkpoint", "nowhere.pt"], "checkpoint not found"),
    ],
)
def test_mistakes_are_one_line(cli, args, expected):
    result = cli("inspect-grads", *TINY, *args)
    assert result.exit_code in (1, 2)
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")
def test_logdir_that_cannot_be_created_fails_before_the_inspection(cli, tmp_path):
    """/proc takes no new folders (even from root, whom os.access lets through)."""
    for json_flag in ([], ["--json"]):
        result = cli("inspect-grads", *TINY, "--batch-size", "4", "--logdir", "/proc/x", *json_flag)
        assert result.exit_code in (1, 2) and result.stdout == ""  # nothing inspected
        assert result.stderr.startswith("error: ") and "/proc/x" in result.stderr
        assert "cannot" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # a folder created up front is removed again when the inspection then fails
    failed = cli("inspect-grads", *TINY, "--logdir", tmp_path / "tb", "--param", "nope")
    assert failed.exit_code == 2 and list((tmp_path / "tb").iterdir()) == []


def test_batch_larger_than_the_data_is_said_and_a_huge_one_refused(cli, tmp_path):
    out = inspect_json(cli, "--batch-size", "5000")
    assert out["batch_size"] == 64 and out["notes"] == [
        "batch of 64: the training set has only 64 images (asked for 5000)"
    ]
    shown = cli("inspect-grads", *TINY, "--batch-size", "5000").stdout
    assert "note: batch of 64: the training set has only 64 images (asked for 5000)" in shown
    fallback = ["--set", f"data.root={tmp_path}", "--set", "data.source=cifar10"]
    for args in (TINY, fallback):  # synthetic fallback: refused before generating anything
        huge = cli("inspect-grads", *args, "--batch-size", "100000000")
        assert huge.exit_code == 2 and huge.stderr.strip() == (
            "error: --batch-size 100000000: inspect-grads takes at most 8,192 images "
            "(the whole batch goes through backward at once)"
        )


def test_mse_and_l1_say_they_ignore_cross_entropy_settings(cli):
    default = ["--config", ROOT / "configs" / "default.yaml", "--set", "data.source=synthetic",
               "--set", "data.train_size=64", "--set", "data.test_size=16"]  # fmt: skip
    out = cli("inspect-grads", *default, "--batch-size", "4", "--loss", "all").stdout
    header = out[: out.index("Before backward")]
    lines = [line for line in header.splitlines() if line.startswith("loss:")]
    assert "label_smoothing 0.1 (plain CrossEntropyLoss: 0)" in lines[0]
    for line in lines[1:]:
        assert line.endswith("; ignores label_smoothing 0.1 (cross-entropy settings)"), line
    as_json = json.loads(cli("inspect-grads", *default, "--batch-size", "4", "--loss", "mse",
                             "--json").stdout)  # fmt: skip
    assert as_json["passes"][0]["settings"][-1] == (
        "ignores label_smoothing 0.1 (cross-entropy settings)"
    )


def at_60_columns(*args: str) -> str:
    """A subprocess: rich reads COLUMNS once, when the console is created."""
    command = [sys.executable, "-m", "cifar_bp", "inspect-grads", *map(str, TINY), *args]
    done = subprocess.run(command, env={**os.environ, "COLUMNS": "60"}, capture_output=True,
                          text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "args, headers",
    [(["--param", "model1.linear1.weight"],  # before, after, values, logits, sum vs mean
      ["requires_grad", "‖g‖/‖w‖", "zeros", "max |g|", "‖g_sum‖/‖g_mean‖", "max rel. err"]),
     (["--loss", "all"], ["‖g‖ ce", "‖g‖ mse", "‖g‖ l1"])],  # the norms side by side
)  # fmt: skip
def test_nothing_is_cut_at_60_columns(cli, args, headers):
    out = at_60_columns("--batch-size", "4", *args)
    assert "…" not in out, [line for line in out.splitlines() if "…" in line]
    boxes = [line for line in out.splitlines() if line[:1] in "│┃┏┡└┌"]
    assert max(len(line.rstrip()) for line in boxes) <= 60
    assert [h for h in headers if f" {h} ┃" not in out] == []  # each whole, on one line
    found = inspect_json(cli, "--batch-size", "4", *args)
    numbers = [f"{f['measured']:.6g}" for f in found["factors"]]
    for p in found["passes"]:
        numbers += [f"{s['norm']:.4g}" for s in p["after"]] + [f"{p['total_norm']:.4g}"]
        numbers += [f"{s['mean']:.4g}" for s in p["after"]] * (len(found["passes"]) == 1)
    for rows in found["values"].values():
        numbers += [f"{v:+.3e}" for row in rows for v in row]
    assert [n for n in numbers if n not in cells_of(boxes)] == []
    for name in PARAMS:
        assert sum(f"│ {name} " in line for line in boxes) >= 2, name


def cells_of(lines: list[str]) -> set[str]:
    return {cell.strip() for line in lines for cell in line.split("│")}


def test_check_table_is_split_not_cut_when_narrow():
    """--check's table at 60 columns (its finite differences are too slow for a subprocess)."""
    from rich.console import Console

    from cifar_bp.gradcheck import GradCheck, ParamCheck
    from cifar_bp.grads_view import check_table

    params = [ParamCheck(name, 3, 1.3e-7, [0], -7.21065e-06 * (i + 1), -7.21066e-06 * (i + 1))
              for i, name in enumerate(PARAMS)]  # fmt: skip
    shown = check_table(GradCheck("mse", "mean", 4, 1e-6, 1e-3, params))
    narrow = Console(width=60, record=True, markup=False)
    narrow.print(shown)  # the console it prints on decides the split
    lines = narrow.export_text().splitlines()
    assert len(shown.parts(60)) == 2 and max(len(line.rstrip()) for line in lines) <= 60
    assert "…" not in "\n".join(lines)
    cells = cells_of(lines)
    assert {"-7.21065e-06", "-7.21066e-05", "1.3e-07"} <= cells and set(PARAMS) <= cells
    assert all(f" {h} ┃" in "\n".join(lines) for h in ("autograd", "finite diff.", "max rel. err"))
    assert len(shown.parts(120)) == 1  # room enough: one table, as before
