"""Hostile configs (issue 14, class 5): every nonsense value is refused before anything runs,
with exit 2 and one line '<where>: <key>: <what is accepted> (got X)', where <where> is the
file, the named flag or the `--set` item that gave the value."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SMOKE

ZEROS = "[" + ", ".join(["0"] * 10) + "]"
ONES_BUT = "[1, 1, 1, 1, 1, 1, 1, 1, 1, {}]"


def refused(result, where: str, text: str) -> str:
    """Exit 2, one 'error: <where>: ...' line holding `text`, no traceback."""
    err = result.stderr
    assert result.exit_code == 2, (result.exit_code, err, result.stdout)
    assert "Traceback" not in err + result.stdout
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {where}: "), err
    assert text in err, err
    return err


# (id, `--set` item, expected text): the line must start with "error: --set <item>: ".
SET_CASES = [
    ("lr-inf", "optim.lr=.inf", "optim.lr: must be a finite number (got inf)"),
    ("lr-overflow", "optim.lr=1e400", "optim.lr: must be a finite number (got inf)"),
    ("lr-bool", "optim.lr=true", "optim.lr: must be a valid number (got True)"),
    ("mean-nan", "data.mean=[0.5, .nan, 0.5]", "data.mean[1]: must be a finite number (got nan)"),
    ("mean-0-255-scale", "data.mean=[125.3, 123.0, 113.9]", "data.mean[0]: must be less than"),
    ("mean-bool", "data.mean=[true, 0.5, 0.5]", "data.mean[0]: must be a valid number (got True)"),
    ("mean-two-values", "data.mean=[0.5, 0.5]", "data.mean[2]: is missing"),
    ("std-inf", "data.std=[.inf, 0.2, 0.2]", "data.std[0]: must be a finite number"),
    ("std-zero", "data.std=[0.2, 0, 0.2]", "data.std: every std must be > 0"),
    ("beta2-one", "optim.betas=[0.9, 1.0]", "optim.betas[1]: must be less than 1 (got 1.0)"),
    ("beta1-above-one", "optim.betas=[1.5, 0.9]", "optim.betas[0]: must be less than 1"),
    ("beta1-negative", "optim.betas=[-0.1, 0.9]", "optim.betas[0]: must be greater than or equal"),
    ("beta-nan", "optim.betas=[.nan, 0.9]", "optim.betas[0]: must be a finite number"),
    ("weights-all-zero", f"loss.weight={ZEROS}", "loss.weight: weight needs 10 numbers >= 0"),
    ("weight-nan", "loss.weight=" + ONES_BUT.format(".nan"), "loss.weight[9]: must be a finite"),
    ("weight-inf", "loss.weight=" + ONES_BUT.format(".inf"), "loss.weight[9]: must be a finite"),
    ("weight-negative", "loss.weight=" + ONES_BUT.format("-1"), "weight needs 10 numbers >= 0"),
    ("weight-bool", "loss.weight=" + ONES_BUT.format("true"), "loss.weight[9]: must be a valid"),
    ("grad-clip-inf", "optim.grad_clip=.inf", "optim.grad_clip: must be a finite number"),
    ("init-scale-nan", "train.init_scale=.nan", "train.init_scale: must be a finite number"),
    ("ema-nan", "train.ema_decay=.nan", "train.ema_decay: must be a finite number"),
    ("weight-decay-inf", "optim.weight_decay=.inf", "optim.weight_decay: must be a finite"),
    ("momentum-nan", "optim.momentum=.nan", "optim.momentum: must be a finite number"),
    ("smoothing-nan", "loss.label_smoothing=.nan", "loss.label_smoothing: must be a finite"),
    ("warmup-inf", "optim.warmup_pct=.inf", "optim.warmup_pct: must be a finite number"),
    ("epochs-bool", "train.epochs=true", "train.epochs: must be a valid integer (got True)"),
    ("epochs-fraction", "train.epochs=2.5", "train.epochs: must be a valid integer (got 2.5)"),
    ("batch-bool", "train.batch_size=false", "train.batch_size: must be a valid integer"),
    ("train-size-bool", "data.train_size=true", "data.train_size: must be a valid integer"),
    ("seed-bool", "train.seed=true", "train.seed: must be a valid integer"),
    ("flip-number", "train.eval_flip=1", "train.eval_flip: must be a valid boolean (got 1)"),
    ("amp-number", "train.amp=3", "train.amp: must be 'auto' or a valid boolean (got 3)"),
    ("flip-word", "data.augment.flip=sometimes", "data.augment.flip: must be 'alternate' or a"),
    ("shift-too-far", "train.eval_shift=17", "train.eval_shift: must be less than or equal to 16"),
    ("shift-bool", "train.eval_shift=true", "train.eval_shift: must be a valid integer"),
    ("unknown-key", "train.bogus=1", "unknown key 'train.bogus' (known here: epochs"),
    ("unknown-section", "bogus.x=1", "unknown key 'bogus' (known here: data, model"),
    ("key-below-a-value", "train.epochs.x=1", "train.epochs: holds a value, not keys (got 3)"),
    ("duplicate-key", "data.augment={flip: true, flip: false}", "data.augment.flip: a key may"),
    ("init-scale-past-float32", "train.init_scale=1e39", "train.init_scale: init_scale must be at"),
    ("device-as-mapping", "train.device=cuda:", "train.device: device must be auto, cpu, cuda"),
    ("device-number", "train.device=0", "train.device: device must be auto, cpu, cuda or cuda:N"),
    ("empty-logdir", "log.logdir=''", "log.logdir: must have at least 1 character"),
    ("long-folder-name", "log.logdir=runs/" + "x" * 256, "log.logdir: has a path component longer"),
    ("nul-in-root", 'data.root="a\\0b"', "data.root: must not contain a NUL character"),
]

# (id, named flags, expected text): the line must start with "error: <first flag>: ".
FLAG_CASES = [
    ("lr-inf", ["--lr", "inf"], "optim.lr: must be a finite number (got inf)"),
    ("lr-nan", ["--lr", "nan"], "optim.lr: must be a finite number (got nan)"),
    ("lr-minus-inf", ["--lr", "-inf"], "optim.lr: must be a finite number (got -inf)"),
    ("seed-huge", ["--seed", str(10**30)], "train.seed: must be less than or equal to"),
    ("run-name-300", ["--run-name", "r" * 300], "log.run_name: must have at most 200 characters"),
]


@pytest.mark.parametrize(("item", "text"), [pytest.param(*c[1:], id=c[0]) for c in SET_CASES])
def test_set_mistakes_are_blamed_on_the_set(cli, item, text):
    err = refused(cli("config", "show", "-c", SMOKE, "--set", item), f"--set {item}", text)
    assert str(SMOKE) not in err  # never on the file


@pytest.mark.parametrize(("args", "text"), [pytest.param(*c[1:], id=c[0]) for c in FLAG_CASES])
def test_flag_mistakes_are_blamed_on_the_flag(cli, args, text):
    err = refused(cli("config", "show", "-c", SMOKE, *args), args[0], text)
    assert str(SMOKE) not in err


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_nesterov_without_momentum_is_blamed_on_the_last_of_the_two(cli, optimizer):
    # smoke.yaml trains with Adam, which uses neither: only SGD and Muon are held to it.
    args = ["--set", f"optim.name={optimizer}", "--set", "optim.momentum=0"]
    refused(cli("config", "show", "-c", SMOKE, *args), "--set optim.momentum=0", "nesterov needs")
    args = ["--set", "optim.momentum=0", "--set", f"optim.name={optimizer}"]
    refused(cli("config", "show", "-c", SMOKE, *args), f"--set optim.name={optimizer}", "nesterov")


def test_train_lr_inf_is_refused_before_anything_is_written(cli, tmp_path):
    result = cli("train", "-c", SMOKE, "--lr", "inf", "--logdir", tmp_path / "runs")
    refused(result, "--lr", "optim.lr: must be a finite number (got inf)")
    assert not (tmp_path / "runs").exists()


# (id, file text, where the mistake is: "self" = this file, else a file name, expected text)
FILE_CASES = [
    ("lr-inf", "optim:\n  lr: .inf\n", "self", "optim.lr: must be a finite number (got inf)"),
    ("lr-nan", "optim:\n  lr: .NaN\n", "self", "optim.lr: must be a finite number (got nan)"),
    ("mean-inf", "data:\n  mean: [0.5, 0.5, -.inf]\n", "self", "data.mean[2]: must be a finite"),
    ("betas-one", "optim:\n  betas: [0.9, 1]\n", "self", "optim.betas[1]: must be less than 1"),
    ("weights-zero", f"loss:\n  weight: {ZEROS}\n", "self", "not all zero"),
    ("epochs-yes", "train:\n  epochs: yes\n", "self", "train.epochs: must be a valid integer"),
    ("lr-quoted", "optim:\n  lr: '0.1'\n", "self", "optim.lr: must be a valid number (got '0.1')"),
    ("section-a-number", "train: 5\n", "self", "train: must be a mapping of keys (got 5)"),
    ("run-name-digits", "log:\n  run_name: 007\n", "self", "log.run_name: must be text (quote"),
    (
        "duplicate-section",
        "optim:\n  lr: 0.1\noptim:\n  lr: 0.2\n",
        "self",
        "optim: a key may appear once (given at line 1, column 1 and again at line 3, column 1)",
    ),
    (
        "duplicate-key",
        "optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n",
        "self",
        "optim.lr: a key may appear once (given at line 2",
    ),
    ("duplicate-in-flow", "data: {root: a, root: b}\n", "self", "data.root: a key may appear"),
    ("alias-bomb", "ALIAS_BOMB", "self", "more than 100000 values"),
    ("deep-nesting", "a: " + "[" * 3000 + "]" * 3000 + "\n", "self", "nested"),
    (
        "python-tag",
        "optim: !!python/object/apply:os.system [true]\n",
        "self",
        "could not determine a constructor",
    ),
    ("two-documents", "optim: {}\n---\ntrain: {}\n", "self", "malformed YAML at line 2"),
    (
        "extends-cycle",
        "extends: b.yaml\n",
        "b.yaml",
        "extends: bad.yaml: a cycle (bad.yaml -> b.yaml -> bad.yaml)",
    ),
    ("extends-itself", "extends: bad.yaml\n", "self", "a cycle (bad.yaml -> bad.yaml)"),
    ("extends-missing", "extends: nowhere.yaml\n", "self", "extends: nowhere.yaml: config file"),
    ("extends-list", "extends: [a.yaml, b.yaml]\n", "self", "extends: must be the path of"),
    (
        "extends-base-has-nan",
        "extends: base.yaml\nloss:\n  name: mse\n",
        "base.yaml",
        "optim.lr: must be a finite number",
    ),
    (
        "overlay-has-nan",
        "extends: good.yaml\noptim:\n  lr: .nan\n",
        "self",
        "optim.lr: must be a finite number",
    ),
]


def alias_bomb() -> str:
    """Six short lines that expand to a million values: a, then b = ten a's, and so on."""
    lines = ["a: &a [" + ", ".join(["1"] * 10) + "]"]
    for prev, name in zip("abcde", "bcdef", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def write_cases_dir(tmp_path: Path, text: str) -> Path:
    text = alias_bomb() if text == "ALIAS_BOMB" else text
    (tmp_path / "b.yaml").write_text("extends: bad.yaml\n")
    (tmp_path / "base.yaml").write_text("data:\n  source: synthetic\noptim:\n  lr: .nan\n")
    (tmp_path / "good.yaml").write_text("data:\n  source: synthetic\noptim:\n  lr: 0.1\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "culprit", "message"), [pytest.param(*case[1:], id=case[0]) for case in FILE_CASES]
)
@pytest.mark.parametrize("command", ["config show", "train"])
def test_file_mistakes_name_the_file(cli, tmp_path, command, text, culprit, message):
    path = write_cases_dir(tmp_path, text)
    where = path if culprit == "self" else tmp_path / culprit
    result = cli(*command.split(), "-c", path, "--logdir", tmp_path / "runs")
    refused(result, str(where), message)
    assert not (tmp_path / "runs").exists()


def test_non_utf8_and_unreadable_files(cli, tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("log:\n  run_name: caf\xe9\n".encode("latin-1"))
    refused(cli("config", "show", "-c", latin), str(latin), "not a UTF-8 text file")
    locked = tmp_path / "locked.yaml"
    locked.write_text("optim:\n  lr: 0.1\n")
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        pytest.skip("running as root: a chmod 000 file stays readable")
    refused(cli("config", "show", "-c", locked), str(locked), "cannot be read")


def test_evaluate_blames_the_set_for_bad_data(cli, tmp_path):
    """evaluate's --set may only touch data keys, and a bad one is blamed on the --set."""
    run = tmp_path / "runs" / "r"
    tiny = ["--set", "data.train_size=64", "--set", "data.test_size=32"]
    trained = cli("train", "-c", SMOKE, "-q", "--epochs", "1", *tiny, "--logdir", run.parent,
                  "--run-name", "r")  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    result = cli("evaluate", "--checkpoint", run, "--set", "data.std=[.nan, 0.2, 0.2]")
    refused(result, "--set data.std=[.nan, 0.2, 0.2]", "data.std[0]: must be a finite number")
