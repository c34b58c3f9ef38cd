"""Lightning's tuners (``LearningRateFinder``, ``BatchSizeFinder``): what each sets, and a learning-rate
pick that no run should train with refused before the run starts.

The rules (docs/troubleshooting.md, "Tuners"): the value a tuner picks is the one setting it tunes
(``model.init_args.lr``: the optimiser's rate and the one-cycle peak; ``data.init_args.batch_size``),
the optimiser and schedule are built from it (:meth:`ClassifierModule.on_fit_start`), and
``config.yaml`` and the checkpoints record it (:class:`~src.runtime.run_config.RunConfig`). A tuner
tunes a new run only: a resumed run keeps the values its checkpoint holds.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder

from src.runtime.errors import UsageError

# Each tuner and the setting it chooses.
TUNED = {LearningRateFinder: "model.init_args.lr", BatchSizeFinder: "data.init_args.batch_size"}
# Lightning's suggestion skips this many points at each end of the curve (``suggestion()``'s defaults).
_SKIP_BEGIN, _SKIP_END = 10, 1
# A pick this far below the rate at the lowest loss lies on the flat start of the curve, before the
# loss falls: Lightning's steepest-slope rule picks there when the flat part is noisy
# (lightning issue #21141: the slope is taken over the rate, not its logarithm).
_FLAT_START = 100.0
# Lightning's finder stops once the loss exceeds this many times its lowest (``early_stop_threshold``'s
# default): a curve that stops short of its steps without doing so was cut by the run's max_epochs.
_DIVERGED = 4.0


class TunerError(UsageError):
    """A tuner's pick that would not train; the message says what to pass instead."""


def tuner_settings(callback_classes: list[type]) -> list[str]:
    """The settings chosen by the tuners among ``callback_classes``."""
    return [key for cls in callback_classes for tuner, key in TUNED.items() if issubclass(cls, tuner)]


def check_picks(trainer: Trainer) -> None:
    """Raise :class:`TunerError` when a ``LearningRateFinder`` of this run found no learning rate to
    train with: no suggestion, a loss that never fell, or a pick on the flat start of the curve."""
    for callback in trainer.callbacks:
        if isinstance(callback, LearningRateFinder) and callback.optimal_lr is not None:
            problem = lr_pick_problem(callback.optimal_lr)
            if problem:
                raise TunerError(problem)


def lr_pick_problem(found: Any) -> str | None:
    """What is wrong with a learning-rate finder's result (``LearningRateFinder.optimal_lr``: its
    ``results`` curve and ``suggestion()``), or ``None`` for a usable pick."""
    lrs, losses = list(found.results.get("lr", [])), list(found.results.get("loss", []))
    steps = f"{len(lrs)} of {found.num_training} steps"
    todo = (
        "Set the learning rate yourself (--model.init_args.lr={}), or give the finder more steps and a range "
        "where the loss falls (LearningRateFinder's num_training_steps, min_lr and max_lr; it runs within the "
        "run's max_epochs)."
    )
    window = [
        (lr, loss)
        for lr, loss in zip(lrs[_SKIP_BEGIN:-_SKIP_END], losses[_SKIP_BEGIN:-_SKIP_END], strict=True)
        if math.isfinite(loss)
    ]
    pick = found.suggestion() if len(window) >= 2 else None
    if pick is None:
        return (
            f"the learning-rate finder found no learning rate: {steps} give too few losses. "
            + todo.format("...")
        )
    span = f"{lrs[0]:.2g} to {lrs[-1]:.2g}, {steps}"
    finite = [loss for loss in losses if math.isfinite(loss)]
    if len(lrs) < found.num_training and finite and finite[-1] < _DIVERGED * min(finite):
        return (
            f"the learning-rate finder found no learning rate: the run's max_epochs ended it after {steps}, "
            f"before its loss diverged, so it tried rates {lrs[0]:.2g} to {lrs[-1]:.2g} only and its pick "
            f"({pick:.3g}) is not from its whole range. " + todo.format("...")
        )
    lowest_lr, lowest = min(window, key=lambda point: point[1])
    if lowest >= window[0][1]:
        return (
            f"the learning-rate finder found no learning rate that trains: over the rates it tried ({span}) the "
            "loss never fell below its starting value. " + todo.format("...")
        )
    if pick * _FLAT_START < lowest_lr:
        return (
            f"the learning-rate finder picked lr {pick:.3g} on the flat start of its curve (rates {span}): the loss "
            f"was lowest at lr {lowest_lr:.3g}, over {_FLAT_START:.0f} times higher, so {pick:.3g} would barely "
            "train. " + todo.format(f"{lowest_lr / 10:.1g}, a tenth of the rate at the lowest loss")
        )
    return None
