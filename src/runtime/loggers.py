"""A run's loggers, each tied to the run's one folder, whatever loggers a config lists and in what order.

- The run folder is ``<save_dir>/<name>/version_N`` of the first TensorBoard or CSV logger, wherever
  it is listed; every other TensorBoard/CSV logger writes into that same folder.
- A run with neither (MLflow or W&B alone, or ``--trainer.logger=false``) keeps its folder in
  ``<default_root_dir>/lightning_logs/version_N`` (``./lightning_logs/version_N`` by default).
- MLflow names its run after the folder (``<name>/version_N``, with the tag ``run_folder``) and W&B
  keeps its files in it (``wandb/``), unless the config sets those; a resumed run continues the
  same MLflow or W&B run (their ids are kept in ``logger_runs.json`` in the run folder).

``config.yaml``, the checkpoints and ``summary.json`` are always in the run folder:
:class:`RunTrainer`'s ``log_dir`` is that folder, and a checkpoint callback without a ``dirpath``
saves into its ``checkpoints/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from src.runtime import runs
from src.runtime.run_state import RunState
from src.runtime.workarounds import keep_csv_history

VERSIONED = (TensorBoardLogger, CSVLogger)
RUN_IDS = "logger_runs.json"


class RunTrainer(Trainer):
    """Lightning's Trainer whose ``log_dir`` is the run folder (see :mod:`src.runtime.loggers`), so
    whatever reads it (``config.yaml``, ``last.ckpt``, reports, profilers) finds the one folder."""

    _run_folder: str | None = None
    _fixed = False

    def fix_run_folder(self, folder: Path | None) -> None:
        """The run folder: known on rank 0 (other ranks take rank 0's), ``None`` without one."""
        self._fixed, self._run_folder = True, None if folder is None else str(folder)

    @property
    def log_dir(self) -> str | None:
        if not self._fixed:
            return super().log_dir
        return self.strategy.broadcast(self._run_folder)


def place_loggers(
    loggers: list[Any],
    configs: list[dict[str, Any]],
    default_root_dir: str | None,
    resume: tuple[Path, int] | None,
    state: RunState,
) -> tuple[list[Any], Path | None]:
    """The loggers rebuilt for their run folder, and that folder (``None`` on ranks other than 0
    when it is claimed now: they take rank 0's through Lightning's broadcasts). ``resume`` is the
    folder a resumed run continues and its checkpoint's step."""
    resume_dir, resume_step = resume if resume is not None else (None, None)
    first = next((i for i, lg in enumerate(loggers) if isinstance(lg, VERSIONED)), None)
    if first is None:
        folder = runs.folder_without_logger(
            Path(default_root_dir or ".") / "lightning_logs", resume_dir, state
        )
        placed: list[Any] = []
    else:
        anchor = runs.versioned(loggers[first], configs[first], resume_dir, state)
        folder = Path(anchor.log_dir) if runs.is_rank_zero() else None
        placed = [anchor]
    known = _run_ids(resume_dir)
    out = []
    for i, (logger, config) in enumerate(zip(loggers, configs, strict=True)):
        if i == first:
            out.append(placed[0])
        elif isinstance(logger, VERSIONED) and first is not None:
            out.append(_beside(logger, config, placed[0]))
        elif folder is not None and isinstance(logger, (MLFlowLogger, WandbLogger)):
            out.append(_tracking(logger, config, folder, known.get(type(logger).__name__)))
        else:
            out.append(logger)
    resumed = folder is not None and resume_dir is not None and folder.resolve() == resume_dir.resolve()
    for logger in out:
        if isinstance(logger, CSVLogger) and folder is not None:
            keep_csv_history(logger, resume_step if resumed else None)
    return out, folder


def _beside(logger: Any, config: dict[str, Any], anchor: Any) -> Any:
    """A second TensorBoard/CSV logger, writing into the anchor's run folder."""
    if not runs.is_rank_zero():  # nothing is written there
        return logger
    where = {"save_dir": anchor.save_dir, "name": anchor.name, "version": anchor.version}
    if (
        Path(config.get("save_dir") or ".").resolve() != Path(anchor.save_dir).resolve()
        or config.get("name") != anchor.name
    ):
        rank_zero_info(
            f"{type(logger).__name__} writes into the run folder {anchor.log_dir} (a run keeps its files "
            "in one folder; the save_dir and name given to it are not used)."
        )
    return type(logger)(**{**config, **where})


def _tracking(logger: Any, config: dict[str, Any], folder: Path, run_id: str | None) -> Any:
    """An MLflow or W&B logger whose run is named after the run folder (and continues the run of a
    resumed folder); W&B's files go into the folder."""
    label = f"{folder.parent.name}/{folder.name}"
    args = dict(config)
    if isinstance(logger, MLFlowLogger):
        args["run_name"] = args.get("run_name") or label
        args["tags"] = {"run_folder": str(folder.resolve()), **(args.get("tags") or {})}
        if run_id and not args.get("run_id"):
            args["run_id"] = run_id
    else:
        args["name"] = args.get("name") or label
        if str(args.get("save_dir") or ".") == "." and not args.get("dir"):
            args["save_dir"] = str(folder)
        if run_id and not args.get("id") and not args.get("version"):
            args["id"] = run_id  # Lightning opens W&B runs with resume="allow"
    return type(logger)(**args)


def record_run_ids(trainer: Trainer) -> None:
    """Keep the MLflow/W&B run ids in the run folder, for a resume to continue those runs (rank 0)."""
    ids = {
        type(lg).__name__: lg.version for lg in trainer.loggers if isinstance(lg, (MLFlowLogger, WandbLogger))
    }
    folder = trainer.log_dir  # a collective under DDP
    if ids and folder and trainer.is_global_zero:
        (Path(folder) / RUN_IDS).write_text(json.dumps(ids, indent=1) + "\n")


def _run_ids(resume_dir: Path | None) -> dict[str, str]:
    if resume_dir is None:
        return {}
    try:
        return json.loads((resume_dir / RUN_IDS).read_text())
    except (OSError, ValueError):
        return {}


def checkpoints_into(trainer_callbacks: list[Any], loggers: list[Logger], folder: Path | None) -> None:
    """Checkpoint callbacks without a ``dirpath`` save into ``<run folder>/checkpoints`` when the first
    logger is not the run folder's, or there is none (Lightning would put them under that logger's
    own layout, or under ``default_root_dir``)."""
    if folder is None or (loggers and isinstance(loggers[0], VERSIONED)):
        return
    for cb in trainer_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = str(folder / "checkpoints")
