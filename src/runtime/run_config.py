"""The run's configuration: ``config.yaml`` in its folder and in every checkpoint it writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from src.runtime.checkpoints import CONFIG_KEY
from src.runtime.tuners import check_picks


class RunConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the run folder, also stored in every checkpoint (so a command
    given only the checkpoint runs with the same configuration).

    A fit writes it once the learning-rate and batch-size finders have chosen (they run at the start
    of ``fit``, before this callback's ``on_fit_start``), with the values they chose: what it
    records is what trains. A finder's pick that would not train stops the run there, before
    anything is written (:func:`~src.runtime.tuners.check_picks`).
    """

    _dumped: str | None = None  # dumping takes ~0.1 s: once per run, again only after the tuner

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            self._save(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_picks(trainer)
        tuned = {}
        if pl_module.hparams.get("lr") != self.config.model.init_args.get("lr"):
            tuned["model.init_args.lr"] = self.config.model.init_args.lr = pl_module.hparams.lr
        dm = trainer.datamodule
        if dm is not None and dm.hparams.get("batch_size") != self.config.data.init_args.get("batch_size"):
            tuned["data.init_args.batch_size"] = self.config.data.init_args.batch_size = dm.hparams.batch_size
        if tuned:
            self._dumped = None
            chosen = ", ".join(f"{k}={v}" for k, v in tuned.items())
            rank_zero_info(
                f"The tuner chose {chosen}; the run trains with it, and config.yaml and the checkpoints record it."
            )
        self._save(trainer, pl_module, "fit")

    def _save(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Lightning's ``SaveConfigCallback.setup``, writing the file atomically (a temporary file
        renamed over it): a command reading a run's config.yaml (``--ckpt_path=last`` compares it)
        while that run rewrites it sees the old file or the new one, never half of one."""
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            path = Path(log_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(self._dump())
            os.replace(tmp, path)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self._dump()

    def _dump(self) -> str:
        """The config as YAML: the text of config.yaml and of every checkpoint's copy."""
        if self._dumped is None:
            self._dumped = self.parser.dump(self.config, skip_unset=False)
        return self._dumped
