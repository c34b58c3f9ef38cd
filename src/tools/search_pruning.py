"""The callback that every trial of ``python -m src.tools.search`` runs with: report and prune.

The search adds it to each trial's command line (``--trainer.callbacks+=src.tools.search_pruning.OptunaPruning``
and its ``--trainer.callbacks.init_args.*``); nothing else uses it. It lives apart from
``src.tools.search`` so that the search process itself never imports torch or Lightning.

Each validation epoch, rank 0 reports the monitored metric to the trial in the study's storage
(its intermediate values are also where the search reads the trial's result) and asks the
study's pruner whether to stop. A pruned run stops like an early-stopped one: every rank leaves
the loop after that epoch, checkpoints and logs are closed normally and the process exits 0; the
decision is kept in the trial's ``pruned_epoch`` user attribute for the search to read.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import optuna
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from optuna_integration import PyTorchLightningPruningCallback

from src.tools.search import PID_ENV, STORAGE_ENV, build_pruner, open_storage

# Decisions broadcast from rank 0 to every rank after each validation.
_GO_ON, _PRUNE, _NO_METRIC = 0, 1, 2


class OptunaPruning(PyTorchLightningPruningCallback):
    """Optuna's Lightning pruning callback, made to end a CLI run cleanly, under DDP too.

    Why not the integration's callback as it is: in one process it raises ``TrialPruned`` inside
    the Trainer (a traceback and a failed exit for a CLI run), and under DDP it expects
    ``check_pruned()`` to be called after ``fit`` in the same Python process, which a CLI run
    cannot do. This subclass always takes the integration's DDP route (report on rank 0,
    broadcast the decision, ``trainer.should_stop`` on every rank) and records the outcome in the
    storage instead.

    Args:
        study_name: the Optuna study.
        trial_id: the trial's storage id (``trial._trial_id``, not its number).
        monitor: the metric reported every validation epoch (e.g. ``val_acc``).
        pruner: the pruner spec of the search (``median``, ``halving(min_resource=2)``, ``none``...);
            the study's pruner is not stored in the storage, so the search passes it.
        storage: the storage URL; ``None`` reads the ``BN_SEARCH_STORAGE`` environment variable
            (how the search passes it, so that database credentials stay out of config.yaml).
        watch_parent: kill this run's process group as soon as the search process (its pid in
            ``BN_SEARCH_PID``) is gone: a SIGKILLed search must not leave its trial training.
    """

    def __init__(
        self,
        study_name: str,
        trial_id: int,
        monitor: str = "val_acc",
        pruner: str = "median",
        storage: str | None = None,
        watch_parent: bool = False,
    ) -> None:
        # The trial is loaded in `setup`, on rank 0 only: the other ranks never touch the storage.
        super().__init__(trial=None, monitor=monitor)  # type: ignore[arg-type]
        self.study_name = study_name
        self.trial_id = trial_id
        self.pruner = pruner
        self.storage = storage
        if watch_parent:
            _start_parent_watchdog()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or self._trial is not None:
            return
        url = self.storage or os.environ.get(STORAGE_ENV)
        if not url:
            raise ValueError(f"OptunaPruning needs a storage URL (init arg `storage` or ${STORAGE_ENV})")
        study = optuna.load_study(
            study_name=self.study_name, storage=open_storage(url), pruner=build_pruner(self.pruner)
        )
        self._trial = optuna.trial.Trial(study, self.trial_id)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The integration checks the storage type and prepares its DDP bookkeeping here; this
        # callback reports straight to the RDB storage from rank 0 and needs neither.
        self.is_ddp_backend = trainer.world_size > 1

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:  # the sanity check is not an epoch of the trial
            return
        decision, epoch, score = _GO_ON, trainer.current_epoch, None
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                # Every trial would fail the same way: tell the search which metrics exist.
                logged = sorted(k for k in trainer.callback_metrics if not k.startswith("hp/"))
                self._trial.set_user_attr("missing_metric", logged)
                decision = _NO_METRIC
            else:
                score = float(value)
                self._trial.report(score, step=epoch)
                if self._trial.should_prune():
                    self._trial.set_user_attr("pruned_epoch", epoch)
                    decision = _PRUNE
        # All ranks must stop together, or the ones still training wait forever in a collective.
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision == _GO_ON:
            return
        trainer.should_stop = True
        if trainer.is_global_zero:  # only rank 0 knows the score
            if decision == _PRUNE:
                rank_zero_info(f"Optuna pruned this trial after epoch {epoch} ({self.monitor}={score:.4f}).")
            else:
                rank_zero_info(f"'{self.monitor}' is not logged; stopping this trial.")

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing of a trial belongs in its checkpoints


_watchdog_started = False


def _start_parent_watchdog(interval_s: float = 1.0) -> None:
    """Kill this process group as soon as the search that started it is gone.

    Only in the process the search started (it leads its own process group: the search starts
    each trial in a new session), and only then is the group exactly the trial, DDP ranks
    included (Lightning starts the other ranks from rank 0, in the same group). A dead parent
    shows as a changed parent pid: the orphan is re-parented at once, even before the parent is
    reaped.
    """
    global _watchdog_started
    search_pid = int(os.environ.get(PID_ENV) or 0)
    if _watchdog_started or not search_pid or os.getpgrp() != os.getpid():
        return
    _watchdog_started = True
    if os.getppid() != search_pid:  # gone while this process was starting
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == search_pid:
            time.sleep(interval_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="search-parent-watchdog", daemon=True).start()
