"""What one command holds while it runs, in one object owned by that command.

``python -m src.cli`` makes one :class:`RunState` per command (``src.cli.main`` may run several
commands in one process: the tests and the search's pre-flight check do) and hands it to what
needs it, instead of module globals shared by every run of the process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunState:
    """The run folders a command claimed and the locks it holds (:mod:`src.runtime.runs`), and the
    stop signal it received (SIGTERM/SIGINT, acted on at the next step boundary)."""

    claimed: list[Path] = field(default_factory=list)
    locks: list[int] = field(default_factory=list)
    stop_signal: int | None = None

    def discard_unused(self) -> None:
        """Remove the run folders claimed for a run that stopped on an error before it started
        (before its ``config.yaml`` was written: at most a lock and an empty event file inside), so a
        refused command leaves no empty ``version_N`` behind."""
        for folder in self.claimed:
            names = {p.name for p in folder.iterdir()} if folder.is_dir() else {"config.yaml"}
            if "config.yaml" not in names and all(
                n == ".lock" or n.startswith("events.out.tfevents") for n in names
            ):
                shutil.rmtree(folder, ignore_errors=True)

    def release(self) -> None:
        """Release the run-folder locks (the kernel also releases them when the process ends)."""
        for fd in self.locks:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.locks = []
