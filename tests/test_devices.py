"""Where a run goes: device checks before anything is built, SyncBatchNorm only where it can run,
the effective batch-size report, the CPU thread default."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from src.runtime.devices import Placement, cpu_threads, placement, sync_batchnorm_applies
from src.runtime.errors import UsageError
from src.runtime.scaling import effective_batch_report


def test_cpu_placement_counts_devices_and_refuses_more_than_the_machine_has(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert placement("cpu", 2) == Placement("cpu", 2, 1)
    assert placement("cpu", "auto", 3).processes == 3
    with pytest.raises(UsageError, match=r"asks for 5 CPU device\(s\), but this machine has 2"):
        placement("cpu", 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_on_a_machine_without_one_says_so_and_what_to_pass():
    with pytest.raises(UsageError, match="no CUDA GPU.*--trainer.accelerator=cpu"):
        placement("gpu", 1)


def test_sync_batchnorm_only_with_several_gpu_processes():
    assert sync_batchnorm_applies(Placement("cuda", 2, 1))
    assert sync_batchnorm_applies(Placement("cuda", 1, 2))
    assert not sync_batchnorm_applies(Placement("cuda", 1, 1))
    assert not sync_batchnorm_applies(Placement("cpu", 4, 1))


def test_effective_batch_report_multiplies_processes_and_accumulation():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.01)
    trainer = SimpleNamespace(
        world_size=4, num_nodes=1, num_devices=4, accumulate_grad_batches=2,
        datamodule=SimpleNamespace(batch_size=100), optimizers=[optimizer],
    )  # fmt: skip
    report = effective_batch_report(trainer)
    assert (
        "Effective batch size 800 = 100 per process × 4 process(es)" in report and "AdamW lr 0.01" in report
    )


def test_default_torch_threads_is_one_on_small_machines(monkeypatch):
    monkeypatch.delenv("BN_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert cpu_threads() == 1
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert cpu_threads() == torch.get_num_threads()
    monkeypatch.setenv("BN_NUM_THREADS", "3")
    assert cpu_threads() == 3
