"""Exponential moving average of the weights, evaluated consistently from checkpoints."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMAWeights(EMAWeightAveraging):
    """Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging`: validation and
    checkpoints use the averaged weights; `test`/`validate`/`predict` from a checkpoint always
    score those averaged weights.

    Lightning's callback, once it holds an averaged model (from `fit`), loads every checkpoint's
    *raw* weights into the model, also in `trainer.test(ckpt_path="best")` right after `fit`
    (``--test_after_fit=true``): that test scored the raw weights while ``test --ckpt_path`` in a
    new process scored the averaged ones. Here a checkpoint loaded outside `fit` keeps its
    ``state_dict`` (the averaged weights); resuming `fit` restores both, as before.

    Args: those of ``EMAWeightAveraging`` (``decay``, ``update_every_n_steps``, ...).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # The project's configure_model only compiles the network in place (nothing sharded),
            # so Lightning's warning about sharded layers does not apply.
            warnings.filterwarnings("ignore", message=r".*overrides the configure_model callback")
            super().setup(trainer, pl_module, stage)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # the state_dict already loaded holds the averaged weights
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
