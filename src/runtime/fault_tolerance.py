"""Exact resumption, a clean stop on a diverged loss, and a clean stop on SIGTERM/SIGINT in every
phase of every command.

The CLI adds :class:`FaultTolerance` to every run, with the command's
:class:`~src.runtime.run_state.RunState`, and hands it the run's
:class:`~src.callbacks.LastCheckpoint` (:meth:`FaultTolerance.saves_with`).
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from src.runtime.errors import Interrupted, RunFailure
from src.runtime.run_state import STOP_SIGNALS, RunState, StopNow, cli_command
from src.runtime.workarounds import restore_loader_position

if TYPE_CHECKING:
    from src.callbacks.checkpointing import LastCheckpoint

_NONE = torch.iinfo(torch.long).max
_EPOCHS = 2**24  # epochs representable in the packed (step, epoch) code
_MAX_UNCHECKED = 1024  # losses kept unread at most (a large check_every_n_steps)


class NonFiniteLossError(RunFailure):
    """The training loss became NaN or inf."""


class FaultTolerance(Callback):
    """Make a resumed run continue exactly where it stopped, and stop cleanly when it must.

    - Random streams: the global torch (and CUDA) generators drive dropout and augmentation, and
      Lightning does not checkpoint them. Their state is saved with every checkpoint and restored
      right before the first resumed batch, as is the training loader's position.
    - Non-finite loss: each step's loss stays on the device, unread (no kernel, no host sync in the
      step); the losses since the last check are checked together, with one read, every
      ``check_every_n_steps`` steps, at epoch end and before every checkpoint written while
      fitting, so no checkpoint ever holds weights a NaN/inf loss has touched. The run then stops
      with :class:`NonFiniteLossError` naming the first bad step and the checkpoints that exist.
    - SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C), from the moment the Trainer runs
      (before that the command stops at once, :class:`~src.runtime.run_state.RunState`): training
      finishes the current step (a validation in progress finishes too), the
      :class:`~src.callbacks.LastCheckpoint` given by :meth:`saves_with` writes ``last.ckpt``, and
      the command ends with :class:`~src.runtime.errors.Interrupted` (exit ``128 + signal``: 143,
      130), saying what was finished and the command that redoes the rest. The sanity check,
      ``validate``, ``test`` (also the test after fit) and ``predict`` stop after the current
      batch. A Ctrl-C after a first stop signal stops at once.

    Args:
        run_state: the command's state (the stop signal received, the command line); a run
            outside the CLI gets its own.
        check_every_n_steps: read the non-finite flag this often.
    """

    def __init__(self, run_state: RunState | None = None, check_every_n_steps: int = 50) -> None:
        self.run_state = run_state if run_state is not None else RunState()
        self.check_every_n_steps = check_every_n_steps
        self.last_checkpoint: LastCheckpoint | None = None
        # (step, epoch, loss) of the steps not checked yet: keeping a reference costs no kernel, so a
        # step pays nothing (three tiny kernels per step cost ~0.1 ms on a CPU, 2-3 % of a small
        # model's step); a check stacks them and reads one flag.
        self._unchecked: list[tuple[int, int, Tensor]] = []
        # The first bad step and its epoch packed in one integer (step * _EPOCHS + epoch); _NONE
        # while every checked loss was finite.
        self._first_bad = _NONE
        self._rng_to_restore: dict[str, Any] | None = None
        self._saved_handlers: dict[int, Any] = {}
        self._start_step: int | None = None  # the step a fit started (or resumed) at
        self._fit_end_step: int | None = None  # the step a finished fit ended at

    def saves_with(self, last_checkpoint: LastCheckpoint) -> None:
        """Let ``last_checkpoint`` save the state before a stop at a step boundary: it runs after
        every other callback of the step, asks :meth:`stop_requested` and raises
        :meth:`interruption` after its save; without one this callback stops the run itself."""
        self.last_checkpoint = last_checkpoint
        last_checkpoint.fault_tolerance = self

    # ------------------------------------------------------------------ stop signals
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        try:
            self._saved_handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook's worker): signals stay as they are
            self._saved_handlers = {}
        self.run_state.take_signals()
        self.run_state.stop_at_once = False

    def _take_over(self, trainer: Trainer) -> None:
        # Lightning installs its own SIGTERM handler right before each stage runs (it would end the
        # command with exit status 0): the run's handler replaces it for the stage.
        self.run_state.take_signals()
        if trainer.state.fn == "fit" and self._start_step is None:
            self._start_step = trainer.global_step

    def stop_requested(self, trainer: Trainer) -> int | None:
        """The stop signal received by this process (or, under DDP, by any rank), else ``None``.
        A collective under DDP: every rank calls it at the same points."""
        signum = self.run_state.stop_signal or 0
        if trainer.world_size > 1:  # every rank must stop at the same step
            flag = torch.tensor(signum, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max"))
        return signum or None

    def _stop_if_requested(self, trainer: Trainer, batches_done: int = 0) -> None:
        if signum := self.stop_requested(trainer):
            raise self.interruption(trainer, signum, batches_done)

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_over(trainer)
        self._stop_if_requested(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Right before the first batch: nothing between loading and training (model summary,
        # sanity check) may draw from the generators or iterate the loader first.
        restore_loader_position(trainer)
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng:
            torch.set_rng_state(rng["torch_rng"].cpu())
            if "cuda_rng" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda_rng"]])
        self._take_over(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A signal during an epoch's last step, its validation or its save: the epoch-end save is
        # done, and the run stops before the next epoch (a finished fit goes on to its end).
        self._stop_if_requested(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_end_step = trainer.global_step

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_over(trainer)
        if trainer.state.fn == "validate":
            self._stop_if_requested(trainer)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # A validation inside fit finishes: the epoch-end save after it keeps the whole epoch.
        if trainer.sanity_checking or trainer.state.fn == "validate":
            self._stop_if_requested(trainer, _batch_idx(args) + 1)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_over(trainer)
        self._stop_if_requested(trainer)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._stop_if_requested(trainer, _batch_idx(args) + 1)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_over(trainer)
        self._stop_if_requested(trainer)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._stop_if_requested(trainer, _batch_idx(args) + 1)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, StopNow) and not exception.message:
            exception.message = str(self.interruption(trainer, exception.signum, at_once=True))
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        self._saved_handlers = {}

    # ------------------------------------------------------------------ what a stop leaves
    def interruption(
        self, trainer: Trainer, signum: int, batches_done: int = 0, at_once: bool = False
    ) -> Interrupted:
        """The stop of this run by ``signum`` now, with what was finished and how to redo the rest."""
        stopped = f"Stopped {'at once ' if at_once else ''}by {signal.Signals(signum).name}"
        fn, state = _stage(trainer), self.run_state
        if fn == "fit":
            where = (
                f"during the sanity check, before training step {trainer.global_step}"
                if trainer.sanity_checking
                else f"at training step {trainer.global_step}"
            )
            saved = self._last_saved()
            if saved is None:
                redo = (
                    f"No checkpoint to resume from was written; run the command again: {state.command_line()}"
                )
            else:
                redo = (
                    f"{saved[0]} holds {saved[1]}; the rest of the run did not run. Resume with: "
                    + state.command_line(ckpt_path="last")
                )
            return Interrupted(signum, f"{stopped} {where}. {redo}")
        total = _num_batches(trainer)
        progress = (
            "before its first batch"
            if batches_done == 0
            else f"after {batches_done} of {total} batch(es)"
            if total
            else f"after {batches_done} batch(es)"
        )
        if fn == "test" and self._fit_end_step is not None:
            tested = trainer.ckpt_path or (self._last_saved() or (None,))[0]
            redo = (
                f"Test it with: {cli_command(['test', f'--ckpt_path={tested}'])}"
                if tested
                else "No checkpoint was written (checkpointing is off), so nothing is left to test"
            )
            return Interrupted(
                signum,
                f"{stopped} during the test after fit, {progress}: the fit finished at step "
                f"{self._fit_end_step}; no test results were reported. {redo}",
            )
        return Interrupted(
            signum,
            f"{stopped} during {fn}, {progress}: no results were reported or written. Run it again: "
            + state.command_line(),
        )

    def _last_saved(self) -> tuple[Path, str] | None:
        """``last.ckpt`` and what it holds, if it exists."""
        lc = self.last_checkpoint
        if lc is None or lc.path is None:
            return None
        if lc.saved_step is not None:  # its rename may still be under way (SafeCheckpointIO)
            return lc.path, f"step {lc.saved_step}"
        if not lc.path.is_file():
            return None
        # Not written by this process: the file this fit resumed from.
        resumed = self._start_step
        return lc.path, f"step {resumed}" if resumed is not None else "the state this run resumed from"

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
        if self.last_checkpoint is None:  # else it stops the run after its save
            self._stop_if_requested(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop_if_nonfinite(trainer)

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
            files = self._checkpoint_files(trainer)
            kept = (
                f"the checkpoints written before it are intact: {', '.join(files)}"
                if files
                else "no checkpoint was written before it, so the run has none to resume from"
            )
            raise NonFiniteLossError(
                f"the training loss became non-finite (NaN or inf) at training step {step} (epoch {epoch}). "
                f"Training stopped; nothing was saved from that step on, and {kept}. Lower the learning "
                "rate, clip gradients (--trainer.gradient_clip_val=1.0), or check the data for NaN/inf values."
            )

    def _checkpoint_files(self, trainer: Trainer) -> list[str]:
        """The run's checkpoint files on disk: ``last.ckpt`` and every ``ModelCheckpoint``'s."""
        saved = self._last_saved()
        paths = [str(saved[0])] if saved is not None else []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):  # paths it saved (their renames may be under way)
                paths += [p for p in (cb.best_model_path, cb.last_model_path) if p]
        return list(dict.fromkeys(paths))

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


def _batch_idx(hook_args: tuple) -> int:
    """``batch_idx`` of an evaluation or predict ``*_batch_end`` hook: ``(outputs, batch, batch_idx, ...)``."""
    return int(hook_args[2])


def _stage(trainer: Trainer) -> str:
    """``fit``, ``validate``, ``test`` or ``predict``."""
    return trainer.state.fn.value if trainer.state.fn is not None else ""


def _num_batches(trainer: Trainer) -> int:
    """The batches of the running evaluation or prediction (its first dataloader), 0 if unknown."""
    counts = {
        "validate": trainer.num_val_batches,
        "test": trainer.num_test_batches,
        "predict": trainer.num_predict_batches,
    }.get(_stage(trainer), [])
    total = counts[0] if counts else 0
    return int(total) if total != float("inf") else 0
