"""What keeps runs safe to kill, resume and run side by side.

- :class:`SafeCheckpointIO` writes each checkpoint to a temporary file in the same folder, flushes
  it to disk and renames it over the target, so a crash mid-save leaves the previous file intact;
  it loads checkpoints with ``torch.load(weights_only=True)`` only (loading never runs code).
- :func:`load_checkpoint` is that safe load with a clear error for the CLI.
- :func:`assign_log_version` gives each run its own log folder even when runs start at the same
  moment, and points ``fit --ckpt_path last`` at the run it resumes.

The CLI installs all of this by default.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.loggers import Logger


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, corrupt, or needing unsafe unpickling."""


def load_checkpoint(path: _PATH, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` saying what to do."""
    path = os.fspath(path)
    if not get_filesystem(path).exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist. Pass the path of a .ckpt file.")
    try:
        with get_filesystem(path).open(path, "rb") as f:
            ckpt = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(_corrupt(path, err)) from err
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(err))
        raise CheckpointError(
            f"refused to load checkpoint {path!r}: it contains pickled Python objects"
            f"{' (' + found.group(1) + ')' if found else ''}, and unpickling them could run arbitrary code. "
            "This project's checkpoints hold only tensors and plain values; if you trust the file, load "
            "it once with torch.load(path, weights_only=False) and save its state_dict again."
        ) from err
    except Exception as err:
        raise CheckpointError(_corrupt(path, err)) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(_corrupt(path, TypeError(f"found a {type(ckpt).__name__}, not a dict")))
    return ckpt


def _corrupt(path: str, err: BaseException) -> str:
    first = (str(err).splitlines() or [""])[0]
    return (
        f"could not read checkpoint {path!r}: {type(err).__name__}: {first}\n"
        "The file is corrupt, truncated or not a Lightning checkpoint. Point --ckpt_path to a .ckpt "
        "written by this project (e.g. lightning_logs/<run>/version_N/checkpoints/last.ckpt)."
    )


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, fsynced checkpoint writes and code-free (``weights_only``) loads.

    Lightning's own save goes through a temporary file in the system temp folder and moves it into
    place: a copy, not an atomic rename, when that folder is on another filesystem, and nothing is
    flushed to disk. Here the temporary file sits next to the target, so ``os.replace`` is atomic.
    Remote (fsspec URL) paths fall back to Lightning's save.

    The checkpoint is serialised into the temporary file by the caller; flushing it to disk, the
    rename and the folder's flush (together often longer than a whole epoch of a small model)
    then run on a background thread while training goes on, in order with later saves and
    removals. A save to a path waits for the previous save to that path; loading, ``flush()`` and
    ``teardown()`` (the end of every ``fit``/``test``) wait for all of them, and a failed one is
    raised there or at the next save. Under ``torch.distributed`` (other ranks may read the file)
    and with ``background_sync=False`` everything happens before ``save_checkpoint`` returns.

    Args:
        background_sync: fsync and rename on a background thread (single process only).
    """

    def __init__(self, background_sync: bool = True) -> None:
        super().__init__()
        self.background_sync = background_sync
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}  # target path -> its latest fsync/rename (or removal)
        self._tmp_ids = itertools.count()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            self.flush()
            return super().save_checkpoint(checkpoint, path, storage_options)
        self._raise_failed()
        target = Path(path)
        earlier = self._pending.get(str(target))
        if earlier is not None:  # never two writes of one file in flight
            earlier.result()
        target.parent.mkdir(parents=True, exist_ok=True)
        # Hidden and not ending in .ckpt: never mistaken for a checkpoint by `--ckpt_path last`.
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}.{next(self._tmp_ids)}")
        f = open(tmp, "wb")  # noqa: SIM115  (closed by _commit or below)
        try:
            torch.save(checkpoint, f)
            f.flush()
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        if self.background_sync and not (dist.is_available() and dist.is_initialized()):
            self._pending[str(target)] = self._submit(_commit, f, tmp, target)
        else:
            _commit(f, tmp, target)

    def remove_checkpoint(self, path: _PATH) -> None:
        if self._executor is None:
            return super().remove_checkpoint(path)
        # After the saves already queued (the new best file is in place before the old one goes).
        self._pending[f"remove {path}"] = self._submit(super().remove_checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(
                "weights_only=False is refused: loading a checkpoint must not run arbitrary code."
            )
        self.flush()
        return load_checkpoint(path, map_location=map_location)

    def flush(self) -> None:
        """Wait until every checkpoint saved so far is on disk; raise the first failed write."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()  # the queue runs in order
        self._raise_failed()

    def teardown(self) -> None:
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _submit(self, fn: Any, *args: Any) -> Future:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-sync")
        return self._executor.submit(fn, *args)

    def _raise_failed(self) -> None:
        for key, future in list(self._pending.items()):
            if future.done():
                del self._pending[key]
                future.result()  # re-raises the write's error


def _commit(f: Any, tmp: Path, target: Path) -> None:
    """Flush the written temporary file to disk and rename it over ``target`` (atomic)."""
    try:
        with f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- log folders
def _versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(p.name[8:]) for p in root.iterdir() if p.name[8:].isdigit() and p.name.startswith("version_")]


def newest_last_checkpoint(root: Path) -> tuple[int, Path] | None:
    """The version and path of the most recently written ``version_N/checkpoints/last*.ckpt``."""
    newest: tuple[float, int, Path] | None = None
    for v in _versions(root):
        for ckpt in (root / f"version_{v}" / "checkpoints").glob("last*.ckpt"):
            stamp = (ckpt.stat().st_mtime, v, ckpt)
            newest = stamp if newest is None or stamp[:2] > newest[:2] else newest
    return None if newest is None else (newest[1], newest[2])


def claim_version(root: Path) -> int:
    """Create ``root/version_N`` for the next free N with ``os.mkdir``, which fails if it exists.

    Two runs that list the folder at the same moment would both pick the same N (Lightning's
    loggers list and take max + 1); only one of them can create the folder, the other moves on.
    """
    root.mkdir(parents=True, exist_ok=True)
    v = max(_versions(root), default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{v}")
            return v
        except FileExistsError:
            v += 1


def assign_log_version(logger: Logger | None, resume_last: bool = False) -> None:
    """Fix the version folder of a versioned logger (TensorBoard, CSV) before anything is written.

    With ``resume_last`` (``fit --ckpt_path last``) the run continues in the version folder that
    holds the newest ``last.ckpt``, where Lightning then finds it; otherwise a fresh version folder
    is claimed atomically. A version given explicitly, or a logger without versions, is left alone.
    Only the main process decides: other ranks get the folder through Lightning's broadcasts.
    """
    if logger is None or getattr(logger, "_version", 0) is not None or not hasattr(logger, "root_dir"):
        return
    if any(int(os.environ.get(k, 0)) != 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")):
        return
    if "://" in str(logger.root_dir):
        return
    root = Path(logger.root_dir)
    found = newest_last_checkpoint(root) if resume_last else None
    logger._version = found[0] if found is not None else claim_version(root)


# ---------------------------------------------------------------------------------- devices
def check_devices(accelerator: Any, devices: Any) -> str | None:
    """A message when ``--trainer.devices`` asks for more devices than this machine has, else ``None``.

    Lightning would start one process per CPU "device" without limit, and fail late with a traceback
    for missing GPUs; this answers before anything is built.
    """
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    wanted = len(devices) if isinstance(devices, (list, tuple)) else devices
    if not isinstance(wanted, int) or wanted < 1:  # "auto", -1: Lightning takes what exists
        return None
    kind = accelerator if isinstance(accelerator, str) else "auto"
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind in ("gpu", "cuda"):
        available, kind = torch.cuda.device_count(), "CUDA GPU"
    elif kind == "cpu":
        available, kind = os.cpu_count() or 1, "CPU"
    else:
        return None
    if wanted <= available:
        return None
    return (
        f"--trainer.devices={devices} asks for {wanted} {kind} device(s), but this machine has {available}. "
        f"Pass --trainer.devices={max(available, 1)} or fewer (or --trainer.devices=auto)."
    )
