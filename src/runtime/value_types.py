"""Value kinds of the project's settings, checked by the command line before anything is built.

The CLI reads them from the type hints (``batch_size: PositiveInt``), so ``--data.init_args.batch_size=0``
stops with an error that names the option instead of failing later inside PyTorch. In Python they are
plain ``int``/``float``.
"""

from __future__ import annotations

from typing import Any

from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

# A probability that must leave something: dropout rates, label smoothing (0 allowed, 1 not).
Rate = restricted_number_type("Rate", float, [(">=", 0), ("<", 1)])


def to_plain(value: Any) -> Any:
    """``value`` with these kinds turned back into plain ``int``/``float``/``str`` (recursively), so a
    checkpoint that stores it loads with ``weights_only=True``."""
    if isinstance(value, bool) or value is None:
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (
            type(value)(to_plain(v) for v in value)
            if isinstance(value, list)
            else tuple(to_plain(v) for v in value)
        )
    return value


__all__ = [
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "Rate",
    "to_plain",
]
