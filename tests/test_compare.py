"""`cifar-bp compare`: one run per loss × reduction, same start, one parent directory."""

from __future__ import annotations

import math

import pytest
import yaml

from tests.conftest import SMOKE, Cli, scalars

FAST = ["--config", SMOKE, "--epochs", "1", "--set", "data.train_size=128",
        "--set", "data.test_size=64", "--set", "train.batch_size=32",
        "--set", "log.every_n_steps=2"]  # fmt: skip
LABELS = ["ce-mean", "ce-sum", "l1-mean", "l1-sum", "mse-mean", "mse-sum"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("compare")
    result = Cli()("compare", *FAST, "--losses", "ce,mse,l1", "--reductions", "mean,sum",
                   "--logdir", logdir, "--run-name", "first")  # fmt: skip
    return result, logdir / "first"


def test_one_readable_event_file_per_combination(comparison):
    result, parent = comparison
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in parent.iterdir()) == LABELS
    expected = {"train/loss", "train/accuracy", "test/loss", "test/accuracy", "grad_norm/total",
                "grad_norm/model1.conv1.weight", "grad_norm/model1.linear2.bias"}  # fmt: skip
    for run in parent.iterdir():
        assert len(list(run.glob("events.out.tfevents.*"))) == 1, run
        series = scalars(run)
        assert expected <= set(series), run.name
        assert all(math.isfinite(v) for tag in expected for _, v in series[tag])


def test_runs_differ_only_in_the_loss(comparison):
    _, parent = comparison
    configs = {
        run.name: yaml.safe_load((run / "config.yaml").read_text()) for run in parent.iterdir()
    }
    for label, cfg in configs.items():
        loss, reduction = label.split("-")
        assert (cfg["loss"]["name"], cfg["loss"]["reduction"]) == (loss, reduction)
        assert cfg["log"]["logdir"] == str(parent) and cfg["log"]["run_name"] == label
    rest = [{k: v for k, v in cfg.items() if k not in ("loss", "log")} for cfg in configs.values()]
    assert all(r == rest[0] for r in rest)  # same seed: same weights and data order


def test_summary_table_and_labelled_progress(comparison):
    result, parent = comparison
    out = result.stdout
    assert "[ce-mean] run 1/6" in out and "[mse-sum] epoch 1/1" in out
    for row in ("Comparison", "final train loss", "test accuracy", "wall time",
                "mean ‖g‖ conv1.weight", "mean ‖g‖ linear2.bias", *LABELS):  # fmt: skip
        assert row in out, row
    assert str(parent) in out.replace("\n", "")


def test_same_seed_gives_the_same_final_loss(comparison, cli, tmp_path):
    _, first = comparison
    again = cli("compare", *FAST, "--losses", "ce,l1", "--reductions", "sum",
                "--logdir", tmp_path, "--run-name", "again", "-q")  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert "[ce-sum]" not in again.stdout  # --quiet: only the table
    for label in ("ce-sum", "l1-sum"):
        a, b = scalars(first / label), scalars(tmp_path / "again" / label)
        assert a["train/loss"] == b["train/loss"], label
        assert a["test/accuracy"] == b["test/accuracy"], label


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--reductions", "mean,none"], "reduction none cannot be trained"),
        (["--losses", "ce,hinge"], "--losses 'ce,hinge'"),
        (["--losses", "ce,ce"], "only once"),
        (["--set", "optim.lr=-1"], "optim.lr"),
        (["--set", "train.amp=true", "--set", "train.amp_dtype=float16"], "float16"),
        (["--run-name", "bad/name"], "run_name"),
    ],
)
def test_config_errors_stop_before_any_training(cli, tmp_path, args, expected):
    logdir = tmp_path / "runs"
    result = cli("compare", *FAST, "--logdir", logdir, *args)
    assert result.exit_code == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "run 1/" not in result.stdout
    assert not logdir.exists()  # no parent directory left behind


def test_existing_comparison_is_never_overwritten(comparison, cli):
    _, parent = comparison
    result = cli("compare", *FAST, "--logdir", parent.parent, "--run-name", parent.name)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert sorted(p.name for p in parent.iterdir()) == LABELS
