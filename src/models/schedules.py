"""Learning-rate schedules that take their peak from the optimiser, so the learning rate is one setting."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from torch.optim import lr_scheduler as torch_schedules


class OneCycleLR(torch_schedules.OneCycleLR):
    """PyTorch's ``OneCycleLR`` whose peak is the optimiser's learning rate (the model's ``lr``).

    Args:
        optimizer: the optimiser (given by the model).
        max_lr: the peak learning rate; leave unset to use the optimiser's, so that
            ``--model.init_args.lr`` (and the learning-rate finder) sets it.
        **kwargs: the other arguments of ``torch.optim.lr_scheduler.OneCycleLR`` (``total_steps``
            is filled in by the model with the run's optimiser steps).
    """

    def __init__(self, optimizer: Optimizer, max_lr: float | None = None, **kwargs: Any) -> None:
        lrs = [group["lr"] for group in optimizer.param_groups]
        if max_lr is not None and any(lr != max_lr for lr in lrs):
            rank_zero_warn(
                f"OneCycleLR(max_lr={max_lr}) overrides the learning rate {lrs[0]} as the peak; leave max_lr "
                "unset to make --model.init_args.lr the one learning-rate setting."
            )
        peak = max_lr if max_lr is not None else lrs
        super().__init__(optimizer, max_lr=peak, **kwargs)
