"""Fault injection, as callbacks added to a real CLI run: ``--trainer.callbacks+=tests.helpers.faults.KillAt``
SIGKILLs its own process at a chosen point (the resume tests); ``SignalAt`` sends SIGTERM/SIGINT at a
point of any phase and lets the run go on (the signal tests); ``assert_same_state`` checks that a
resumed run ended where the uninterrupted one did."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
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


PHASES = ("init", "sanity", "train", "validation", "save", "test", "predict")


class SignalAt(Callback):
    """Send a stop signal (SIGTERM/SIGINT) to this process at a chosen point, as a scheduler or a
    Ctrl-C would, and go on: the run must stop at its next safe point.

    Args:
        phase: ``init`` (while the CLI builds the run, before the Trainer runs), ``sanity`` (after
            sanity-check batch ``at``), ``train`` (after training step ``at``), ``validation``
            (after the ``at``-th validation batch of a fit or ``validate``, counted from 0 over the
            whole command, sanity check left out), ``save`` (half-way through writing the first
            checkpoint at or after step ``at``), ``test`` / ``predict`` (after batch ``at``).
        at: the step or batch index.
        signum: the signal.
        times: how often to send it (2: a second Ctrl-C, which stops at once).
        pause_until: instead of sending the signal, print ``paused`` on stderr and wait until this
            file exists (the test sends the signal from outside, then creates the file).
    """

    def __init__(
        self,
        phase: str,
        at: int = 0,
        signum: int = int(signal.SIGTERM),
        times: int = 1,
        pause_until: str = "",
    ) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}")
        self.phase, self.at, self.signum, self.times = phase, at, signum, times
        self.pause_until = pause_until
        self._validation_batches = 0
        if phase == "init":
            self._send()

    def _send(self) -> None:
        if self.pause_until:
            print("paused", file=sys.stderr, flush=True)
            deadline = time.monotonic() + 300
            while not os.path.exists(self.pause_until) and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        for _ in range(self.times):
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.phase == "train" and trainer.global_step == self.at:
            self._send()

    # Evaluation and predict hooks get (outputs, batch, batch_idx, dataloader_idx) after the module.
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.sanity_checking:
            self._at_batch("sanity", args[2])
            return
        self._at_batch("validation", self._validation_batches)
        self._validation_batches += 1

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._at_batch("test", args[2])

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._at_batch("predict", args[2])

    def _at_batch(self, phase: str, index: int) -> None:
        if self.phase == phase and index == self.at:
            self._send()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.phase != "save" or stage != "fit":
            return
        import torch

        real_torch_save, callback = torch.save, self

        def half_then_signal(obj: Any, f: Any, *a: Any, **k: Any) -> None:
            if trainer.global_step < callback.at or callback.phase != "save":
                return real_torch_save(obj, f, *a, **k)
            callback.phase = "sent"
            buf = io.BytesIO()
            real_torch_save(obj, buf, *a, **k)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            callback._send()
            f.write(data[len(data) // 2 :])

        torch.save = half_then_signal


class PoisonAt(Callback):
    """Fill the model's weights with NaN after training step ``step``: the next loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            import torch

            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))
