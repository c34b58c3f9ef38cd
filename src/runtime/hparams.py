"""Each run's settings beside its best validation accuracy and test figures, in every logger:
TensorBoard's HPARAMS tab, MLflow's params and metrics, the W&B config and summary."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from src.runtime.loggers import record_run_ids

METRICS = ("hp/best_val_acc", "hp/test_acc", "hp/test_f1")
# Model hyperparameters that are the data's (linked) or too long for a table cell.
_LEFT_OUT = {"class_names", "_class_path", "_instantiator"}


class HParamsTab(Callback):
    """Log the run's hyperparameters once per run folder, and ``hp/best_val_acc``, ``hp/test_acc`` and
    ``hp/test_f1`` as they become known, so the HPARAMS tab compares runs side by side.

    The settings shown: every model hyperparameter (the optimiser and schedule by class, with their
    arguments), the data's, and the trainer's ``max_epochs``, precision and process count, plus the
    seed. TensorBoard's HPARAMS tab lists a run as soon as it starts; each metric's value is the
    latest point of its scalar curve, logged once measured (no placeholder point before that). A
    resumed run logs nothing at an earlier step than its checkpoint, so TensorBoard keeps its curves.
    Other loggers get the same settings (``log_hyperparams``) and metrics (``log_metrics``).
    """

    def __init__(self) -> None:
        self.best_val_acc = -math.inf
        self._logged = False  # once per run folder: the test after fit writes into the fit's

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = trainer.log_dir  # a collective under DDP
        resumed = (
            trainer.ckpt_path is not None and folder is not None and _same_folder(trainer.ckpt_path, folder)
        )
        if not resumed:  # a run continuing its own folder logged them when it started
            self._log_hparams(trainer, pl_module)
            record_run_ids(trainer)
        self._logged = True

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate" and not self._logged:  # a stand-alone run in its own folder
            self._log_hparams(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._logged:  # `test` on its own, not the test after fit
            self._log_hparams(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        acc = trainer.callback_metrics.get("val_acc")
        if trainer.sanity_checking or trainer.state.fn != "fit" or acc is None:
            return
        self.best_val_acc = max(self.best_val_acc, float(acc))
        _log(trainer, {"hp/best_val_acc": self.best_val_acc})

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = trainer.callback_metrics
        _log(
            trainer,
            {f"hp/test_{k}": float(metrics[f"test_{k}"]) for k in ("acc", "f1") if f"test_{k}" in metrics},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_acc": self.best_val_acc}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_val_acc = float(state_dict.get("best_val_acc", -math.inf))

    def _log_hparams(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params = run_settings(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                _hparams_tab(logger, params)
        if self.best_val_acc > -math.inf:  # a checkpoint's run: its best validation accuracy
            _log(trainer, {"hp/best_val_acc": self.best_val_acc})
        self._logged = True


def _same_folder(checkpoint: str, run_folder: str) -> bool:
    """Whether a checkpoint lies in ``<run_folder>/checkpoints``."""
    return Path(checkpoint).resolve().parent.parent == Path(run_folder).resolve()


def _hparams_tab(logger: TensorBoardLogger, params: dict[str, Any]) -> None:
    """Write the run's HPARAMS-tab records: its settings and the names of :data:`METRICS`.

    Lightning's ``log_hyperparams(params, metrics)`` writes them only together with a point of each
    metric at step 0, a placeholder where nothing was measured yet; here the metrics' points are
    only the measured ones.
    """
    from torch.utils.tensorboard.summary import hparams

    for record in hparams(params, dict.fromkeys(METRICS, 0.0)):
        logger.experiment.file_writer.add_summary(record)


def run_settings(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """A flat ``{name: value}`` of what distinguishes the run (values are numbers, strings or bools)."""
    params: dict[str, Any] = {"model": type(pl_module).__name__}
    for key, value in pl_module.hparams.items():
        if key not in _LEFT_OUT:
            params.update(_flat(key, value))
    dm = trainer.datamodule
    if dm is not None:
        params["data"] = type(dm).__name__
        for key, value in dm.hparams.items():
            if key not in _LEFT_OUT:
                params.update(_flat(f"data/{key}", value))
    params.update(
        {
            "trainer/max_epochs": trainer.max_epochs,
            "trainer/precision": str(trainer.precision),
            "trainer/processes": trainer.world_size,
            "trainer/accumulate_grad_batches": trainer.accumulate_grad_batches,
            "seed": os.environ.get("PL_GLOBAL_SEED", "none"),
        }
    )
    return params


def _flat(key: str, value: Any) -> dict[str, Any]:
    """``optimizer: {class_path: torch.optim.AdamW, init_args: {weight_decay: 0.05, ...}}`` becomes
    ``optimizer: AdamW, optimizer/weight_decay: 0.05`` (arguments left at the class's default are
    left out: a library class has many); lists become strings."""
    if isinstance(value, dict) and "class_path" in value:
        out: dict[str, Any] = {key: str(value["class_path"]).rsplit(".", 1)[-1]}
        defaults = _defaults(str(value["class_path"]))
        for k, v in (value.get("init_args") or {}).items():
            if k not in defaults or not _same(defaults[k], v):
                out.update(_flat(f"{key}/{k}", v))
        return out
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(f"{key}/{k}", v))
        return out
    if isinstance(value, (bool, int, float, str)):
        return {key: value}
    return {key: str(value)}  # None, lists and other values as text


def _defaults(class_path: str) -> dict[str, Any]:
    """Default argument values of a class's ``__init__`` and its bases' (a subclass passing ``**kwargs``)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    defaults: dict[str, Any] = {}
    for klass in reversed(getattr(cls, "__mro__", [cls])):
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            continue
        defaults.update({p.name: p.default for p in params if p.default is not inspect.Parameter.empty})
    return defaults


def _same(a: Any, b: Any) -> bool:
    normal = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (YAML has no tuples)
    return normal(a) == normal(b)


def _log(trainer: Trainer, metrics: dict[str, float]) -> None:
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
