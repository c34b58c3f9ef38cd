"""What the CLI adjusts in the Trainer it builds: callbacks that step aside when what they need is
switched off, the final fit without validation, the run's fault tolerance, and the atomic
checkpoint files."""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import (
    Checkpoint,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.utilities import rank_zero_info

from src.callbacks.checkpointing import LastCheckpoint
from src.runtime.checkpoints import SafeCheckpointIO
from src.runtime.fault_tolerance import FaultTolerance
from src.runtime.run_state import RunState

# A switch, the callbacks that cannot work without what it switches off, and the flag to name.
_NEEDS = (
    ("enable_progress_bar", ProgressBar, "--trainer.enable_progress_bar=false"),
    ("logger", LearningRateMonitor, "--trainer.logger=false"),
    ("enable_checkpointing", Checkpoint, "--trainer.enable_checkpointing=false"),
)


def adapt_callbacks(callbacks: list[Any], trainer_cfg: dict[str, Any], validates: bool) -> list[Any]:
    """The configured callbacks, less those whose switch is off (one line names them), and adapted
    to a run without validation (``val_size=0``) when ``validates`` is false."""
    dropped = []
    for switch, kind, flag in _NEEDS:
        if trainer_cfg.get(switch) is False and any(isinstance(c, kind) for c in callbacks):
            dropped.append(
                f"{', '.join(type(c).__name__ for c in callbacks if isinstance(c, kind))} ({flag})"
            )
            callbacks = [c for c in callbacks if not isinstance(c, kind)]
    if dropped:
        rank_zero_info(f"Left out: {'; '.join(dropped)}.")
    return callbacks if validates else _without_validation(callbacks)


def _without_validation(callbacks: list[Any]) -> list[Any]:
    """The final fit (``val_size=0``): nothing is validated, so early stopping on a validation metric
    is off and the "best" checkpoint keeps the last epoch (the end of the schedule)."""
    kept, changes = [], []
    for cb in callbacks:
        monitor = str(getattr(cb, "monitor", None))
        if isinstance(cb, EarlyStopping) and monitor.startswith("val"):
            changes.append(f"EarlyStopping(monitor={monitor!r}) is off")
            continue
        if isinstance(cb, ModelCheckpoint) and monitor.startswith("val"):
            cb.monitor, cb.save_top_k, cb.filename = None, 1, "epoch{epoch:03d}"
            changes.append(f"ModelCheckpoint(monitor={monitor!r}) keeps the last epoch instead")
        kept.append(cb)
    rank_zero_info(
        "val_size=0: training on every training sample without validation"
        + (f"; {'; '.join(changes)}." if changes else ".")
    )
    return kept


def with_fault_tolerance(callbacks: list[Any], run_state: RunState) -> list[Any]:
    """The callbacks and the run's :class:`FaultTolerance`, which lets the run's ``LastCheckpoint``
    save the state before a stop signal ends the run."""
    fault_tolerance = FaultTolerance(run_state)
    for cb in callbacks:
        if isinstance(cb, LastCheckpoint):
            fault_tolerance.saves_with(cb)
    return [*callbacks, fault_tolerance]


def checkpoint_plugins(plugins: Any) -> list[Any]:
    """The configured plugins, with :class:`~src.runtime.checkpoints.SafeCheckpointIO` unless a CheckpointIO is set."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(SafeCheckpointIO())
    return plugins
