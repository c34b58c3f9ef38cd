"""The garbage collector around a command: paused while it imports torch and Lightning, and left
out of its exit.

Those imports make ~400,000 long-lived objects and no garbage, yet the collector walks them again
and again while they are made (~0.8 s of CPU per process), and once more at the interpreter's
shutdown (over 1 s). Every process a user starts pays both: each DDP rank, search trial and tool.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Wrap an entry point's imports: no collection while they run; their objects are then frozen
    (``gc.freeze``: never walked again), so later collections see only what the command makes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.freeze()


@contextmanager
def fast_exit() -> Iterator[None]:
    """Wrap a command's entry point: once it is done (or exits), leave its objects to the process's end.

    Frozen (``gc.freeze``), the objects are released with the process instead of walked by the
    shutdown's collection. The commands close their own files and loggers; none relies on a
    finalizer at exit.
    """
    try:
        yield
    finally:
        gc.freeze()
