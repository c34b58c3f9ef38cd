"""``--trainer.callbacks+=tests.helpers.saves.CountSaves``: records the step of every checkpoint that
is serialised (every ``torch.save`` call of the run) in ``<run folder>/serialised_steps.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class CountSaves(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        real_save, steps = torch.save, self.steps

        def counting_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(obj, dict) and "global_step" in obj:
                steps.append(obj["global_step"])
            real_save(obj, f, *args, **kwargs)

        torch.save = counting_save

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        (Path(trainer.log_dir) / "serialised_steps.json").write_text(json.dumps(self.steps))
