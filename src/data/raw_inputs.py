"""Raw inputs (a JSON value sent to the server) → NumPy samples: the checks the DataModules share.

Each DataModule's ``parse_raw_input`` uses these; they run in the server's HTTP process, in threads,
so they use NumPy only, are cheap, and change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from src.runtime.errors import UsageError


class RawInputError(UsageError, ValueError):
    """One raw input that cannot become a model input; the message says what is wrong."""


def type_name(value: Any) -> str:
    """What a JSON value is, in words (for messages)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def number_array(value: Any, what: str) -> np.ndarray:
    """A nested list of numbers as a NumPy array (int or float); :class:`RawInputError` for anything
    else (strings, booleans, null, ragged or too deeply nested lists)."""
    if not isinstance(value, list):
        raise RawInputError(f"expected {what}, got {type_name(value)}.")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):  # ragged, or nested deeper than NumPy's 64 axes
        raise RawInputError(f"expected {what}, got lists nested unevenly or too deeply.") from None
    if array.dtype.kind not in "iuf":
        raise RawInputError(f"expected {what}; every value must be a number (not a string, boolean or null).")
    return array


def shape_words(shape: Sequence[int]) -> str:
    """``(40,)`` → ``"a list of 40 numbers"``; ``(28, 28)`` → ``"a 28x28 array of numbers"``."""
    if len(shape) == 1:
        return f"a list of {shape[0]} numbers"
    return f"a {'x'.join(map(str, shape))} array of numbers"


def float_array(value: Any, shape: Sequence[int | str]) -> np.ndarray:
    """A raw input of fixed-shape float features: a nested list of finite numbers of ``shape``."""
    what = shape_words([int(d) for d in shape])
    array = number_array(value, what)
    if array.shape != tuple(shape):
        got = f"{array.shape[0]} values" if array.ndim == 1 else f"shape {'x'.join(map(str, array.shape))}"
        raise RawInputError(f"expected {what}, got {got}.")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise RawInputError("every value must be a finite number (no NaN or infinity).")
    return array.astype(np.float32)
