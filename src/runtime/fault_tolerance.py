"""Exact resumption, a clean stop on a diverged loss, and a clean stop on SIGTERM/SIGINT.

The CLI adds :class:`FaultTolerance` to every run.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from src.runtime.errors import Interrupted, RunFailure
from src.runtime.workarounds import restore_loader_position

_NONE = torch.iinfo(torch.long).max
_EPOCHS = 2**24  # epochs representable in the packed (step, epoch) code
_MAX_UNCHECKED = 1024  # losses kept unread at most (a large check_every_n_steps)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(RunFailure):
    """The training loss became NaN or inf."""


class RunInterrupted(Interrupted):
    """Training was stopped by a signal; the process exits with ``128 + signal`` (143 SIGTERM, 130 SIGINT)."""

    def __init__(self, signum: int, checkpoint: str | None, step: int) -> None:
        name = signal.Signals(signum).name
        if checkpoint:
            detail = (
                f"{checkpoint} holds step {step}. Resume with the same command and --ckpt_path=last "
                "(or --ckpt_path=<that file>)."
            )
        else:
            detail = "No checkpoint was written (checkpointing is off); a new run starts from scratch."
        super().__init__(signum, f"Stopped by {name} at training step {step}. {detail}")


_stop_requested: int | None = None  # the signal received, until the run acts on it


def stop_requested(trainer: Trainer) -> int | None:
    """The stop signal received by this process (or, under DDP, by any rank), else ``None``."""
    signum = _stop_requested or 0
    if trainer.world_size > 1:  # every rank must stop at the same step
        flag = torch.tensor(signum, device=trainer.strategy.root_device)
        signum = int(trainer.strategy.reduce(flag, reduce_op="max"))
    return signum or None


class FaultTolerance(Callback):
    """Make a resumed run continue exactly where it stopped, and stop cleanly when it must.

    - Random streams: the global torch (and CUDA) generators drive dropout and augmentation, and
      Lightning does not checkpoint them. Their state is saved with every checkpoint and restored
      right before the first resumed batch, as is the training loader's position.
    - Non-finite loss: each step's loss stays on the device, unread (no kernel, no host sync in the
      step); the losses since the last check are checked together, with one read, every
      ``check_every_n_steps`` steps, at epoch end and before every checkpoint written while
      fitting, so no checkpoint ever holds weights a NaN/inf loss has touched. The run then stops
      with :class:`NonFiniteLossError` naming the first bad step.
    - SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) while training: the run finishes the
      current step, :class:`~src.callbacks.LastCheckpoint` writes ``last.ckpt``, and the process
      exits with ``128 + signal`` (143, 130) and says how to resume. A second Ctrl-C stops at once.

    Args:
        check_every_n_steps: read the non-finite flag this often.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        self.check_every_n_steps = check_every_n_steps
        # (step, epoch, loss) of the steps not checked yet: keeping a reference costs no kernel, so a
        # step pays nothing (three tiny kernels per step cost ~0.1 ms on a CPU, 2-3 % of a small
        # model's step); a check stacks them and reads one flag.
        self._unchecked: list[tuple[int, int, Tensor]] = []
        # The first bad step and its epoch packed in one integer (step * _EPOCHS + epoch); _NONE
        # while every checked loss was finite.
        self._first_bad = _NONE
        self._rng_to_restore: dict[str, Any] | None = None
        self._saved_handlers: dict[int, Any] = {}
        self._stops_itself = True

    # ------------------------------------------------------------------ stop signals
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Right before the first batch: nothing between loading and training (model summary,
        # sanity check) may draw from the generators or iterate the loader first.
        restore_loader_position(trainer)
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng:
            torch.set_rng_state(rng["torch_rng"].cpu())
            if "cuda_rng" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda_rng"]])
        # After Lightning installed its own SIGTERM handler (which would end the run with exit
        # status 0): ours replaces it for the training loop.
        global _stop_requested
        _stop_requested = None
        from src.callbacks.checkpointing import LastCheckpoint

        self._stops_itself = not any(isinstance(cb, LastCheckpoint) for cb in trainer.callbacks)
        try:
            for signum in STOP_SIGNALS:
                self._saved_handlers[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread (e.g. a notebook's worker): keep Lightning's
            self._saved_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        global _stop_requested
        if _stop_requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        _stop_requested = signum
        rank_zero_info(
            f"\n{signal.Signals(signum).name} received: stopping after this training step "
            + ("(Ctrl-C again to stop at once)." if signum == signal.SIGINT else "and saving last.ckpt.")
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        self._saved_handlers = {}

    # ------------------------------------------------------------------ non-finite loss
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        step = trainer.global_step
        if isinstance(loss, Tensor):
            self._unchecked.append((step, trainer.current_epoch, loss.detach()))
        if step % max(self.check_every_n_steps, 1) == 0 or len(self._unchecked) >= _MAX_UNCHECKED:
            self.stop_if_nonfinite(trainer)
        self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop_if_nonfinite(trainer)
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: Trainer) -> None:
        # With a LastCheckpoint, it saves and stops (it runs after every other callback of the step).
        if self._stops_itself and (signum := stop_requested(trainer)):
            raise RunInterrupted(signum, None, trainer.global_step)

    def stop_if_nonfinite(self, trainer: Trainer) -> None:
        """Raise :class:`NonFiniteLossError` if any training loss so far was NaN or inf."""
        if self._unchecked:
            losses = torch.stack([loss.reshape(()).float() for _, _, loss in self._unchecked])
            bad = (~torch.isfinite(losses)).nonzero()  # one host read for all of them
            if len(bad):
                step, epoch, _ = self._unchecked[int(bad[0])]
                self._first_bad = min(self._first_bad, step * _EPOCHS + epoch)
            self._unchecked = []
        code = self._first_bad
        if trainer.world_size > 1:  # every rank must stop together
            flag = torch.tensor(code, dtype=torch.long, device=trainer.strategy.root_device)
            code = int(trainer.strategy.reduce(flag, reduce_op="min"))
        if code != _NONE:
            step, epoch = divmod(code, _EPOCHS)
            raise NonFiniteLossError(
                f"the training loss became non-finite (NaN or inf) at training step {step} (epoch {epoch}). "
                "Training stopped; no checkpoint was written from that step on, so the last checkpoint is "
                "still good. Lower the learning rate, clip gradients (--trainer.gradient_clip_val=1.0), or "
                "check the data for NaN/inf values."
            )

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == "fit":  # raising here aborts the save: the previous file stays
            self.stop_if_nonfinite(trainer)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = dict(state_dict)
