"""A command's start: its imports of torch and Lightning (src/runtime/startup.py)."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
from pathlib import Path

import pytest

from src.runtime.startup import heavy_imports

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "numpy", "litserve", "src.")


def test_collector_paused_while_importing_then_frozen() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with heavy_imports():
            assert not gc.isenabled()
            made = [[i] for i in range(1000)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(made)
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("entry", ["src/cli.py", "src/tools/export.py", "src/tools/serve.py"])
def test_entry_points_import_torch_inside_heavy_imports(entry: str) -> None:
    """An entry point's heavy imports sit inside its ``with heavy_imports():`` block."""
    tree = ast.parse((ROOT / entry).read_text())
    outside = [
        name
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if name.startswith(HEAVY) and name != "src.runtime.startup"
    ]
    paused = [
        node
        for node in tree.body
        if isinstance(node, ast.With) and ast.unparse(node.items[0].context_expr) == "heavy_imports()"
    ]
    assert not outside, f"{entry} imports {outside} outside heavy_imports()"
    assert len(paused) == 1 and any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in paused[0].body)


def _python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def test_torchmetrics_still_imports_scipy_signal_at_import() -> None:
    """The library behaviour the placeholder works around (torchmetrics issue #3457). Once this
    fails, torchmetrics no longer imports ``scipy.signal``: delete the placeholder in startup.py."""
    assert _python("import sys, torchmetrics; print('scipy.signal' in sys.modules)").split() == ["True"]


def test_scipy_signal_waits_for_its_first_use_and_is_then_the_real_module() -> None:
    out = _python(
        "import sys\n"
        "import src.cli\n"
        "print(type(sys.modules['scipy.signal']).__name__)\n"
        "import scipy.signal\n"
        "from scipy.signal import windows\n"
        "import scipy.signal.windows as w\n"
        "print(type(sys.modules['scipy.signal']).__name__, scipy.signal.welch.__name__)\n"
        "print(sys.modules['scipy'].signal is sys.modules['scipy.signal'], w is windows)\n"
    )
    assert out.split("\n")[:3] == ["_SignalOnFirstUse", "module welch", "True True"], out


def test_the_placeholder_answers_torchmetrics_check_and_any_other_name_from_the_real_module() -> None:
    out = _python(
        "import sys, numpy\n"
        "from src.runtime.startup import heavy_imports\n"
        "with heavy_imports():\n"
        "    import scipy.signal\n"
        "    assert hasattr(scipy.signal, 'hamming')\n"
        "    print(type(sys.modules['scipy.signal']).__name__)\n"
        "    window = scipy.signal.hamming(4)\n"
        "    from scipy.signal.windows import hamming\n"
        "    print(numpy.allclose(window, hamming(4)), type(sys.modules['scipy.signal']).__name__)\n"
    )
    assert out.split("\n")[:2] == ["_SignalOnFirstUse", "True module"], out
