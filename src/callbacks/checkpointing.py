"""``last.ckpt``: the newest resumable state of a run, whatever the monitored metric did."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint

from src.runtime.checkpoints import SafeCheckpointIO
from src.runtime.value_types import NonNegativeInt

if TYPE_CHECKING:
    from src.runtime.fault_tolerance import FaultTolerance


class LastCheckpoint(Checkpoint):
    """Keep ``<run folder>/checkpoints/last.ckpt`` the newest state of the run.

    It is written at the end of every training epoch (after its validation, early stopping and
    best-checkpoint bookkeeping), every ``every_n_train_steps`` optimiser steps when set, and when
    the run is stopped by SIGTERM/SIGINT: the CLI gives it the run's
    :class:`~src.runtime.fault_tolerance.FaultTolerance` (``fault_tolerance``), which it asks at
    every step whether to stop, and it stops the run after saving. Resume a run
    from it with ``--ckpt_path=last``. Lightning's ``ModelCheckpoint(save_last=True)`` writes
    ``last.ckpt`` only at steps where it also saves a top-k checkpoint (since Lightning 2.6.0), so
    beside a monitored "best" checkpoint it holds the best epoch, not the last.

    A step save that falls on an epoch's last batch is left to the epoch-end save that follows, so
    no checkpoint holds a finished epoch whose validation has not run.

    When the state is the one just saved (the best checkpoint of an improving epoch, which
    ``ModelCheckpoint`` writes just before in the same epoch-end pass), the run's
    :class:`~src.runtime.checkpoints.SafeCheckpointIO` makes ``last.ckpt`` a hard link to that file
    instead of serialising the same state again.

    Args:
        every_n_train_steps: also save every this many optimiser steps (0: only at epoch ends).
            Mid-epoch saves let a killed run lose at most this many steps.
        filename: the file's name in the run's ``checkpoints`` folder.
    """

    def __init__(self, every_n_train_steps: NonNegativeInt = 0, filename: str = "last.ckpt") -> None:
        self.every_n_train_steps = every_n_train_steps
        self.filename = filename
        self.dirpath: Path | None = None
        self.fault_tolerance: FaultTolerance | None = None
        self._saved_at: tuple[int, str] | None = None

    @property
    def path(self) -> Path | None:
        return self.dirpath / self.filename if self.dirpath is not None else None

    @property
    def saved_step(self) -> int | None:
        """The step of the last save by this process, if any."""
        return self._saved_at[0] if self._saved_at is not None else None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            # Beside the other checkpoints: <logger save_dir>/<name>/<version>/checkpoints.
            self.dirpath = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # On an epoch's last batch the epoch-end save (after validation) comes instead, and a stop
        # signal stops the run before the next epoch.
        if batch_idx + 1 == trainer.num_training_batches and _validates(trainer):
            return
        if self.every_n_train_steps > 0 and trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer, "step")
        ft = self.fault_tolerance
        if ft is not None and (signum := ft.stop_requested(trainer)):
            self.save(trainer, "step")
            raise ft.interruption(trainer, signum)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save(trainer, "epoch")

    def save(self, trainer: Trainer, phase: str) -> None:
        """Write the checkpoint now (a collective under DDP: every rank calls it, rank 0 writes)."""
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit" or self.path is None:
            return
        if self._saved_at == (trainer.global_step, phase):
            return
        io = trainer.strategy.checkpoint_io
        with io.reusing_the_last_save() if isinstance(io, SafeCheckpointIO) else contextlib.nullcontext():
            trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_at = (trainer.global_step, phase)


def _validates(trainer: Trainer) -> bool:
    """Whether validation runs at the end of the current training epoch."""
    every = trainer.check_val_every_n_epoch
    return bool(trainer.enable_validation) and (every is None or (trainer.current_epoch + 1) % every == 0)
