"""Test-suite settings. No test touches the network: the Hub is switched off for the whole suite.

Shared helpers live in ``tests/helpers/`` (running the CLI as a user does, tiny data, fault
injection, reading TensorBoard); no test module imports another.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The suite starts a few hundred Python processes: they cache the project's compiled modules as
# Python does by default, even where the environment says not to (compiling src/ anew costs each
# one ~0.3 s of CPU).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """In-process training uses one torch thread, like the CLI subprocesses (``BN_NUM_THREADS=1``):
    on a busy 2-core machine two threads made tiny steps ~40x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where ``tests.helpers.serving.tiny_checkpoint`` fits its checkpoints: one folder for the whole
    session, shared by pytest-xdist's workers (each checkpoint is fitted once, under a file lock)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_runs"
    root.mkdir(exist_ok=True)
    return root
