"""The settings of two resolved configs that differ (a resume's check, a search's study contract).
Imports nothing heavy: the search process uses it without torch or Lightning."""

from __future__ import annotations

from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """One entry per setting, through dicts and lists of dicts (callbacks): ``{"a": [{"b": 1}],
    "c": [1, 2], "d": {}}`` → ``{"a.0.b": 1, "c": [1, 2]}`` (a list of plain values is one setting)."""
    nested = isinstance(tree, list) and any(isinstance(x, dict) for x in tree)
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if nested else ()
    flat = {k: v for key, sub in items for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return flat if isinstance(tree, dict) or nested else {prefix[:-1]: tree}


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], skip: tuple[str, ...] = ()
) -> list[str]:
    """``key: saved -> current`` for every setting that differs and is not under a key in ``skip``
    (an absent setting and a null one are the same)."""
    a, b = flatten(saved), flatten(current)
    return [
        f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}"
        for key in sorted(a | b)
        if a.get(key) != b.get(key) and not any(key == k or key.startswith(k + ".") for k in skip)
    ]


def _short(value: Any) -> str:
    return text if len(text := repr(value)) <= 60 else text[:57] + "..."
