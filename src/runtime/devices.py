"""Where a run will execute, read from its trainer settings before the Trainer is built.

The CLI uses it to refuse impossible placements with a clear message (more devices than the
machine has, a GPU on a machine without one) and to switch ``sync_batchnorm`` on only where
``SyncBatchNorm`` can run: more than one process on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

from src.runtime.errors import UsageError


@dataclass(frozen=True)
class Placement:
    """The device kind (``cpu``, ``cuda``, ``mps`` or another accelerator's name) and process count."""

    kind: str
    devices: int
    nodes: int

    @property
    def processes(self) -> int:
        return self.devices * self.nodes


def placement(accelerator: Any, devices: Any, num_nodes: Any = 1) -> Placement:
    """Resolve ``--trainer.accelerator/devices/num_nodes`` as Lightning will, or raise :class:`UsageError`."""
    kind = accelerator if isinstance(accelerator, str) else getattr(accelerator, "name", lambda: "other")()
    kind = {"gpu": "cuda"}.get(kind, kind)
    if kind == "auto":
        kind = "cuda" if CUDAAccelerator.is_available() else "mps" if MPSAccelerator.is_available() else "cpu"
    nodes = int(num_nodes or 1)
    if kind == "cuda" and not CUDAAccelerator.is_available():
        raise UsageError(
            f"--trainer.accelerator={accelerator} asks for a GPU, but this machine has no CUDA GPU (or "
            "this PyTorch build has no CUDA). Pass --trainer.accelerator=cpu (or auto)."
        )
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    auto = devices in ("auto", -1, None)
    if kind == "cuda":
        available = CUDAAccelerator.auto_device_count()
        wanted = available if auto else _count(devices)
        unit = "CUDA GPU"
    elif kind == "cpu":
        available = os.cpu_count() or 1
        wanted = 1 if auto else _count(devices)
        unit = "CPU"
    else:  # MPS or a custom accelerator: Lightning checks it
        return Placement(kind, 1 if auto else _count(devices), nodes)
    if wanted < 1:
        raise UsageError(f"--trainer.devices={devices}: pass at least one device (or auto).")
    if wanted > available:
        raise UsageError(
            f"--trainer.devices={devices} asks for {wanted} {unit} device(s), but this machine has "
            f"{available}. Pass --trainer.devices={available} or fewer (or --trainer.devices=auto)."
        )
    return Placement(kind, wanted, nodes)


def _count(devices: Any) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        return int(devices)
    except (TypeError, ValueError):
        raise UsageError(
            f"--trainer.devices={devices!r}: pass a count, a list of GPU ids, or auto."
        ) from None


def sync_batchnorm_applies(where: Placement) -> bool:
    """``SyncBatchNorm`` runs on GPU modules only, and only syncs something with several processes."""
    return where.kind == "cuda" and where.processes > 1


def cpu_threads() -> int:
    """Torch CPU threads: ``BN_NUM_THREADS`` if set, else 1 on machines with 1-2 cores.

    Measured on a shared 2-core machine under load (benchmarks/speed.py): an epoch with 2 threads
    took 14-19x longer than with 1 (OpenMP threads waiting on busy cores). Larger machines keep
    torch's default (one thread per physical core).
    """
    import torch

    if os.environ.get("BN_NUM_THREADS"):
        return int(os.environ["BN_NUM_THREADS"])
    return 1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()
