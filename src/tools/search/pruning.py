"""The callback every trial of ``python -m src.tools.search`` runs with: rank 0 reports the metric to
the trial in the study's storage after each validation epoch (the trial's result, whatever its
loggers) and asks the pruner; every rank stops after the same epoch, as an early-stopped run (exit 0).
Not optuna-integration's callback: it raises ``TrialPruned`` in the Trainer (docs/search.md)."""

from __future__ import annotations

import os
import signal
import threading
import time

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from src.tools.search.space import build_pruner
from src.tools.search.study import PID_ENV, STORAGE_ENV, open_storage


class OptunaPruning(Callback):
    """Report ``monitor`` to an Optuna trial after each validation epoch; stop when it is pruned.
    Started by a search (``BN_SEARCH_PID`` set), the run kills its process group once the search is gone.

    Args:
        study_name: the Optuna study.
        trial_number: the trial's number in the study.
        monitor: the metric reported every validation epoch (e.g. ``val_acc``).
        pruner: the search's ``--pruner`` spec (a study's pruner is not kept in its storage).
    """

    def __init__(self, study_name: str, trial_number: int, monitor: str = "val_acc", pruner: str = "median"):
        self.study_name, self.trial_number = study_name, trial_number
        self.monitor, self.pruner = monitor, pruner
        self._trial: optuna.trial.Trial | None = None
        start_parent_watchdog()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self._trial is None:  # the other ranks never touch the storage
            storage = open_storage(os.environ[STORAGE_ENV])
            study = optuna.load_study(
                study_name=self.study_name, storage=storage, pruner=build_pruner(self.pruner)
            )
            study_id = storage.get_study_id_from_name(self.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number)
            self._trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:  # the sanity check is not an epoch of the trial
            return
        stop = self._should_stop(trainer) if trainer.is_global_zero else False
        # All ranks must stop together, or the ones still training wait forever in a collective.
        if trainer.strategy.broadcast(stop, src=0):
            trainer.should_stop = True

    def _should_stop(self, trainer: Trainer) -> bool:
        assert self._trial is not None
        value, epoch = trainer.callback_metrics.get(self.monitor), trainer.current_epoch
        if value is None:  # every trial would fail the same way: tell the search what is logged
            logged = sorted(k for k in trainer.callback_metrics if not k.startswith("hp/"))
            self._trial.set_user_attr("missing_metric", logged)
            rank_zero_info(f"'{self.monitor}' is not logged; stopping this trial.")
            return True
        self._trial.report(float(value), step=epoch)
        if not self._trial.should_prune():
            return False
        self._trial.set_user_attr("pruned_epoch", epoch)
        rank_zero_info(f"Optuna pruned this trial after epoch {epoch} ({self.monitor}={float(value):.4f}).")
        return True


def start_parent_watchdog(interval_s: float = 1.0) -> None:
    """Kill this process group (the trial, DDP ranks included) as soon as the search that started it
    (``BN_SEARCH_PID``) is gone, seen as a changed parent pid. Only in the process the search started:
    it leads the group."""
    search_pid = int(os.environ.get(PID_ENV) or 0)
    if not search_pid or os.getpgrp() != os.getpid():
        return

    def watch() -> None:
        while os.getppid() == search_pid:
            time.sleep(interval_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="search-parent-watchdog", daemon=True).start()
