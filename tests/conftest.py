"""Shared test fixtures. No test touches the network: the Hub is switched off for the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m src.cli ARGS`` in a subprocess, as a user would, and return the result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BN_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "src.cli", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"CLI failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """In-process training in the suite uses one torch thread, like the CLI subprocesses
    (``BN_NUM_THREADS=1``): on a busy 2-core machine two threads made tiny steps ~40x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli():
    return run_cli
