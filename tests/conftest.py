"""Fixtures; the helpers themselves live in tests/helpers.py."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT, SMOKE, Cli, only_run, scalars  # noqa: F401  (old imports)


@pytest.fixture
def cli() -> Cli:
    return Cli()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: end-to-end cases over a few seconds (`pytest -m 'not slow'` skips them)"
    )
