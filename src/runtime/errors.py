"""The project's expected failures, each with its exit status, and the one place that turns them
into ``error: <what to do>`` on stderr and that status, for every command (the CLI and the tools).

- :class:`UsageError` (exit 2): what the user asked for or gave cannot work (a setting, a file, the
  data, a checkpoint); nothing was started or written.
- :class:`RunFailure` (exit 1): a run failed while running (a full disk, a diverged loss); what it
  saved before is intact.
- :class:`Interrupted` (exit 128 + signal: 143 for SIGTERM, 130 for SIGINT): a command stopped by a
  signal; the message says what was finished and how to redo the rest.

Each message says what was wrong and what to do; none is printed with a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn


class ProjectError(Exception):
    """An expected failure of a command: its message says what to do; ``exit_code`` is its status."""

    exit_code: int = 1
    prefix: str = "error: "

    def report(self) -> NoReturn:
        """Print the message on stderr and exit with the error's status."""
        print(f"{self.prefix}{self}", file=sys.stderr)
        sys.exit(self.exit_code)


class UsageError(ProjectError):
    """Bad input: a setting, a file, the data or a checkpoint that cannot be used (exit 2)."""

    exit_code = 2


class RunFailure(ProjectError):
    """A failure while running, such as a full disk or a diverged loss (exit 1)."""

    exit_code = 1


class Interrupted(ProjectError):
    """A command stopped by a signal (exit ``128 + signum``: 143 SIGTERM, 130 SIGINT)."""

    prefix = ""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@contextmanager
def exit_on_error(cleanup: Callable[[ProjectError], None] | None = None) -> Iterator[None]:
    """Run a command's body; a :class:`ProjectError` ends the process with its one-line report.

    ``cleanup`` runs first (e.g. removing what a refused command created).
    """
    try:
        yield
    except ProjectError as err:
        if cleanup is not None:
            cleanup(err)
        err.report()
