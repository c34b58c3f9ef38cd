"""A command's start and end: its imports of torch and Lightning made cheaper, its exit left short.

Every process a user starts pays these: each DDP rank, search trial and tool, and the test suite
runs a few hundred. Two costs are nobody's work:

- The imports make ~400,000 long-lived objects and no garbage, yet the collector walks them again
  and again while they are made (~0.8 s of CPU per process), and once more at the interpreter's
  shutdown (over 1 s).
- ``import lightning`` imports torchmetrics, which imports ``scipy.signal`` (~0.8 s of CPU) only to
  give it a ``hamming`` alias for a library it never imports (torchmetrics issue #3457, to be
  fixed by its pull request #3459). Nothing here uses ``scipy.signal``; it is imported on first use.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_SIGNAL = "scipy.signal"


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Wrap an entry point's imports of torch and Lightning.

    No collection while they run; their objects are then frozen (``gc.freeze``: never walked
    again), so later collections see only what the command makes. ``scipy.signal`` waits for its
    first real use (:class:`_SignalOnFirstUse`).
    """
    _defer_scipy_signal()
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


class _SignalOnFirstUse(types.ModuleType):
    """Stands for ``scipy.signal`` in ``sys.modules`` until something reads from it.

    torchmetrics' import only asks whether ``hamming`` exists (answered here without importing);
    any other attribute imports the real module, puts it in ``sys.modules`` and on the ``scipy``
    package, and is read from it, so later imports and readers get the real module.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(_import_scipy_signal(), name)

    @staticmethod
    def hamming(*args: Any, **kwargs: Any) -> Any:
        return _import_scipy_signal().windows.hamming(*args, **kwargs)


def _defer_scipy_signal() -> None:
    if _SIGNAL in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(_SIGNAL)  # imports the light ``scipy`` package, not the module
    except ImportError:
        return
    if spec is None:
        return
    placeholder = _SignalOnFirstUse(_SIGNAL)
    placeholder.__spec__ = spec
    placeholder.__file__ = spec.origin  # ``inspect.getmodule`` asks every module for it
    sys.modules[_SIGNAL] = placeholder
    sys.modules["scipy"].signal = placeholder


def _import_scipy_signal() -> types.ModuleType:
    module = sys.modules.get(_SIGNAL)
    if isinstance(module, _SignalOnFirstUse):
        del sys.modules[_SIGNAL]
        module = importlib.import_module(_SIGNAL)  # also sets ``scipy.signal`` to the real module
    return module
