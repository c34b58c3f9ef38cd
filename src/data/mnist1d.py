"""MNIST-1D: 1-D signals of length 40 in 10 classes, generated offline by the ``mnist1d`` package.

python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from src.data.base import ClassificationDataModule, Split, load_cache, save_cache
from src.runtime.value_types import NonNegativeInt, OpenUnitInterval, PositiveInt


class MNIST1D(ClassificationDataModule):
    """MNIST-1D generated with the ``mnist1d`` package and cached as a tensor file.

    The dataset is generated once per parameter set into ``cache_dir`` (keyed by a hash of the
    generation arguments) and reused by later runs. The package's own train/test split is kept:
    ``test`` is its held-out part and validation is carved from its training part.

    Args:
        cache_dir: folder for the generated dataset.
        num_samples: total samples generated (train + test); raise it for scaling runs.
        train_split: fraction of ``num_samples`` in the package's training split.
        length: length of each signal (the package's ``final_seq_length``).
        data_seed: generation seed of the ``mnist1d`` package.
        shift_augment: train-time random circular shifts of up to this many steps (0 = off).
        **kwargs: batching and split options of :class:`ClassificationDataModule`.
    """

    resumable_options = (*ClassificationDataModule.resumable_options, "cache_dir")

    def __init__(
        self,
        cache_dir: str = "data_cache/mnist1d",
        num_samples: PositiveInt = 5000,
        train_split: OpenUnitInterval = 0.8,
        length: PositiveInt = 40,
        data_seed: int = 42,
        shift_augment: NonNegativeInt = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cache_dir = Path(cache_dir)
        self.shift_augment = shift_augment
        self.gen_args = {
            "num_samples": num_samples,
            "train_split": train_split,
            "final_seq_length": length,
            "seed": data_seed,
        }

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_size(self) -> int:
        return self.gen_args["final_seq_length"]

    @property
    def cache_file(self) -> Path:
        key = hashlib.sha1(json.dumps(self.gen_args, sort_keys=True).encode()).hexdigest()[:12]
        return self.cache_dir / f"mnist1d_{key}.pt"

    def prepare_data(self) -> None:
        if not self.cache_file.is_file():
            self._generate()

    def _generate(self) -> dict[str, Any]:
        import mnist1d.data

        args = mnist1d.data.get_dataset_args()
        for k, v in self.gen_args.items():
            setattr(args, k, v)
        data = mnist1d.data.make_dataset(args)
        tensors = {
            "x": torch.as_tensor(data["x"], dtype=torch.float32),
            "y": torch.as_tensor(data["y"], dtype=torch.long),
            "x_test": torch.as_tensor(data["x_test"], dtype=torch.float32),
            "y_test": torch.as_tensor(data["y_test"], dtype=torch.long),
            "args": json.dumps(self.gen_args),
        }
        save_cache(tensors, self.cache_file)
        return tensors

    def load_splits(self) -> dict[str, Split]:
        data = load_cache(self.cache_file) if self.cache_file.is_file() else None
        if data is None:
            data = self._generate()
        return {"train": (data["x"], data["y"]), "test": (data["x_test"], data["y_test"])}

    def transform_batch(self, batch: Split, training: bool) -> Split:
        if not (training and self.shift_augment):
            return batch
        x, *rest = batch
        return (random_circular_shift(x, self.shift_augment), *rest)

    def describe_raw_inputs(self) -> dict[str, Any]:
        # transform_batch only augments in training: a raw signal is the model's input as it is
        return {
            **super().describe_raw_inputs(),
            "kind": "signal",
            "raw_input": f"a list of {self.input_size} numbers (an MNIST-1D signal)",
            "steps": ["stack the signals into a float32 (batch, length) array; no normalisation"],
            "self_contained": True,
        }


def random_circular_shift(x: Tensor, max_shift: int) -> Tensor:
    """Roll each signal in ``x`` (batch, length) by its own random offset in [-max_shift, max_shift]."""
    n, length = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (n, 1), device=x.device)
    idx = (torch.arange(length, device=x.device).unsqueeze(0) - shift) % length
    return torch.gather(x, 1, idx)
