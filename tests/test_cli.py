"""The CLI layer itself: shared flags, help text, command order."""

from __future__ import annotations

import re

import pytest

from tests.helpers import Cli

COMMANDS = ["train", "evaluate", "inspect-grads", "losses", "compare", "bench", "predict",
            "export", "lr-find", "config show"]  # fmt: skip
RUN_FLAGS = ["--loss", "--reduction", "--device", "--epochs", "--batch-size", "--lr", "--amp",
             "--run-name", "--logdir", "--seed"]  # fmt: skip


def options(help_text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z-]*)", help_text))


def test_train_and_config_show_take_the_same_run_flags():
    cli = Cli()
    train = options(cli("train", "--help", env={"COLUMNS": "120"}).stdout)
    show = options(cli("config", "show", "--help", env={"COLUMNS": "120"}).stdout)
    for flag in RUN_FLAGS:
        assert flag in train and flag in show, flag


def test_flags_resolve_the_same_way_in_config_show():
    out = Cli()("config", "show", "--lr", "0.05", "--seed", "3", "--run-name", "x",
                "--no-amp", "--as-given").stdout  # fmt: skip
    assert "lr: 0.05" in out and "seed: 3" in out and "run_name: x" in out
    assert "amp: false" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_bool_metavar_and_explains_every_option(command):
    text = Cli()(*command.split(), "--help", env={"COLUMNS": "120"}).stdout
    assert "<bool>" not in text  # a flag takes no value
    assert "Example" in text  # the README promises an example in every command's help
    rows = [line for line in text.splitlines() if re.match(r"│ (\*\s+)?\s*--", line)]
    assert rows, text
    for row in rows:
        name = next(word for word in row.split() if word.startswith("--"))
        assert len(row.split("  ")) > 2 or name == "--help", f"{command}: {name} has no help"


def test_commands_are_listed_in_the_order_a_user_needs_them():
    text = Cli()("--help", env={"COLUMNS": "120"}).stdout
    names = [m.group(1) for m in re.finditer(r"│ ([a-z][a-z-]*)\s{2,}", text)]
    assert names[:2] == ["train", "evaluate"], names


def test_printed_paths_and_commands_survive_brackets_and_spaces(tmp_path):
    """A '[v2]' in a folder name is text, not a style tag, and the printed commands paste
    into a shell as they are."""
    import shlex

    from tests.helpers import SMOKE

    logdir = tmp_path / "my runs [v2]"
    out = Cli()("train", "-c", SMOKE, "--logdir", logdir, "--run-name", "ab", "--epochs", "1",
                "--set", "data.train_size=64", "--set", "data.test_size=64").stdout  # fmt: skip
    assert f"run directory: {logdir / 'ab'}\n" in out
    command = next(line for line in out.splitlines() if line.startswith("TensorBoard:"))
    assert shlex.split(command.removeprefix("TensorBoard:")) == [
        "tensorboard",
        "--logdir",
        str(logdir),
    ]
