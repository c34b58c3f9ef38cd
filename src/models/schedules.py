"""Learning-rate schedules that take their peak from the optimiser, so the learning rate is one setting."""

from __future__ import annotations

import importlib
import inspect
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


def spans_the_run(schedule: Any) -> bool:
    """Whether a schedule is laid out over the run's length: it takes ``total_steps`` and leaves it
    unset, so the model fills in the run's optimiser steps (``OneCycleLR``).

    ``schedule`` is the callable the CLI hands the model (a ``functools.partial`` of the class), or
    its configuration (``{"class_path": ..., "init_args": {...}}``); ``None`` is no schedule.
    """
    if isinstance(schedule, dict):
        module, _, name = str(schedule.get("class_path", "")).rpartition(".")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return False
        given = schedule.get("init_args") or {}
    elif schedule is None:
        return False
    else:
        fn, given = getattr(schedule, "func", schedule), getattr(schedule, "keywords", None) or {}
    if "total_steps" in given:  # the CLI resolves every argument the class takes
        return given["total_steps"] is None
    return _total_steps_default_none(fn)


def _total_steps_default_none(fn: Any) -> bool:
    """``fn`` (or, through ``**kwargs``, a base class's ``__init__``) takes ``total_steps=None``."""
    for candidate in inspect.getmro(fn) if inspect.isclass(fn) else (fn,):
        try:
            params = inspect.signature(candidate).parameters
        except (TypeError, ValueError):
            return False
        if "total_steps" in params:
            return params["total_steps"].default is None
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False
