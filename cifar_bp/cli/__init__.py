"""The command line: a thin Typer layer that parses, calls plain functions and reports.

Each module registers its commands on the one `app`; importing them here is what adds them.
"""

# Imported in the order `--help` lists the commands; importing registers them.
from cifar_bp.cli import train  # noqa: F401, I001
from cifar_bp.cli import learn  # noqa: F401
from cifar_bp.cli import tools  # noqa: F401
from cifar_bp.cli.app import app, main

__all__ = ["app", "main"]
