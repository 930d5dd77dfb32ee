"""User-facing failures: the CLI prints these as one line and exits, never with a traceback."""


class CliError(Exception):
    """A runtime failure the user can act on (missing data, bad checkpoint, divergence)."""

    exit_code = 1


class UsageError(CliError):
    """A mistake in the command line or the config: exit 2, like argument errors."""

    exit_code = 2


class Diverged(CliError):
    """Training produced non-finite losses or weights; nothing non-finite was saved.

    `step` is the global step at which it was noticed, so `compare` can report the run as
    a row ("diverged at step N") instead of failing the whole comparison.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), for a
    one-line error; `limit` cuts a long line."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if limit is None else line[:limit]
