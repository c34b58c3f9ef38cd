"""``summary.json`` in the run folder: the run's figures per epoch, its best epoch and its test figures,
whatever its loggers. Tools (ablate, search, benchmarks) read results from it, never from a
logger's files.

    {"epochs": [{"epoch": 0, "step": 35, "time": 1700000000.0, "val_acc": 0.61, "val_loss": 1.1,
                 "val_f1": 0.58, "train_acc": 0.52, "train_loss": 1.4, "train_f1": 0.49}, ...],
     "best": {"monitor": "val_acc", "mode": "max", "value": 0.61, "epoch": 0},
     "test": {"test_acc": 0.6, "test_loss": 1.2, "test_f1": 0.57, "time": 1700000100.0}}

One entry per finished epoch: the figures the model logged for the epoch (``val_*`` only when
validation ran in it). ``best`` is the epoch with the best monitored figure (the first
``ModelCheckpoint``'s ``monitor`` and ``mode``, ``val_acc``/``max`` without one; the first of equal
values, as ``ModelCheckpoint`` keeps it); absent until that figure was measured. ``test`` holds the
figures of the latest test in the run folder (the test after fit, or a ``test`` command's own
folder). A resumed run keeps the entries up to its checkpoint and replaces those after it. The
file is rewritten whole, atomically (temporary file and rename), by rank 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from src.runtime.errors import RunFailure

FILENAME = "summary.json"
DEFAULT_MONITOR = ("val_acc", "max")


def read_summary(run_dir: Path | str) -> dict[str, Any]:
    """The summary of a run folder (``{"epochs": []}`` when it has none yet)."""
    path = Path(run_dir) / FILENAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"epochs": []}


def write_summary(run_dir: Path | str, summary: dict[str, Any]) -> None:
    """Replace ``summary.json`` in ``run_dir`` atomically: a reader never sees half a file."""
    write_json(Path(run_dir) / FILENAME, summary)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace the JSON file ``path`` of a run folder atomically (a temporary file renamed over it);
    a :class:`RunFailure` saying what to do when it cannot be written."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RunFailure(
            f"could not write {path}: {err.strerror or err}. Free space or pass a writable "
            "--trainer.logger.init_args.save_dir; the checkpoints written before are intact."
        ) from err


def _number(value: Any) -> float | int | None:
    """A plain JSON number (``None`` for NaN and infinities, which JSON cannot hold)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _figures(metrics: dict[str, Any], keep: Callable[[str], bool]) -> dict[str, float | int | None]:
    """The scalar figures among ``metrics`` whose name ``keep`` accepts, as plain numbers."""
    return {k: _number(v) for k, v in metrics.items() if keep(k) and getattr(v, "numel", lambda: 1)() == 1}


class RunSummary(Callback):
    """Keep ``summary.json`` in the run folder (see :mod:`src.runtime.summary`).

    An epoch is finished once the model has logged its training figures (at the end of the
    training epoch, after its validation): its entry is written then, before the epoch's
    ``last.ckpt`` (``on_save_checkpoint``), or at the start of the next epoch when no checkpoint is
    saved at the epoch's end.
    """

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._summary: dict[str, Any] = {"epochs": []}
        self._val: dict[str, Any] = {}
        self._ended: int | None = None  # the epoch whose training part ended, until its entry is written

    # ------------------------------------------------------------------ where
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = None if trainer.fast_dev_run else trainer.log_dir  # a collective under DDP
        if stage not in ("fit", "test") or log_dir is None:
            self._folder = None
            return
        self._folder = Path(log_dir)
        if trainer.is_global_zero:
            self._summary = read_summary(self._folder)

    # ------------------------------------------------------------------ fit
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The restored step of a resumed run: what the run did after its checkpoint is replaced
        # as it is done again, and the test figures describe a checkpoint of the earlier fit.
        epochs = self._summary.get("epochs", [])
        self._summary["epochs"] = [e for e in epochs if e.get("step", 0) <= trainer.global_step]
        self._summary.pop("test", None)
        self._val, self._ended = {}, None
        self._write(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._val = _figures(dict(trainer.callback_metrics), lambda k: k.startswith("val_"))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning calls this before the model's own hook, where the training figures are logged.
        self._ended = trainer.current_epoch

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._finish_epoch(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_epoch(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_epoch(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._finish_epoch(trainer)

    def _finish_epoch(self, trainer: Trainer) -> None:
        if self._ended is None or trainer.state.fn != "fit":
            return
        epoch, self._ended = self._ended, None
        train = _figures(dict(trainer.callback_metrics), lambda k: not k.startswith(("val_", "test_")))
        entry = {"epoch": epoch, "step": trainer.global_step, "time": time.time(), **self._val, **train}
        self._val = {}
        epochs = [e for e in self._summary.get("epochs", []) if e["epoch"] < epoch]
        self._summary["epochs"] = [*epochs, entry]
        best = self._best(trainer)
        if best is None:
            self._summary.pop("best", None)
        else:
            self._summary["best"] = best
        self._write(trainer)

    def _best(self, trainer: Trainer) -> dict[str, Any] | None:
        monitor, mode = DEFAULT_MONITOR
        checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint is not None and checkpoint.monitor:
            monitor, mode = checkpoint.monitor, checkpoint.mode
        best = None
        for e in self._summary["epochs"]:
            value = e.get(monitor)
            if value is not None and (
                best is None or (value > best[0] if mode == "max" else value < best[0])
            ):
                best = (value, e["epoch"])
        if best is None:
            return None
        return {"monitor": monitor, "mode": mode, "value": best[0], "epoch": best[1]}

    # ------------------------------------------------------------------ test
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "test":
            return
        figures = _figures(dict(trainer.callback_metrics), lambda k: k.startswith("test_"))
        self._summary["test"] = {**figures, "time": time.time()}
        self._write(trainer)

    # ------------------------------------------------------------------ write
    def _write(self, trainer: Trainer) -> None:
        if self._folder is not None and trainer.is_global_zero:
            self._summary.setdefault("epochs", [])
            write_summary(self._folder, self._summary)
