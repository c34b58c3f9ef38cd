"""Everything that needs a private part of Lightning, in one place.

Each function names the Lightning version or issue it works around, so it can be deleted when
Lightning changes. Nothing else in the project touches a private attribute of Lightning.
"""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI


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


def instantiate_data_as_lightning_does(cli: LightningCLI, class_type: type, *args: Any, **kwargs: Any) -> Any:
    """Build the DataModule the way LightningCLI 2.6 does, through its private ``_InstantiatorFn``.

    It records the DataModule's parsed settings with ``_class_path``/``_instantiator`` in the
    checkpoint (what ``LightningDataModule.load_from_checkpoint`` needs in subclass mode); a custom
    instantiator (the CLI's, which restores a checkpoint's fitted data state before the data → model
    links are read) must go through it to keep checkpoints the same.
    """
    from lightning.pytorch.cli import _InstantiatorFn

    return _InstantiatorFn(cli=cli, key="data")(class_type, *args, **kwargs)


def keep_csv_history(logger: Any, until_step: int | None) -> None:
    """Start a CSVLogger in a run folder that already holds a ``metrics.csv`` without losing it.

    Lightning 2.6's CSV writer deletes an existing ``metrics.csv`` when it starts in a folder that
    is not empty (``_ExperimentWriter._check_log_dir_exists``, with the warning "Experiment logs
    directory ... exists and is not empty"), which a run folder always is: a resumed run would lose
    the rows of its earlier part. The rows up to ``until_step`` (the checkpoint's step; the rest is
    logged again) are read first and handed to the new writer (its ``metrics`` and ``metrics_keys``),
    which writes them back ahead of the new ones at its next save.
    """
    import csv
    import warnings
    from pathlib import Path

    path = Path(logger.log_dir) / "metrics.csv"
    rows, keys = [], []
    if until_step is not None and path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if not r.get("step") or float(r["step"]) <= until_step]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        writer = logger.experiment
    if rows:
        writer.metrics[:0] = rows
        writer.metrics_keys[:0] = [k for k in keys if k not in writer.metrics_keys]


def tensor_version(tensor: Any) -> int | None:
    """The autograd version counter of ``tensor`` (``Tensor._version``): it goes up with every
    in-place change made through PyTorch's operations (an optimiser step, a BatchNorm statistics
    update, ``copy_``), not with writes through ``.data``. PyTorch has no public accessor for it
    (pytorch/pytorch#30291 asks for a way to set it; reading it is as private). ``None`` where a
    tensor has none (one made under ``torch.inference_mode``)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None
