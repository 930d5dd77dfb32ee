"""Fixtures; the helpers themselves live in tests/helpers.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, SMOKE, TINY, Cli, only_run, scalars, train_run  # noqa: F401


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A logdir with two finished one-epoch TINY runs, `a` and `b`; tests work on copies."""
    logdir = tmp_path_factory.mktemp("trained") / "runs"
    for name, seed in [("a", "0"), ("b", "1")]:
        train_run(logdir, name, *TINY, "--epochs", "1", "--seed", seed)
    return logdir


@pytest.fixture
def runs(trained, tmp_path) -> Path:
    """A copy of `trained` this test may change."""
    return Path(shutil.copytree(trained, tmp_path / "runs"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: end-to-end cases over a few seconds (`pytest -m 'not slow'` skips them)"
    )
