"""Everything that needs a private part of Lightning, in one place.

Each function names the Lightning version or issue it works around, so it can be deleted when
Lightning changes. Nothing else in the project touches a private attribute of Lightning.
"""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch import LightningModule, Trainer


def deepcopy_without_trainer(module: LightningModule, memo: dict[int, Any], shared: tuple = ()) -> Any:
    """A deep copy of ``module`` that leaves its Trainer out and shares the objects in ``shared``.

    Lightning 2.6's ``WeightAveraging`` (``EMAWeightAveraging``) deep-copies the LightningModule in
    ``setup``, and with it the ``_trainer`` reference: under DDP the Trainer holds the launcher's
    worker processes, which cannot be copied (``cannot pickle '_thread.lock'``).
    """
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    for obj in shared:
        memo[id(obj)] = obj
    state = {k: v for k, v in module.__dict__.items() if k != "_trainer"}
    new.__setstate__(copy.deepcopy(state, memo))
    new._trainer = None
    return new


def restore_loader_position(trainer: Trainer) -> None:
    """Apply a checkpoint's training-loader position before the first resumed batch.

    Lightning 2.6 skips restoring a stateful train loader when ``trainer.estimated_stepping_batches``
    was read before the restore, as every schedule with ``total_steps`` does (Lightning issue
    #20550); calling the loop's own loader is a no-op when nothing is pending.
    """
    trainer.fit_loop._load_combined_loader_states()
