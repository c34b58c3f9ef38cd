"""What a callback that looks at the model uses so that looking never changes training: its own random
stream, the modules' train/eval modes put back one by one, and batches prepared as for evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import RunningStage
from torch import nn


@contextmanager
def own_random_stream(device: torch.device | None = None) -> Iterator[None]:
    """Run the block on a fork of the global random streams (the CPU's and ``device``'s), so what it
    draws (dropout, a shuffled loader) leaves the training run's streams where they were."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Put every submodule's train/eval mode back as it was after the block (``model.train(flag)``
    would set them all alike, undoing a module deliberately kept in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def evaluating(trainer: Trainer) -> Iterator[None]:
    """The data hooks see an evaluation stage, so a batch prepared in the block gets the evaluation
    preprocessing (no training-time augmentation)."""
    stage = trainer.state.stage
    trainer.state.stage = RunningStage.VALIDATING
    try:
        yield
    finally:
        trainer.state.stage = stage


def first_batch(trainer: Trainer, loader: Any) -> Any:
    """The first batch of ``loader`` on the training device, prepared as for evaluation, drawn on
    its own random stream."""
    with own_random_stream(trainer.strategy.root_device), evaluating(trainer):
        batch = next(iter(loader))
        return trainer.strategy.batch_to_device(batch)  # the DataModule's transfer hooks too
