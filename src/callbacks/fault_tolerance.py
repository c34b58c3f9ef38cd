"""Exact resumption and a clean stop on a diverged loss (the CLI adds this callback to every run)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor

_NONE = torch.iinfo(torch.long).max
_EPOCHS = 2**24  # epochs representable in the packed (step, epoch) code


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf."""


class FaultTolerance(Callback):
    """Make a resumed run continue exactly where it stopped, and stop a run whose loss diverged.

    - Random streams: the global torch (and CUDA) generators drive dropout and augmentation, and
      Lightning does not checkpoint them. Their state is saved with every checkpoint and restored
      right before the first resumed batch.
    - Data position: Lightning skips restoring a stateful train loader (here
      :class:`~src.data.base.TensorBatches`) when ``trainer.estimated_stepping_batches`` was read
      before the restore, as every schedule with ``total_steps`` does (Lightning issue #20550).
      The pending state is applied before the first resumed batch instead.
    - Non-finite loss: each step's loss is checked on the device (no host sync); the result is read
      every ``check_every_n_steps`` steps, at epoch end and before every checkpoint written while
      fitting, so no checkpoint ever holds weights a NaN/inf loss has touched. The run then stops
      with :class:`NonFiniteLossError` naming the step.

    Args:
        check_every_n_steps: read the non-finite flag this often (default: the trainer's
            ``log_every_n_steps``).
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        self.check_every_n_steps = check_every_n_steps
        # The first bad step and its epoch packed in one integer (step * _EPOCHS + epoch), so a
        # step costs three tiny kernels; _NONE while every loss was finite.
        self._first_bad: Tensor | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    # ------------------------------------------------------------------ non-finite loss
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        step = trainer.global_step
        if isinstance(loss, Tensor):
            if self._first_bad is None or self._first_bad.device != loss.device:
                self._first_bad = torch.full((), _NONE, dtype=torch.long, device=loss.device)
            # Python scalars go to the kernel as arguments: no host-device copy, no sync. Steps only
            # grow, so the minimum is the first bad one.
            code = torch.where(torch.isfinite(loss.detach()), _NONE, step * _EPOCHS + trainer.current_epoch)
            torch.minimum(self._first_bad, code, out=self._first_bad)
        every = self.check_every_n_steps or trainer.log_every_n_steps or 1
        if step % every == 0:
            self._stop_if_nonfinite(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_if_nonfinite(trainer)

    def _stop_if_nonfinite(self, trainer: Trainer) -> None:
        if self._first_bad is None:
            return
        first = self._first_bad
        if trainer.world_size > 1:  # every rank must stop together
            first = trainer.strategy.reduce(first.clone(), reduce_op=torch.distributed.ReduceOp.MIN)
        code = int(first)
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
            self._stop_if_nonfinite(trainer)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = dict(state_dict)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Right before the first batch: nothing between loading and training (model summary,
        # sanity check) can draw from the generators or iterate the loader first.
        trainer.fit_loop._load_combined_loader_states()  # no-op unless Lightning skipped it
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng:
            torch.set_rng_state(rng["torch_rng"].cpu())
            if "cuda_rng" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda_rng"]])
