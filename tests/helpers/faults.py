"""Fault injection for the resume tests: a callback, added to a real CLI run with
``--trainer.callbacks+=tests.helpers.faults.KillAt``, that SIGKILLs its own process at a chosen point,
and the check that a resumed run ended where the uninterrupted one did."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

WHERE = ("batch_end", "before_validation", "before_epoch_save", "after_epoch_save", "during_save")


class KillAt(Callback):
    """SIGKILL this process at training step ``step``.

    Args:
        step: the optimiser step (``trainer.global_step``) at which to die.
        where: ``batch_end`` (after that step's batch), ``before_validation`` (the step ended an epoch
            and validation is about to start), ``before_epoch_save`` (the epoch's validation is done,
            ``last.ckpt`` not yet written), ``after_epoch_save`` (the start of the next epoch) or
            ``during_save`` (half-way through writing the first checkpoint at or after ``step``).
        signum: the signal to send (SIGKILL; SIGTERM/SIGINT test the graceful stop).
    """

    def __init__(self, step: int, where: str = "batch_end", signum: int = int(signal.SIGKILL)) -> None:
        if where not in WHERE:
            raise ValueError(f"where must be one of {WHERE}")
        self.step, self.where, self.signum = step, where, signum

    def _kill(self) -> None:
        os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.where == "batch_end" and trainer.global_step == self.step:
            self._kill()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            self.where == "before_validation"
            and not trainer.sanity_checking
            and trainer.global_step == self.step
        ):
            self._kill()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Callbacks run before checkpoint callbacks (Lightning orders those last): last.ckpt is not
        # written yet for this epoch.
        if self.where == "before_epoch_save" and trainer.global_step == self.step:
            self._kill()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.where == "after_epoch_save" and trainer.global_step == self.step:
            self._kill()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.where != "during_save":
            return
        io = trainer.strategy.checkpoint_io
        real_save, callback = io.save_checkpoint, self

        def save(checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            if trainer.global_step >= callback.step:
                real_torch_save = torch.save

                def half_then_die(obj: Any, f: Any, *a: Any, **k: Any) -> None:
                    import io as _io

                    buf = _io.BytesIO()
                    real_torch_save(obj, buf)
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    callback._kill()

                torch.save = half_then_die
            real_save(checkpoint, path, storage_options)

        io.save_checkpoint = save


def assert_same_state(reference: Path, resumed: Path) -> None:
    """Two checkpoints at the same step and epoch with the same weights, optimiser moments (1e-6)
    and learning-rate schedule."""
    a, b = (torch.load(p, weights_only=True) for p in (reference, resumed))
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"])
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6, rtol=0), key
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6, rtol=0) for k in sa)
    assert [s["_last_lr"] for s in a["lr_schedulers"]] == [s["_last_lr"] for s in b["lr_schedulers"]]
