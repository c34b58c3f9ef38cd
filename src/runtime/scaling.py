"""What a multi-process run does with batch norm and the batch size, said once at the start.

python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml --trainer.devices=2 --trainer.strategy=ddp
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


class ScalingReport(Callback):
    """When training starts, rank 0 prints the effective batch size (per-process batch × processes ×
    gradient accumulation), each optimiser's learning rate, and, with several processes, whether
    BatchNorm statistics are synchronised (``SyncBatchNorm``, GPUs only) or kept per process.
    Learning rates are never rescaled automatically. The CLI adds it to every run.

    It reports at ``on_train_start``: after the tuners chose and a checkpoint's optimiser and
    schedule were restored, so the rates it prints are those the run trains with."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(effective_batch_report(trainer))
        if trainer.world_size > 1 and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.modules()
        ):
            synced = any(isinstance(m, nn.SyncBatchNorm) for m in pl_module.modules())
            rank_zero_info(
                f"{trainer.world_size} processes: "
                + (
                    "BatchNorm statistics synchronised across processes (SyncBatchNorm)."
                    if synced
                    else "each process normalises with its own batch statistics (SyncBatchNorm runs on "
                    "GPUs only; --trainer.sync_batchnorm=false keeps this on GPUs too)."
                )
            )


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
