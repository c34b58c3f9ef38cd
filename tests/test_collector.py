"""The garbage collector around a command's imports (src/runtime/collector.py)."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

from src.runtime.collector import collector_paused

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "numpy", "litserve", "src.")


def test_collector_paused_while_importing_then_frozen() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with collector_paused():
            assert not gc.isenabled()
            made = [[i] for i in range(1000)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(made)
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("entry", ["src/cli.py", "src/tools/export.py", "src/tools/serve.py"])
def test_entry_points_import_torch_with_the_collector_paused(entry: str) -> None:
    """An entry point's heavy imports sit inside its ``with collector_paused():`` block."""
    tree = ast.parse((ROOT / entry).read_text())
    outside = [
        name
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if name.startswith(HEAVY) and name != "src.runtime.collector"
    ]
    paused = [
        node
        for node in tree.body
        if isinstance(node, ast.With) and ast.unparse(node.items[0].context_expr) == "collector_paused()"
    ]
    assert not outside, f"{entry} imports {outside} with the collector running"
    assert len(paused) == 1 and any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in paused[0].body)
