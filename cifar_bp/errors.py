"""User-facing failures: the CLI prints these as one line and exits, never with a traceback."""


class CliError(Exception):
    """A runtime failure the user can act on (missing data, bad checkpoint, divergence)."""

    exit_code = 1


class UsageError(CliError):
    """A mistake in the command line or the config: exit 2, like argument errors."""

    exit_code = 2
