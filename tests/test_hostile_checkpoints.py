"""A checkpoint damaged in one key: every command that reads one (resume, evaluate, predict,
export, inspect-grads) says so in one line naming the file and the key, exits 1, and
changes nothing. The checkpoints are a real tiny run's, each edited in one place."""

from __future__ import annotations

import copy
import datetime
import math
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from cifar_bp import checkpoint as ckpt
from cifar_bp.errors import CliError
from tests.helpers import SMOKE, train_run

TINY = ["--config", str(SMOKE), "-q", "--set", "data.train_size=128",
        "--set", "data.test_size=64", "--set", "train.ema_decay=0.9"]  # fmt: skip
ELSEWHERE = "use another checkpoint or start a new run"
ON_RESUME = "resume from another checkpoint or start a new run"
CONV = "model1.conv1.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """last.pt of a one-epoch smoke run that keeps a weight average."""
    return train_run(tmp_path_factory.mktemp("good"), "good", *TINY, "--epochs", "1") / "last.pt"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "grey.png"
    Image.new("RGB", (32, 32), (128, 128, 128)).save(path)
    return path


def edited(good: Path, where: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of the good checkpoint with `edit` applied, as the last.pt of its own folder."""
    payload = copy.deepcopy(torch.load(good, weights_only=True))
    edit(payload)
    where.mkdir(parents=True)
    torch.save(payload, where / "last.pt")
    return where / "last.pt"


