"""Hugging Face datasets, from the Hub or from local parquet files, offline-safe and with clear errors.

Every Hub-backed DataModule (Fashion-MNIST, AG News) loads its data through :func:`load_hf_dataset`:

- ``hub_name`` only: ``datasets.load_dataset(hub_name)``, cached by ``datasets`` as usual. The Hub
  is probed first with a short timeout; when it cannot be reached (or ``HF_HUB_OFFLINE=1``), only
  the local ``datasets`` cache is tried, so a machine without a network stops in seconds with a
  message that says what to pass, instead of a retry loop.
- ``data_dir``: a folder with ``train.parquet`` and ``test.parquet`` (``validation.parquet``
  optional) in the Hub dataset's schema.
- ``data_files``: an explicit split → file mapping, as ``load_dataset("parquet", data_files=...)``
  takes it (``train`` and ``test`` required, ``validation`` optional).

A local source switches the ``datasets``/``huggingface_hub`` offline flags on while loading, so
nothing touches the network. Class names come from the label column's ``ClassLabel`` feature.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from src.data.base import ClassificationDataModule, DataError

REQUIRED_SPLITS = ("train", "test")
OPTIONAL_SPLITS = ("validation",)
DATA_DIR_HINT = (
    "Pass a local copy instead: --data.init_args.data_dir=DIR (a folder with train.parquet and "
    "test.parquet) or --data.init_args.data_files='{train: a.parquet, test: b.parquet}'."
)


class DataSourceError(DataError):
    """The data could not be loaded from the given source; the message says what to pass instead."""


# ---------------------------------------------------------------------------------------- network
def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_requested() -> bool:
    """Whether the user switched the Hub off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """One HEAD request to the Hub endpoint (``HF_ENDPOINT``, proxies honoured), at most ``timeout`` s.

    Any HTTP answer counts as reachable; DNS failures, refused connections and timeouts do not.
    """
    from huggingface_hub import constants

    request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """Switch ``datasets`` and ``huggingface_hub`` to offline mode for the duration of the block.

    Both libraries read the environment at import time, so their module-level flags are set too
    (and restored afterwards).
    """
    import datasets.config
    from huggingface_hub import constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    targets = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    targets.append((constants, "HF_HUB_OFFLINE"))
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets if hasattr(obj, name)]
    try:
        os.environ.update({k: "1" for k in saved_env})
        for obj, name, _ in saved:
            setattr(obj, name, True)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------- local files
def one_local_source(data_dir: Any, data_files: Any, required: bool = False) -> None:
    """Raise :class:`DataSourceError` unless at most one of ``data_dir`` and ``data_files`` is given
    (exactly one when ``required``)."""
    if data_dir is not None and data_files is not None:
        raise DataSourceError("Pass data_dir or data_files, not both.")
    if required and data_dir is None and data_files is None:
        raise DataSourceError("Pass data_dir or data_files for a local source.")


def resolve_local_files(
    data_dir: str | os.PathLike | None = None, data_files: dict[str, str] | None = None
) -> dict[str, Path]:
    """Check a local source and return its split → parquet file mapping.

    ``data_dir`` must hold ``train.parquet`` and ``test.parquet`` (``validation.parquet`` is picked
    up when present); ``data_files`` must name ``train`` and ``test`` (``validation`` optional).

    Raises:
        DataSourceError: both or neither given, a missing folder or file, or an unknown split.
    """
    one_local_source(data_dir, data_files, required=True)
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataSourceError(
                f"data_dir {str(folder)!r} is not a folder (resolved: {folder.resolve()}). Pass a folder "
                "that holds train.parquet and test.parquet (validation.parquet optional)."
            )
        files = {s: folder / f"{s}.parquet" for s in REQUIRED_SPLITS + OPTIONAL_SPLITS}
        for split in REQUIRED_SPLITS:
            if not files[split].is_file():
                present = sorted(p.name for p in folder.glob("*.parquet")) or "no parquet files"
                raise DataSourceError(
                    f"data_dir {str(folder)!r} has no {split}.parquet (found: {present}). Name the split "
                    "files train.parquet and test.parquet, or map them explicitly with "
                    "--data.init_args.data_files='{train: a.parquet, test: b.parquet}'."
                )
        return {s: p for s, p in files.items() if p.is_file()}
    if not isinstance(data_files, dict):
        raise DataSourceError(
            f"data_files must map split names to files, e.g. {{train: a.parquet, test: b.parquet}}; got {data_files!r}."
        )
    unknown = sorted(set(data_files) - set(REQUIRED_SPLITS + OPTIONAL_SPLITS))
    missing = [s for s in REQUIRED_SPLITS if s not in data_files]
    if unknown or missing:
        raise DataSourceError(
            f"data_files has splits {sorted(data_files)}; it needs train and test (validation optional)"
            + (f", and does not know {unknown}" if unknown else "")
            + ". Example: --data.init_args.data_files='{train: a.parquet, test: b.parquet}'."
        )
    files = {s: Path(p).expanduser() for s, p in data_files.items()}
    for split, path in files.items():
        if not path.is_file():
            raise DataSourceError(
                f"data_files[{split!r}] = {str(path)!r} is not a file (resolved: {path.resolve()}). "
                "Pass the path of a parquet file in the dataset's schema."
            )
    return files


