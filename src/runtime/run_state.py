"""What one command holds while it runs, in one object owned by that command.

``python -m src.cli`` makes one :class:`RunState` per command (``src.cli.main`` may run several
commands in one process: the tests and the search's pre-flight check do) and hands it to what
needs it, instead of module globals shared by every run of the process.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopNow(BaseException):
    """A stop signal that ends the command where it is: before anything is running that a stop at a
    step boundary would keep (the start of a command), or a second Ctrl-C. A ``BaseException``, so
    no ``except Exception`` in library code swallows it; ``src.cli`` reports it as
    :class:`~src.runtime.errors.Interrupted`. ``message`` says what was finished, when known."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(signum, message)
        self.signum, self.message = signum, message


# What a run folder holds before its run starts (see RunState.discard_unused).
_BEFORE_START = (".lock", "provenance.json", "hparams.yaml")


@dataclass
class RunState:
    """The command as the user gave it, the run folders it claimed and the locks it holds
    (:mod:`src.runtime.runs`), and the stop signal it received (SIGTERM/SIGINT)."""

    command: list[str] = field(default_factory=list)
    claimed: list[Path] = field(default_factory=list)
    locks: list[int] = field(default_factory=list)
    stop_signal: int | None = None
    # Before the Trainer runs nothing is lost by stopping at once; from then on a stop signal is
    # acted on at the next safe point (:class:`~src.runtime.fault_tolerance.FaultTolerance`).
    stop_at_once: bool = True

    def command_line(self, ckpt_path: str | None = None) -> str:
        """The command as a shell line; ``ckpt_path`` replaces any ``--ckpt_path`` it had."""
        args = list(self.command)
        if ckpt_path is not None:
            args = _without_option(args, "--ckpt_path") + [f"--ckpt_path={ckpt_path}"]
        return cli_command(args)

    def on_signal(self, signum: int, frame: Any) -> None:
        """The SIGTERM/SIGINT handler: remember the signal (the run stops at its next safe point),
        or stop at once before the run has started or on a Ctrl-C after a first stop signal."""
        if self.stop_at_once or (signum == signal.SIGINT and self.stop_signal is not None):
            raise StopNow(signum)
        if self.stop_signal is None:
            self.stop_signal = signum
        hint = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        # os.write, not print: a handler may interrupt a write to the same stream (a progress bar).
        os.write(
            sys.stderr.fileno(),
            f"\n{signal.Signals(signum).name} received: stopping after the current step or batch{hint}.\n".encode(),
        )

    def take_signals(self) -> None:
        """Make :meth:`on_signal` the SIGTERM/SIGINT handler (Lightning installs its own SIGTERM
        handler at the start of every stage, which would end the command with exit status 0)."""
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            for signum in STOP_SIGNALS:
                signal.signal(signum, self.on_signal)

    @contextlib.contextmanager
    def stop_signals(self) -> Iterator[None]:
        """Within the block SIGTERM/SIGINT go to :meth:`on_signal`; the previous handlers come back after."""
        try:
            previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
            self.take_signals()
        except ValueError:
            previous = {}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def discard_unused(self) -> None:
        """Remove the run folders claimed for a run that stopped on an error before it started
        (before its ``config.yaml`` was written: at most a lock, ``provenance.json`` and what the
        loggers write on creation, an empty event file or CSV's ``hparams.yaml``), so a refused
        command leaves no empty ``version_N`` behind."""
        for folder in self.claimed:
            names = {p.name for p in folder.iterdir()} if folder.is_dir() else {"config.yaml"}
            if "config.yaml" not in names and all(
                n in _BEFORE_START or n.startswith("events.out.tfevents") for n in names
            ):
                shutil.rmtree(folder, ignore_errors=True)

    def release(self) -> None:
        """Release the run-folder locks (the kernel also releases them when the process ends)."""
        for fd in self.locks:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.locks = []


def cli_command(args: list[str]) -> str:
    """``python -m src.cli ARGS`` as a line to paste into a shell."""
    return shlex.join(["python", "-m", "src.cli", *args])


def _without_option(args: list[str], name: str) -> list[str]:
    """``args`` less ``name VALUE`` and ``name=VALUE``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            kept.append(arg)
    return kept