def put(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(payload: dict[str, Any]) -> None:
        node = payload
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(payload: dict[str, Any]) -> None:
        node = payload
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return edit


def poison(part: str, *keys: Any) -> Callable[[dict[str, Any]], None]:
    """Fill one float tensor with NaN."""

    def edit(payload: dict[str, Any]) -> None:
        node = payload[part]
        for key in keys:
            node = node[key]
        node.fill_(math.nan)

    return edit


# (id, edit, what the line says after "FILE: the checkpoint is damaged: ")
CASES = [
    # 1. The payload's types.
    ("epoch-text", put("epoch", value="1"), "epoch must be a whole number, 0 or more (got '1')"),
    ("epoch-float", put("epoch", value=1.5), "epoch must be a whole number, 0 or more (got 1.5)"),
    ("epoch-negative", put("epoch", value=-3),
     "epoch must be a whole number, 0 or more (got -3)"),
    ("epoch-bool", put("epoch", value=True),
     "epoch must be a whole number, 0 or more (got True)"),
    ("step-negative", put("step_in_epoch", value=-5),
     "step_in_epoch must be a whole number, 0 or more (got -5)"),
    ("global-step-text", put("global_step", value="x"),
     "global_step must be a whole number, 0 or more (got 'x')"),
    ("world-size-zero", put("world_size", value=0),
     "world_size must be a whole number, 1 or more (got 0)"),
    ("schedule-steps-text", put("schedule_steps", value="9"),
     "schedule_steps must be a whole number, 1 or more (got '9')"),
    ("elapsed-text", put("elapsed", value="x"),
     "elapsed must be a number of seconds, 0 or more (got 'x')"),
    ("elapsed-negative", put("elapsed", value=-1.0),
     "elapsed must be a number of seconds, 0 or more (got -1.0)"),
    ("elapsed-nan", put("elapsed", value=math.nan),
     "elapsed must be a number of seconds, 0 or more (got nan)"),
    ("best-text", put("best_metric", value="x"), "best_metric must be a number (got 'x')"),
    ("classes-int", put("classes", value=5), "classes must be a list of class names (got 5)"),
    ("classes-text", put("classes", value="abc"),
     "classes must be a list of class names (got 'abc')"),
    ("classes-numbers", put("classes", value=[1, 2]),
     "classes must be a list of class names (got [1, 2])"),
    ("meters-text", put("meters", value="x"),
     "meters must be a mapping of names to one-number tensors (got 'x')"),
    ("meters-shape", put("meters", "loss_sum", value=torch.zeros(5)),
     "meters must be a mapping of names to one-number tensors (got a mapping of 11 key(s))"),
    ("optimizer-text", put("optimizer", value="x"), "optimizer must be a mapping (got 'x')"),
    ("optimizer-state-list", put("optimizer", "state", value=[]),
     "optimizer.state must be a mapping of mappings (got [])"),
    ("optimizer-no-groups", drop("optimizer", "param_groups"),
     "optimizer.param_groups must be a list of mappings (got None)"),
    ("scheduler-text", put("scheduler", value="x"), "scheduler must be a mapping (got 'x')"),
    ("scaler-text-scale", put("scaler", value={"scale": "x"}),
     "scaler must be a mapping of numbers (got {'scale': 'x'})"),
    ("average-no-updates", drop("average", "updates"),
     "average.updates must be a whole number, 0 or more (got None)"),
    ("rng-none", put("rng", value=None), "rng must be a mapping (got None)"),
    ("rng-no-torch", drop("rng", "torch"),
     "rng.torch must be a random generator's state, a uint8 tensor (got None)"),
    ("rng-float", put("rng", "torch", value=torch.zeros(5)),
     "rng.torch must be a random generator's state, a uint8 tensor "
     "(got a float32 tensor of shape [5])"),
    ("run-id-int", put("run_id", value=5), "run_id must be text (got 5)"),
    ("identity-list", put("data_identity", value=[1]), "data_identity must be text (got [1])"),
    ("config-text", put("config", value="abc"), "config must be a mapping (got 'abc')"),
    # 5. The format version's type.
    ("format-text", put("format_version", value="2"),
     "format_version must be a whole number (got '2')"),
    ("format-list", put("format_version", value=[2]),
     "format_version must be a whole number (got [2])"),
    # 2. Non-finite weights, weight average, optimizer state.
    ("nan-weights", poison("model", CONV), f"model.{CONV} holds inf/NaN values"),
    ("nan-average", poison("average", "weights", CONV),
     f"average.weights.{CONV} holds inf/NaN values"),
    ("nan-optimizer", poison("optimizer", "state", 0, "exp_avg"),
     "optimizer.state.0.exp_avg holds inf/NaN values"),
    ("nan-best", put("best_metric", value=math.nan), "best_metric holds inf/NaN values"),
    # 3 and 6. The checkpoint's own config: damaged file, exit 1, whichever command.
    ("config-activation", put("config", "model", "activation", value="gelu"),
     "its config: model.activation: must be 'none' or 'relu' (got 'gelu')"),
    ("config-train-text", put("config", "train", value="x"),
     "its config: train: must be a mapping of keys (got 'x')"),
    ("config-lr-nan", put("config", "optim", "lr", value=math.nan),
     "its config: optim.lr: must be a finite number (got nan)"),
    ("config-mean-text", put("config", "data", "mean", value="ab"),
     "its config: data.mean: must be a valid tuple (got 'ab')"),
    ("config-model-list", put("config", "model", value=[1]),
     "its config: model: must be a mapping of keys (got [1])"),
]  # fmt: skip
COMMANDS = ["resume", "evaluate", "predict", "export", "inspect-grads"]


def run(cli, command: str, path: Path, image: Path):
    if command == "resume":
        return cli("train", "--resume", path.parent, "--epochs", "2")
    if command == "predict":
        return cli("predict", image, "--checkpoint", path)
    return cli(command, "--checkpoint", path)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("edit", "problem"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_damaged_checkpoint_is_one_line_naming_file_and_key(
    cli, good, image, tmp_path, command, edit, problem
):
    path = edited(good, tmp_path / "run", edit)
    before = snapshot(tmp_path)
    result = run(cli, command, path, image)
    assert result.exit_code == 1, result.stderr
    assert result.stderr == f"error: {path}: the checkpoint is damaged: {problem}; {ELSEWHERE}\n"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_the_good_checkpoint_passes_the_checks(cli, good, image, command):
    result = run(cli, command, good, image)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""


def test_resume_of_the_good_checkpoint_trains_on(cli, good, tmp_path):
    path = edited(good, tmp_path / "run", lambda payload: None)
    result = cli("train", "--resume", path.parent, "--epochs", "2")
    assert result.exit_code == 0, result.stderr
    assert ckpt.facts_of(ckpt.load_checkpoint(path)).epoch == 2


def misfit_optimizer(payload: dict[str, Any]) -> None:
    payload["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2)


def test_resume_refuses_optimizer_state_that_does_not_fit_before_training(cli, good, tmp_path):
    path = edited(good, tmp_path / "run", misfit_optimizer)
    before = snapshot(tmp_path)
    result = cli("train", "--resume", path.parent, "--epochs", "2")
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    # The file's name comes from the caller of restore (setup.resume_state).
    assert lines[0] == (
        f"error: {path}: the checkpoint is damaged: its optimizer state exp_avg for {CONV} has "
        f"shape [2], the parameter [32, 3, 5, 5]; {ON_RESUME}"
    )
    assert snapshot(tmp_path) == before


@pytest.fixture
def machinery(good):
    """A run's model and optimizer built from the good checkpoint's config, as resume does."""
    from cifar_bp.distributed import world_from_env
    from cifar_bp.engine import Meters
    from cifar_bp.hardware import choose_hardware
    from cifar_bp.setup import build_machinery

    cfg = ckpt.run_config(ckpt.load_checkpoint(good), good)
    world = world_from_env()
    m = build_machinery(cfg, choose_hardware(cfg, world), world, 2)
    return m, Meters(m.device)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (misfit_optimizer, f"the checkpoint is damaged: its optimizer state exp_avg for {CONV} "
                           f"has shape [2], the parameter [32, 3, 5, 5]; {ON_RESUME}"),
        (drop("optimizer"), f"the checkpoint is damaged: it lacks optimizer; {ON_RESUME}"),
        (drop("rng"), f"the checkpoint is damaged: it lacks rng; {ON_RESUME}"),
        (put("model", "foo", value=torch.zeros(1)),
         "its tensors do not fit the model: Unexpected key(s) in state_dict: \"foo\"."),
    ],
    ids=["optimizer-shape", "no-optimizer", "no-rng", "extra-weight"],
)  # fmt: skip
def test_restore_names_the_real_file(good, tmp_path, machinery, edit, problem):
    path = edited(good, tmp_path / "run", edit)
    payload = torch.load(path, weights_only=True)
    with pytest.raises(CliError) as caught:
        ckpt.restore(payload, *machinery, True, True, path)
    assert str(caught.value) == f"{path}: {problem}"
    assert caught.value.exit_code == 1


def test_restore_without_a_path_keeps_its_old_name(good, machinery):
    payload = torch.load(good, weights_only=True)
    misfit_optimizer(payload)
    with pytest.raises(CliError, match=r"^checkpoint: the checkpoint is damaged: its optimizer"):
        ckpt.restore(payload, *machinery, True, True)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_plain_pickle_is_one_line_without_torch_s_warning(cli, tmp_path, image, command):
    # A pickle that is no torch.save file: torch warns about its protocol, then refuses it.
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    stamp = {"format_version": 2, "when": datetime.date(2026, 1, 1)}
    path.write_bytes(pickle.dumps(stamp, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(cli, command, path, image)
    assert [str(w.message) for w in caught if "pickle" in str(w.message)] == []
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {path} is not a readable checkpoint: it holds Python objects besides tensors "
        "and plain values, so cifar-bp did not write it, and loading it could run code\n"
    )
