"""`cifar-bp compare`: one run per loss × reduction, same start, one parent directory."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import yaml

from cifar_bp.tracking import HPARAMS_FILE
from tests.helpers import SMOKE, Cli, scalars

FAST = ["--config", SMOKE, "--epochs", "1", "--set", "data.train_size=128",
        "--set", "data.test_size=64", "--set", "train.batch_size=32",
        "--set", "log.every_n_steps=2"]  # fmt: skip
LABELS = ["ce-mean", "ce-sum", "l1-mean", "l1-sum", "mse-mean", "mse-sum"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("compare")
    wide = Cli()
    wide.runner.env = {"COLUMNS": "200"}  # one line per table row, to read the values back
    result = wide("compare", *FAST, "--losses", "ce,mse,l1", "--reductions", "mean,sum",
                  "--logdir", logdir, "--run-name", "first")  # fmt: skip
    return result, logdir / "first"


def table_row(out: str, name: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if line.startswith(f"│ {name} ")]
    return [cell.strip() for cell in line.split("│")[2:-1]]


def test_one_readable_event_file_per_combination(comparison):
    result, parent = comparison
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in parent.iterdir()) == LABELS
    expected = {"train/loss", "train/accuracy", "test/loss", "test/accuracy", "grad_norm/total",
                "grad_norm/model1.conv1.weight", "grad_norm/model1.linear2.bias"}  # fmt: skip
    for run in parent.iterdir():
        # One file of series (DDP ranks or a rerun would add more), one of HParams.
        files = {p.name for p in run.glob("events.out.tfevents.*")}
        assert len(files - {HPARAMS_FILE}) == 1 and HPARAMS_FILE in files, files
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
    for row in ("Comparison (optimizer adam, lr 0.002)", "status", "train loss per image",
                "test accuracy", "wall time", "mean ‖g‖ conv1.weight", "mean ‖g‖ linear2.bias",
                *LABELS):  # fmt: skip
        assert row in out, row
    assert table_row(out, "status") == ["finished"] * 6
    assert str(parent) in out.replace("\n", "")


def test_losses_per_image_compare_mean_with_sum(comparison):
    """Per image: sum ÷ the batch's 32 images; mean MSE/L1 × 10 classes; mean CE as is."""
    result, parent = comparison
    header = [line for line in result.stdout.splitlines() if "ce-mean" in line and "┃" in line]
    labels = [cell.strip() for cell in header[0].split("┃")[2:-1]]
    shown = dict(zip(labels, map(float, table_row(result.stdout, "train loss per image")),
                     strict=True))  # fmt: skip
    factor = {"ce-mean": 1, "ce-sum": 1 / 32, "mse-mean": 10, "mse-sum": 1 / 32,
              "l1-mean": 10, "l1-sum": 1 / 32}  # fmt: skip
    for label, per_image in shown.items():
        last = scalars(parent / label)["train/loss"][-1][1]
        assert per_image == pytest.approx(last * factor[label], rel=1e-3), label
    # adam divides the loss's scale away: both reductions learn alike, and the note says so
    assert "adam divides each step by the gradient's own running size" in result.stdout
    assert "reduction only rescales the loss" in result.stdout
    assert (
        "sum ÷ the images summed (N = 32 a full batch)" in result.stdout
        and "MSE/L1 mean × 10" in result.stdout
    )


@pytest.mark.slow
def test_a_diverging_run_becomes_a_row_and_the_others_finish(cli, tmp_path):
    """SGD with sum takes N-times larger steps than with mean: that run diverges; the
    comparison still trains the other, writes both runs, prints the table and exits 0."""
    args = ["--config", SMOKE, "--epochs", "1", "--set", "data.train_size=128",
            "--set", "data.test_size=32", "--set", "train.batch_size=32",
            "--set", "log.every_n_steps=1", "--set", "optim.name=sgd", "--set", "optim.lr=0.1",
            "--set", "train.max_nonfinite_steps=1"]  # fmt: skip
    result = cli("compare", *args, "--losses", "ce", "--reductions", "mean,sum",
                 "--logdir", tmp_path, "--run-name", "div")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Comparison (optimizer sgd, lr 0.1)" in out
    status = table_row(out, "status")
    assert status[0] == "finished" and status[1].startswith("diverged at step ")
    step = int(status[1].removeprefix("diverged at step "))
    assert 1 <= step <= 4
    assert "[ce-sum] diverged at step" in out
    assert table_row(out, "test accuracy")[1] == "-" and table_row(out, "test accuracy")[0] != "-"
    assert "sgd's step is lr × gradient" in out
    parent = tmp_path / "div"
    assert sorted(p.name for p in parent.iterdir()) == ["ce-mean", "ce-sum"]
    assert "test/accuracy" in scalars(parent / "ce-mean")
    assert "train/loss" in scalars(parent / "ce-sum")  # its curve up to the divergence


def test_same_seed_gives_the_same_final_loss(comparison, cli, tmp_path):
    _, first = comparison
    again = cli("compare", *FAST, "--losses", "ce,l1", "--reductions", "sum",
                "--logdir", tmp_path, "--run-name", "again", "-q")  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert "[ce-sum]" not in again.stdout  # --quiet: only the table
    # The table's promise, held to: on the CPU a rerun is bitwise identical.
    assert "a rerun of any column is bitwise identical" in " ".join(again.stdout.split())
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


def test_six_runs_at_80_columns_split_into_tables_that_cut_nothing(tmp_path):
    # A process of its own: rich reads COLUMNS once, when the console is made.
    args = [*FAST, "--losses", "ce,mse,l1", "--reductions", "mean,sum", "--set", "optim.name=sgd",
            "--set", "optim.lr=0.01", "--logdir", str(tmp_path), "-q"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "cifar_bp", "compare", *map(str, args)], capture_output=True,
        text=True, env={**os.environ, "COLUMNS": "80"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "…" not in out  # rich's mark for a cell it cut short
    assert max(len(line) for line in out.splitlines() if line.startswith(("│", "┃"))) <= 80
    titles = [line.strip() for line in out.splitlines() if line.startswith("Comparison (")]
    assert len(titles) >= 2 and titles[-1].endswith("of 6")
    header = " ".join(line for line in out.splitlines() if line.startswith("┃"))
    assert all(f" {label} " in header for label in LABELS)
    assert "mean ‖g‖ linear1.weight" in out
