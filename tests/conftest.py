"""Test-suite settings. No test touches the network: the Hub is switched off for the whole suite.

Shared helpers live in ``tests/helpers/`` (running the CLI as a user does, tiny data, fault
injection, reading TensorBoard); no test module imports another.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """In-process training uses one torch thread, like the CLI subprocesses (``BN_NUM_THREADS=1``):
    on a busy 2-core machine two threads made tiny steps ~40x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
