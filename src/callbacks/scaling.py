"""Batch norm and batch-size bookkeeping for multi-process runs (DDP on GPUs, nodes or CPU).

The CLI adds :class:`ScalingSetup` to every run and turns Lightning's ``sync_batchnorm`` on by
default, so ``--trainer.devices=8`` or ``--trainer.num_nodes=2`` needs nothing else:

    python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml --trainer.devices=2 --trainer.strategy=ddp
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

# Devices on which torch.nn.SyncBatchNorm can run (it refuses CPU tensors).
SYNC_BN_DEVICES = ("cuda", "xpu", "hpu")


class ScalingSetup(Callback):
    """Keep batch norm working under DDP and report the effective batch size and learning rate.

    - More than one process on GPUs: BatchNorm layers become ``SyncBatchNorm`` (batch statistics
      over the global batch) when ``--trainer.sync_batchnorm=true``, the CLI's default; set it
      to ``false`` to keep per-process statistics.
    - More than one process on CPU (gloo), where ``SyncBatchNorm`` cannot run: every process
      normalises with its own batch statistics, and one warning says so instead of a crash.
    - At the start of ``fit``, rank 0 prints the effective batch size (per-process batch ×
      processes × gradient accumulation) and each optimiser's learning rate. Learning rates are
      never rescaled automatically.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Runs before the strategy wraps the model, i.e. before Lightning converts BN layers.
        if stage != "fit" or trainer.world_size < 2 or not _has_batch_norm(pl_module):
            return
        strategy = trainer.strategy
        if getattr(strategy, "_layer_sync", None) is None:
            rank_zero_info(f"{_processes(trainer)}: per-process batch norm (--trainer.sync_batchnorm=false).")
            return
        device = strategy.root_device.type
        if device in SYNC_BN_DEVICES:
            rank_zero_info(f"{_processes(trainer)}: BatchNorm layers converted to SyncBatchNorm.")
            return
        strategy._layer_sync = None  # Lightning's own switch: SyncBatchNorm would fail on this device
        rank_zero_warn(
            f"{_processes(trainer)} on {device}: SyncBatchNorm runs only on GPUs, so each process "
            "normalises with the statistics of its own batch (per-process batch norm); results differ "
            "slightly from one process with the whole batch. Pass --trainer.sync_batchnorm=false to "
            "silence this warning.",
            category=UserWarning,
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(effective_batch_report(trainer))


def effective_batch_report(trainer: Trainer) -> str:
    """One line with the effective batch size and each optimiser's learning rate."""
    batch = getattr(trainer.datamodule, "batch_size", None)
    accumulate = trainer.accumulate_grad_batches
    procs = f"{trainer.num_nodes} node(s) × {trainer.num_devices} device(s)"
    if batch is None:
        size = f"per-process batch × {trainer.world_size} processes ({procs}) × {accumulate} accumulation"
    else:
        size = (
            f"{batch * trainer.world_size * accumulate} = {batch} per process × {trainer.world_size} "
            f"process(es) ({procs}) × {accumulate} accumulation step(s)"
        )
    rates = "; ".join(_optimizer_lr(opt) for opt in trainer.optimizers) or "no optimiser"
    return f"Effective batch size {size}. Learning rate: {rates} (not rescaled with the batch size)."


def _optimizer_lr(optimizer: Any) -> str:
    group = optimizer.param_groups[0]
    text = f"{type(optimizer).__name__} lr {group['lr']:.4g}"
    if "max_lr" in group:  # OneCycleLR starts low and peaks at max_lr
        text += f" now, peak {group['max_lr']:.4g}"
    return text


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _processes(trainer: Trainer) -> str:
    return f"{trainer.world_size} processes ({trainer.num_nodes} node(s) × {trainer.num_devices} device(s))"