def files_identity(files: dict[str, Path]) -> str:
    """A short key naming these exact files (absolute path, size, modification time) for caches."""
    stats = {
        split: [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
        for split, p in sorted(files.items())
    }
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- loading
def load_hf_dataset(
    hub_name: str,
    data_dir: str | os.PathLike | None = None,
    data_files: dict[str, str] | None = None,
    cache_dir: str | None = None,
    columns: Sequence[str] = (),
    timeout: float = 3.0,
) -> Any:
    """Load a classification dataset as a ``datasets.DatasetDict`` from the Hub or local parquet.

    Args:
        hub_name: Hub dataset id, used when neither ``data_dir`` nor ``data_files`` is given.
        data_dir: folder with ``train.parquet``/``test.parquet`` (``validation.parquet`` optional).
        data_files: split → parquet file mapping (``train`` and ``test`` required).
        cache_dir: the ``datasets`` cache folder (``None``: its default, ``HF_DATASETS_CACHE``).
        columns: columns every split must have (e.g. ``("image", "label")``).
        timeout: seconds allowed for the Hub reachability probe.

    Returns:
        A ``DatasetDict`` with ``train``, ``test`` and possibly ``validation``.

    Raises:
        DataSourceError: the source is missing, unreachable, or not in the expected schema.
    """
    import datasets

    datasets.disable_progress_bars()  # a bar per split and file of a local load: noise in every run
    if data_dir is not None or data_files is not None:
        files = resolve_local_files(data_dir, data_files)
        source = ", ".join(f"{s}={p}" for s, p in files.items())
        for split, path in files.items():
            if (
                _parquet_rows(path) == 0
            ):  # `datasets` would only say 'Instruction "train" corresponds to no data'
                raise DataSourceError(
                    f"{path} (the {split} split) has no rows. Pass a parquet file with at least one sample."
                )
        try:
            with offline_mode():
                ds = datasets.load_dataset(
                    "parquet", data_files={s: str(p) for s, p in files.items()}, cache_dir=cache_dir
                )
        except Exception as err:
            raise DataSourceError(
                f"Could not read the parquet files ({source}): {type(err).__name__}: {err}. Pass parquet "
                f"files in the schema of the Hub dataset {hub_name} (columns {list(columns)})."
            ) from err
    else:
        source = f"the Hub dataset {hub_name!r}"
        offline = offline_requested() or not hub_reachable(timeout)
        reason = "HF_HUB_OFFLINE is set" if offline_requested() else "the Hub cannot be reached"
        try:
            if offline:
                # Still use a copy that `datasets` cached on an earlier, online run.
                with offline_mode():
                    ds = datasets.load_dataset(hub_name, cache_dir=cache_dir)
            else:
                ds = datasets.load_dataset(hub_name, cache_dir=cache_dir)
        except Exception as err:
            if offline:
                raise DataSourceError(
                    f"Cannot load {source}: {reason} and it is not in the local datasets cache. "
                    + DATA_DIR_HINT
                ) from err
            raise DataSourceError(
                f"Cannot load {source}: {type(err).__name__}: {err}. Check the name, or {DATA_DIR_HINT}"
            ) from err
    check_dataset(ds, columns, source)
    return ds


def _parquet_rows(path: str | os.PathLike) -> int | None:
    """Row count from the parquet footer (``None`` if the file cannot be read as parquet)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None  # let `datasets` report what is wrong with it


def check_dataset(ds: Any, columns: Sequence[str], source: str) -> None:
    """Raise :class:`DataSourceError` unless ``ds`` has train and test splits with ``columns``."""
    missing_splits = [s for s in REQUIRED_SPLITS if s not in ds]
    if missing_splits:
        raise DataSourceError(f"{source} has splits {sorted(ds)}, not {missing_splits}.")
    for split, part in ds.items():
        missing = [c for c in columns if c not in part.column_names]
        if missing:
            raise DataSourceError(
                f"The {split} split of {source} has columns {part.column_names} but needs {list(columns)} "
                f"(missing {missing}). Pass files in the schema of the Hub dataset."
            )


def class_names_from(ds: Any, column: str = "label") -> list[str] | None:
    """Class names from the ``ClassLabel`` feature of ``column`` (``None`` if it is not one)."""
    import datasets

    first = next(iter(ds.values())) if hasattr(ds, "values") else ds
    feature = first.features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def parquet_class_names(path: str | os.PathLike, column: str = "label") -> list[str] | None:
    """Class names from the ``datasets`` features stored in a parquet file's schema, without reading
    its rows (``None`` when the file carries no ``ClassLabel`` for ``column``)."""
    import datasets
    import pyarrow.parquet as pq

    try:
        features = datasets.Features.from_arrow_schema(pq.read_schema(path))
    except Exception:  # not parquet / no usable metadata: the full load reports it properly
        return None
    feature = features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


# ---------------------------------------------------------------------------------------- DataModule
def check_labels(labels: Sequence[Any], num_classes: int, split: str, hint: str) -> Tensor:
    """The labels as a long tensor; :class:`DataSourceError` (naming the split, the row or range, and
    ``hint``: what to pass instead) when one is missing, not an integer, or not a class index
    ``0..num_classes-1``."""
    for row, value in enumerate(labels):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise DataSourceError(
                f"The label of row {row} of the {split} split is {value!r}, not a class index. {hint}"
            )
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataSourceError(
            f"Labels of the {split} split run from {int(y.min())} to {int(y.max())}; expected class "
            f"indices 0..{num_classes - 1}. {hint}"
        )
    return y


class HubDataModule(ClassificationDataModule):
    """Base for DataModules whose data is a Hugging Face dataset (Hub name or local parquet).

    Subclasses set :attr:`columns` (and :attr:`label_column`), call :meth:`load_hf` in
    :meth:`load_splits`, and turn the result into tensors. The class names read from the
    ``ClassLabel`` feature are kept in :attr:`class_names` and saved in the checkpoint
    (:meth:`state_dict`), so ``test``/``predict --ckpt_path`` report names without re-reading
    the dataset's metadata.

    Args:
        hub_name: Hugging Face Hub dataset id (used when no local source is given).
        data_dir: folder with ``train.parquet`` and ``test.parquet`` (``validation.parquet``
            optional) in the Hub dataset's schema; switches the Hub off.
        data_files: explicit split → parquet file mapping (``train``, ``test``, optional
            ``validation``), as ``datasets.load_dataset("parquet", data_files=...)`` takes it.
        cache_dir: folder for this project's decoded/tensor caches of the data.
        hf_cache_dir: the ``datasets`` cache (``null``: its default, ``HF_DATASETS_CACHE``).
        **kwargs: batching and split options of :class:`ClassificationDataModule`.
    """

    columns: ClassVar[tuple[str, ...]] = ("label",)
    label_column: ClassVar[str] = "label"
    resumable_options = (
        *ClassificationDataModule.resumable_options,
        "data_dir",
        "data_files",
        "cache_dir",
        "hf_cache_dir",
    )

    def __init__(
        self,
        hub_name: str,
        data_dir: str | None = None,
        data_files: dict[str, str] | None = None,
        cache_dir: str = "data_cache",
        hf_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        one_local_source(data_dir, data_files)
        self.hub_name = hub_name
        self.data_dir = data_dir
        self.data_files = dict(data_files) if data_files is not None else None
        self.cache_dir = Path(cache_dir)
        self.hf_cache_dir = hf_cache_dir
        self._class_names: list[str] | None = None

    @property
    def is_local(self) -> bool:
        return self.data_dir is not None or self.data_files is not None

    def local_files(self) -> dict[str, Path]:
        """The checked split → file mapping of the local source (see :func:`resolve_local_files`)."""
        return resolve_local_files(self.data_dir, self.data_files)

    def source_key(self) -> str:
        """Identity of the data source for cache keys: the local files' identity, or the Hub name."""
        if self.is_local:
            return files_identity(self.local_files())
        return hashlib.sha1(self.hub_name.encode()).hexdigest()[:16]

    def load_hf(self) -> Any:
        """Load the dataset (:func:`load_hf_dataset`), check its columns, remember its class names."""
        ds = load_hf_dataset(
            self.hub_name, self.data_dir, self.data_files, cache_dir=self.hf_cache_dir, columns=self.columns
        )
        names = class_names_from(ds, self.label_column)
        if names is not None:
            self._class_names = names
        return ds

    @property
    def class_names(self) -> list[str]:
        # Read when the CLI links it into the model, i.e. before `setup`: a local source tells its
        # names from the parquet schema alone; otherwise the subclass's defaults stand in.
        if self._class_names is None and self.is_local:
            with contextlib.suppress(DataSourceError):
                self._class_names = parquet_class_names(self.local_files()["train"], self.label_column)
        if self._class_names is None:
            self._class_names = self.default_class_names()
        return self._class_names

    def default_class_names(self) -> list[str]:
        """Names used before/without a ``ClassLabel`` feature (subclasses may know the real ones)."""
        warnings.warn(f"No class names known yet for {self.hub_name}; using class indices.", stacklevel=2)
        return [str(i) for i in range(self.num_classes)]

    # The class names travel in the checkpoint; src/cli.py restores them before the data → model
    # links are read.
    def state_dict(self) -> dict[str, Any]:
        return {"class_names": list(self._class_names)} if self._class_names is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = state_dict.get("class_names")
        if names is not None:
            self._class_names = [str(n) for n in names]
