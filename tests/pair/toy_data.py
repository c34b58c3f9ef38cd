"""Toy blobs: float feature vectors in three classes, read from CSV files in a folder.

python -m src.cli fit --config tests/pair/toy.yaml --data.init_args.data_root=<folder>

The folder holds ``train.csv`` and ``test.csv`` (header ``x0,...,x5,label``; one sample per row).
The features have very different scales, so each is standardised with a mean and standard deviation
fitted on the training part; that fitted state travels in the checkpoint, so ``predict`` and the
tools classify raw vectors from the checkpoint alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from src.data.base import ClassificationDataModule, DataError, Split

NUM_FEATURES = 6
CLASS_NAMES = ("amber", "blue", "crimson")


class ToyBlobs(ClassificationDataModule):
    """Gaussian blobs from ``train.csv`` and ``test.csv`` in ``data_root``, standardised per feature.

    Args:
        data_root: folder holding ``train.csv`` and ``test.csv``.
        predict_inputs: raw feature vectors (six numbers each) to classify in ``predict``; without
            them ``predict`` classifies the test split.
        **kwargs: batching and split options of :class:`ClassificationDataModule`.
    """

    # Where the data is read from and what to predict: a resumed run may change them.
    resumable_options: ClassVar[tuple[str, ...]] = (
        *ClassificationDataModule.resumable_options,
        "data_root",
        "predict_inputs",
    )

    def __init__(
        self,
        data_root: str = "data/toy_blobs",
        predict_inputs: list[list[float]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for i, row in enumerate(predict_inputs or []):
            if len(row) != NUM_FEATURES:
                raise DataError(
                    f"predict_inputs[{i}] has {len(row)} numbers; each input is {NUM_FEATURES} numbers."
                )
        self.data_root = Path(data_root)
        self.predict_inputs = predict_inputs
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(CLASS_NAMES)

    @property
    def input_size(self) -> int:
        return NUM_FEATURES

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    # ------------------------------------------------------------------ reading
    def load_splits(self) -> dict[str, Split]:
        return {split: self._read(split) for split in ("train", "test")}

    def _read(self, split: str) -> Split:
        path = self.data_root / f"{split}.csv"
        hint = "Pass --data.init_args.data_root=<folder with train.csv and test.csv>."
        if not path.is_file():
            raise DataError(f"ToyBlobs: there is no {split}.csv in {str(self.data_root)!r}. {hint}")
        try:
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
        except ValueError as err:
            raise DataError(f"ToyBlobs: {str(path)!r} is not a table of numbers ({err}). {hint}") from err
        if table.shape[1] != NUM_FEATURES + 1:
            raise DataError(
                f"ToyBlobs: {str(path)!r} has {table.shape[1]} columns; expected {NUM_FEATURES} features "
                "and a label."
            )
        labels = table[:, -1]
        if not np.isin(labels, np.arange(self.num_classes)).all():
            raise DataError(f"ToyBlobs: {str(path)!r} has labels outside 0..{self.num_classes - 1}.")
        return torch.as_tensor(table[:, :-1], dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_inputs is not None and self.mean is not None:
            # Raw vectors and a normalisation from the checkpoint: no data file is read.
            self.splits["predict"] = self._inputs_split()
            return
        if "train" not in self.splits:
            super().setup(stage)
        if self.mean is None or self.std is None:
            # Statistics of the training part only (validation already carved off): no leakage.
            x = self.splits["train"][0].cpu()
            self.mean, self.std = x.mean(0), x.std(0, correction=0).clamp_min(1e-6)
        if stage == "predict":
            inputs = self.predict_inputs is not None
            self.splits["predict"] = self._inputs_split() if inputs else self.splits["test"]

    def _inputs_split(self) -> Split:
        x = torch.tensor(self.predict_inputs, dtype=torch.float32)
        split = (x, torch.zeros(len(x), dtype=torch.long))
        device = self._device() if self.loader == "tensors" else None
        return tuple(t.to(device) for t in split) if device is not None else split

    def predict_dataloader(self) -> Any:
        if "predict" not in self.splits:
            self.setup("predict")
        return self._make_loader("predict", train=False)

    def transform_batch(self, batch: Split, training: bool) -> Split:
        x, *rest = batch
        self.check_fitted()
        return ((x.float() - self.mean.to(x.device)) / self.std.to(x.device), *rest)

    # ------------------------------------------------------------------ fitted state
    def check_fitted(self) -> None:
        """The per-feature normalisation is known (fitted in ``setup`` or restored from a checkpoint)."""
        if self.mean is None or self.std is None:
            raise DataError(
                "ToyBlobs has no feature normalisation: run setup() on the training data, or load it from "
                "a checkpoint written by fit."
            )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.mean is not None and self.std is not None:
            state.update(mean=self.mean.tolist(), std=self.std.tolist())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "mean" in state_dict and "std" in state_dict:
            self.mean = torch.tensor(state_dict["mean"], dtype=torch.float32)
            self.std = torch.tensor(state_dict["std"], dtype=torch.float32)
