"""Shared DataModule base: splits, in-memory tensor batching, and what the model needs to know.

Every dataset here fits in memory, so the default path keeps each split as tensors on the
training device and slices mini-batches from them (:class:`TensorBatches`): no per-sample
``__getitem__``, no worker processes, no per-batch host-to-device copies. ``loader="dataloader"``
switches to a plain ``torch.utils.data.DataLoader`` for comparison or for data that does not fit.

The base also says how one raw input (a JSON value sent to the server, or described in an export's
sidecar) becomes a model input: by default a nested list of numbers with one sample's shape, put
through the same eval-time :meth:`~ClassificationDataModule.transform_batch` as ``predict``.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from src.data.raw_inputs import float_array
from src.runtime.errors import UsageError
from src.runtime.value_types import NonNegativeInt, PositiveInt, to_plain

Split = tuple[Tensor, ...]
"""One split: ``(inputs, labels)`` (text datasets may add more tensors, e.g. lengths)."""


class DataError(UsageError, ValueError):
    """The data cannot be used as configured; the message says what is wrong and what to pass."""


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TensorBatches:
    """Mini-batches sliced from tensors that already sit on the training device.

    Each epoch draws a permutation from ``seed + epoch``, the epoch read from ``epoch`` (the
    trainer's current epoch), so a resumed run replays the same order. The loader is stateful
    (``state_dict``/``load_state_dict``, which Lightning saves in every checkpoint): a run resumed
    from a mid-epoch checkpoint skips the batches of that epoch it had already trained on. Under
    ``torch.distributed`` each rank takes its own shard: for training the permutation is padded
    (like ``DistributedSampler``) so every rank runs the same number of steps; for evaluation the
    shards are left unpadded (rank ``r`` takes samples ``r, r + world, ...``), so metrics cover every
    sample exactly once.

    Args:
        tensors: tensors with the same first dimension.
        batch_size: samples per batch (per rank).
        shuffle: draw a new permutation each epoch.
        drop_last_single: drop the last batch only when it holds a single sample (training:
            BatchNorm cannot normalise one sample, and one sample is not worth a step).
        seed: base seed of the per-epoch permutation.
        epoch: returns the current epoch (default: always 0).
        even_shards: pad shards to equal size across ranks (training).
        collate: optional function applied to each sliced batch (e.g. trim padding).
    """

    def __init__(
        self,
        tensors: Split,
        batch_size: int,
        shuffle: bool = False,
        drop_last_single: bool = False,
        seed: int = 0,
        epoch: Callable[[], int] | None = None,
        even_shards: bool = False,
        collate: Callable[[Split], Split] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError("all tensors of a split must have the same length")
        self.tensors = tensors
        # The samples, for code that asks a loader for its dataset (Lightning's batch-size finder
        # stops at the dataset's size).
        self.dataset = TensorDataset(*tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last_single = drop_last_single
        self.seed = seed
        self._epoch_fn = epoch
        self.even_shards = even_shards
        self.collate = collate
        self._served = 0  # batches handed out in the current pass (for mid-epoch checkpoints)
        self._served_epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) from a checkpoint

    @property
    def epoch(self) -> int:
        return self._epoch_fn() if self._epoch_fn is not None else 0

    def state_dict(self) -> dict[str, int]:
        """Position in the current epoch; Lightning stores it in the checkpoint."""
        return {"epoch": self._served_epoch, "batches_served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip the batches already served in ``state['epoch']`` when that epoch is iterated next."""
        self._resume = (int(state["epoch"]), int(state["batches_served"]))

    def _num_local(self) -> int:
        n = len(self.tensors[0])
        rank, world = _rank_and_world()
        if world == 1:
            return n
        if self.even_shards:
            return math.ceil(n / world)
        return len(range(rank, n, world))

    def __len__(self) -> int:
        return math.ceil(self._stop(self._num_local()) / self.batch_size)

    def _stop(self, m: int) -> int:
        """Samples served out of ``m``: all, or up to the last full batch when a one-sample batch is dropped."""
        rest = m % self.batch_size
        return m - rest if self.drop_last_single and rest == 1 else m

    def _indices(self, epoch: int) -> Tensor | None:
        """Sample indices for this rank and epoch, or ``None`` for the identity (fast slicing)."""
        n = len(self.tensors[0])
        rank, world = _rank_and_world()
        if not self.shuffle and world == 1:
            return None
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if world > 1:
            if self.even_shards:
                total = math.ceil(n / world) * world
                idx = torch.cat([idx, idx[: total - n]]) if total > n else idx
            idx = idx[rank::world]
        return idx

    def __iter__(self) -> Iterator[Split]:
        epoch = self.epoch
        idx = self._indices(epoch)
        # One gather per epoch, then every batch is a cheap view.
        data = self.tensors if idx is None else tuple(t[idx.to(t.device)] for t in self.tensors)
        stop = self._stop(len(data[0]))
        # A checkpoint saved at the end of an epoch names that epoch, so the next one skips nothing.
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        self._served, self._served_epoch = skip, epoch
        for start in range(skip * self.batch_size, stop, self.batch_size):
            self._served += 1
            batch = tuple(t[start : start + self.batch_size] for t in data)
            yield self.collate(batch) if self.collate is not None else batch


class ClassificationDataModule(LightningDataModule):
    """Base DataModule of the project's classification datasets.

    Subclasses implement :meth:`load_splits` (CPU tensors for ``train``/``test`` and optionally
    ``val``) and the properties :attr:`num_classes`, :attr:`input_size` and :attr:`class_names`,
    which the CLI links into the model so they are never configured twice. Per-batch work that
    must see the device (normalisation, augmentation) goes in :meth:`transform_batch`.

    Args:
        batch_size: training batch size (per device).
        eval_batch_size: batch size for validation/test/predict (default: ``4 * batch_size``).
        val_size: samples carved from the training split for validation when the dataset has no
            validation split (a count, or a fraction in (0, 1)). ``0``: no validation at all (not
            even a source's own split), every training sample is trained on: the final fit once
            the settings were chosen with validation. The CLI then switches off early stopping and
            keeps the last epoch's weights as the checkpoint.
        split_seed: seed of the train/validation split (fixed so runs are comparable).
        shuffle_seed: base seed of the per-epoch training permutation.
        loader: ``tensors`` (whole split on the device, sliced batches) or ``dataloader`` (a
            classic ``DataLoader`` over a ``TensorDataset``).
        num_workers: worker processes of the ``dataloader`` path.
    """

    # What the data yields, checked against the model's `input_kind` before anything is built.
    input_kind: ClassVar[Literal["features", "tokens"]] = "features"
    # The init_args a resumed run (`fit --ckpt_path`) may change: how the data is read, not what it
    # is. Subclasses extend it with theirs (where the data is read from, caches, predict inputs).
    resumable_options: ClassVar[tuple[str, ...]] = ("num_workers", "eval_batch_size")

    def __init__(
        self,
        batch_size: PositiveInt = 128,
        eval_batch_size: PositiveInt | None = None,
        val_size: int | float = 0.1,
        split_seed: int = 42,
        shuffle_seed: int = 0,
        loader: Literal["tensors", "dataloader"] = "tensors",
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        # Collects the subclass's arguments too: the checkpoint then carries the data settings.
        self.save_hyperparameters()
        self.hparams.update(to_plain(dict(self.hparams)))
        if val_size < 0 or (isinstance(val_size, float) and val_size >= 1):
            raise DataError(
                f"val_size must be 0 (no validation), a count >= 1 or a fraction in (0, 1), got {val_size}"
            )
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 4 * batch_size)
        self.val_size = to_plain(val_size)
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.loader = loader
        self.num_workers = num_workers
        self.splits: dict[str, Split] = {}

    # ------------------------------------------------------------------ what subclasses provide
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        """Size of one input as the model reads it (features, signal length, vocabulary size)."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(self.num_classes)]

    @property
    def has_validation(self) -> bool:
        """False when ``val_size`` is 0: the run trains on every training sample and never validates."""
        return self.val_size != 0

    def load_splits(self) -> dict[str, Split]:
        """CPU tensors per split: ``train`` and ``test`` required, ``val`` optional."""
        raise NotImplementedError

    def transform_batch(self, batch: Split, training: bool) -> Split:
        """Per-batch transform on the device (normalisation, augmentation). Identity by default."""
        return batch

    def collate(self, batch: Split) -> Split:
        """Applied to each sliced batch before transfer (e.g. trimming padding). Identity by default."""
        return batch

    def data_fingerprint(self) -> str | None:
        """A digest of the data this module loaded, recorded in each run folder and checkpoint
        (:mod:`src.runtime.provenance`) so a command says when it runs on other data than a
        checkpoint was trained on. Default: SHA-256 over the ``train``/``val``/``test`` split tensors
        as :meth:`setup` left them (names, dtypes, shapes and bytes: the validation carve is part of
        it); ``None`` when none is loaded (a ``predict`` of given inputs). A DataModule whose data is
        better named otherwise (a dataset revision, a file checksum) overrides it."""
        splits = {name: self.splits[name] for name in ("train", "val", "test") if name in self.splits}
        return tensors_digest(splits) if splits else None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = dict(self.load_splits())
        for name, split in splits.items():
            if len(split[0]) == 0:
                raise DataError(
                    f"{type(self).__name__}: the {name!r} split has no samples. Check the data source "
                    "(path, split names, filters) in the data options."
                )
        if not self.has_validation:
            splits.pop("val", None)
        elif "val" not in splits:
            splits["train"], splits["val"] = self._carve_val(splits["train"])
        device = self._device()
        if self.loader == "tensors" and device is not None:
            splits = {k: tuple(t.to(device) for t in v) for k, v in splits.items()}
        self.splits = splits

    def _device(self) -> torch.device | None:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else None

    def _carve_val(self, train: Split) -> tuple[Split, Split]:
        n = len(train[0])
        n_val = int(round(self.val_size * n)) if isinstance(self.val_size, float) else int(self.val_size)
        if not 0 < n_val < n:
            raise DataError(
                f"val_size={self.val_size} leaves no training or no validation data out of {n} training "
                "samples; pass a count between 1 and the training-set size minus 1, or a fraction in (0, 1)."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        return tuple(t[train_idx] for t in train), tuple(t[val_idx] for t in train)

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def _make_loader(self, split: str, train: bool) -> TensorBatches | DataLoader:
        if not self.splits:
            self.setup()
        tensors = self.splits[split]
        batch_size = self.batch_size if train else self.eval_batch_size
        trainer = getattr(self, "trainer", None)
        # `--trainer.overfit_batches` trains on the same first batches every epoch, as Lightning
        # makes a DataLoader's sampler sequential for it.
        shuffle = train and not (trainer is not None and trainer.overfit_batches)
        if self.loader == "dataloader":
            return DataLoader(
                TensorDataset(*tensors),
                batch_size=batch_size,
                shuffle=shuffle,
                drop_last=train and len(tensors[0]) % batch_size == 1,  # no single-sample BN step
                num_workers=self.num_workers,
                collate_fn=lambda samples: self.collate(torch.utils.data.default_collate(samples)),
                persistent_workers=self.num_workers > 0,
            )
        return TensorBatches(
            tensors,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last_single=train,
            seed=self.shuffle_seed,
            epoch=self._epoch,
            even_shards=train,
            collate=self.collate,
        )

    def train_dataloader(self) -> TensorBatches | DataLoader:
        return self._make_loader("train", train=True)

    def val_dataloader(self) -> TensorBatches | DataLoader | list:
        if not self.has_validation:
            return []  # Lightning skips the validation loop
        return self._make_loader("val", train=False)

    def test_dataloader(self) -> TensorBatches | DataLoader:
        return self._make_loader("test", train=False)

    def predict_dataloader(self) -> TensorBatches | DataLoader:
        return self._make_loader("test", train=False)

    def transfer_batch_to_device(self, batch: Split, device: torch.device, dataloader_idx: int) -> Split:
        # In-memory batches are views of tensors already on the device: skip Lightning's generic
        # walk over the batch (a per-step cost comparable to a small model's step).
        if isinstance(batch, tuple) and all(isinstance(t, Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Split, dataloader_idx: int) -> Split:
        if not isinstance(batch, (tuple, list)):  # e.g. the model summary's example input
            return batch
        trainer = getattr(self, "trainer", None)
        training = bool(trainer is not None and trainer.training)
        return self.transform_batch(tuple(batch), training=training)

    # ------------------------------------------------------------------ raw inputs (export, serve)
    # The default is for fixed-shape float features; image and text DataModules override it.
    @property
    def input_shape(self) -> tuple[int | str, ...]:
        """One sample's shape as the model reads it; a string names a variable axis (``"sequence"``)."""
        return (self.input_size,)

    def check_fitted(self) -> None:
        """Raise :class:`DataError` naming what is missing when state fitted on the training data
        (a normalisation, a vocabulary) is absent: a DataModule rebuilt from a checkpoint must not
        go looking for its data. Nothing is fitted by default."""

    def parse_raw_input(self, value: Any) -> np.ndarray:
        """One raw JSON value → one sample as a NumPy array, ready for :meth:`raw_inputs_to_batch`.

        Runs in the server's HTTP process, in threads, for every input before it is queued for the
        model: no torch, no side effects, and cheap. Raise
        :class:`~src.data.raw_inputs.RawInputError` saying what is wrong. Default: a nested list of
        finite numbers of shape :attr:`input_shape`, as float32.
        """
        return float_array(value, self.input_shape)

    def raw_inputs_to_batch(self, samples: Sequence[np.ndarray]) -> Tensor:
        """Samples from :meth:`parse_raw_input` → the model's input batch, as ``predict`` feeds it:
        stacked, then :meth:`transform_batch` at eval time."""
        return self._eval_transform(torch.from_numpy(np.stack(samples)))

    def example_inputs(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` synthetic model inputs (the export's parity check, when the test data is gone).
        Default: standard-normal features through :meth:`transform_batch`; a DataModule with a
        variable axis in :attr:`input_shape` overrides it."""
        return self._eval_transform(torch.randn(n, *self.input_shape, generator=generator))

    def _eval_transform(self, x: Tensor) -> Tensor:
        # with placeholder labels: a transform may unpack (inputs, labels)
        return self.transform_batch((x, torch.zeros(len(x), dtype=torch.long)), training=False)[0]

    def model_input_spec(self) -> dict[str, Any]:
        """Name, dtype and shape of the model's input tensor (variable axes named: ``"batch"``, ...)."""
        tokens = self.input_kind == "tokens"
        return {
            "name": "token_ids" if tokens else "input",
            "dtype": "int64" if tokens else "float32",
            "shape": ["batch", *self.input_shape],
        }

    def describe_raw_inputs(self) -> dict[str, Any]:
        """How a raw input becomes a model input, for an export's sidecar and the server's ``/info``.

        ``self_contained`` says whether the steps are complete without this project's code: the
        default cannot describe an overridden :meth:`transform_batch`, so a DataModule that
        normalises at eval time overrides this to state its statistics.
        """
        shape = [d for d in self.input_shape if isinstance(d, int)]
        identity = type(self).transform_batch is ClassificationDataModule.transform_batch
        where = f"{type(self).__module__}.{type(self).__qualname__}.transform_batch"
        return {
            "kind": "features",
            "raw_input": f"a list of {shape[0]} numbers"
            if len(shape) == 1
            else f"a nested list of numbers of shape {shape}",
            "normalisation": None,
            "steps": [
                f"stack the inputs into a float32 (batch, {', '.join(map(str, shape))}) array",
                "nothing else" if identity else f"then {where}(batch, training=False): this project's code",
            ],
            "self_contained": identity,
        }


def tensors_digest(splits: dict[str, Split]) -> str:
    """``sha256:<hex>`` of named tensors: each one's name, dtype, shape and bytes (copied to the CPU)."""
    digest = hashlib.sha256()
    for name, split in sorted(splits.items()):
        for i, tensor in enumerate(split):
            flat = tensor.detach().reshape(-1).cpu().contiguous()
            digest.update(f"{name}[{i}] {flat.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return f"sha256:{digest.hexdigest()}"


# ---------------------------------------------------------------------------------- tensor caches
def save_cache(tensors: dict[str, Any], path: Path) -> None:
    """Write a tensor cache atomically (temporary file + rename): a crash or a concurrent reader
    never sees half a file. An unwritable folder is a :class:`DataError` saying what to pass."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(tensors, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(
            f"cannot write the data cache {path}: {err.strerror or err}. Pass a writable folder with "
            "--data.init_args.cache_dir=<folder>."
        ) from err


def load_cache(path: Path) -> dict[str, Any] | None:
    """Read a tensor cache written by :func:`save_cache`; ``None`` (with a warning) when the file is
    unreadable (truncated, foreign), so the caller rebuilds it."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # truncated or foreign: rebuilt from the source
        warnings.warn(
            f"The data cache {path} is unreadable ({type(err).__name__}); rebuilding it.", stacklevel=2
        )
        return None
