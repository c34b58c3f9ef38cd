"""Checkpoint files: written atomically, read without running code, and errors that say what to pass.

- :class:`SafeCheckpointIO` writes each checkpoint to a hidden temporary file in the same folder,
  flushes it to disk and renames it over the target, so a crash, a kill or a full disk mid-save
  leaves the previous file intact and no temporary file behind. It loads with
  ``torch.load(weights_only=True)`` only.
- :func:`load_checkpoint` is that safe load with a clear :class:`CheckpointError`.

The CLI installs the plugin in every run (``trainer.plugins``).
"""

from __future__ import annotations

import contextlib
import functools
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

from src.runtime.errors import RunFailure, UsageError

WHAT_TO_PASS = (
    "Pass a .ckpt written by this project, e.g. lightning_logs/<name>/version_N/checkpoints/last.ckpt."
)
# Where a run keeps its resolved configuration, so `validate/test/predict --ckpt_path` rebuild it.
CONFIG_KEY = "cli_config"


class CheckpointError(UsageError):
    """A checkpoint that cannot be used: missing, not a Lightning checkpoint, or needing unpickling."""


class CheckpointWriteError(RunFailure):
    """A checkpoint could not be written (full disk, unwritable folder); the previous file is intact."""


def load_checkpoint(
    path: _PATH, map_location: Any = "cpu", mmap: bool = False, lightning: bool = True
) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; raise :class:`CheckpointError` saying
    what is wrong and what to pass. ``mmap=True`` maps a local file's tensors instead of reading them
    (cheap when only the metadata is wanted). ``lightning=False`` accepts any weights-only file
    (Lightning's own temporary files, e.g. the weights ``ddp_spawn`` hands back)."""
    path = os.fspath(path)
    fs = get_filesystem(path)
    if not fs.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist. {WHAT_TO_PASS}")
    if fs.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a folder. {WHAT_TO_PASS}")
    try:
        if mmap and "://" not in path:
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        else:
            with fs.open(path, "rb") as f:
                ckpt = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(err), re.IGNORECASE)
        if found is None:
            raise CheckpointError(_not_a_checkpoint(path, err)) from err
        raise CheckpointError(
            f"refused to load checkpoint {path!r}: it contains a pickled Python object ({found.group(1)}), "
            "and unpickling it could run arbitrary code. This project's checkpoints hold only tensors and "
            f"plain values. {WHAT_TO_PASS}"
        ) from err
    except Exception as err:
        raise CheckpointError(_not_a_checkpoint(path, err)) from err
    if lightning and (not isinstance(ckpt, dict) or "state_dict" not in ckpt):
        kind = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else "a dict without a state_dict"
        raise CheckpointError(
            f"{path!r} is a PyTorch file ({kind}) but not a PyTorch Lightning checkpoint. {WHAT_TO_PASS}"
        )
    return ckpt


def _not_a_checkpoint(path: str, err: BaseException) -> str:
    reason = (str(err).splitlines() or [""])[0].removeprefix("Weights only load failed. ")
    return (
        f"could not read checkpoint {path!r}: it is not a PyTorch Lightning checkpoint, or it is corrupt, "
        f"truncated ({type(err).__name__}: {reason[:160]}). {WHAT_TO_PASS}"
    )


def read_metadata(path: _PATH) -> dict[str, Any]:
    """A checkpoint's contents with its tensors memory-mapped, not read: cheap, and read once however
    many checks ask for it while the file is unchanged (:func:`load_checkpoint`'s errors)."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return load_checkpoint(path, mmap=True)  # its error says what is wrong
    return _read_metadata(str(resolved), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_metadata(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    # The file's modification time and size are part of the key: a rewritten file is read again.
    return load_checkpoint(path, mmap=True)


def with_stored_config(argv: list[str]) -> list[str]:
    """``validate|test|predict --ckpt_path X`` without ``--config``: the configuration stored in the
    checkpoint comes first, so the command runs as the run that wrote it did (its callbacks, logger,
    seed, optimiser); options given on the command line still override it."""
    if not argv or argv[0] not in ("validate", "test", "predict"):
        return argv
    if any(a in ("--config", "-c") or a.startswith("--config=") for a in argv):
        return argv
    ckpt = next((a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")), None)
    if ckpt is None and "--ckpt_path" in argv[:-1]:
        ckpt = argv[argv.index("--ckpt_path") + 1]
    if not ckpt or ckpt in ("best", "last", "hpc", "registry"):
        return argv
    if not Path(ckpt).is_file():
        raise CheckpointError(f"--ckpt_path {ckpt!r} is not a file. Pass the path of a .ckpt file.")
    stored = read_metadata(ckpt).get(CONFIG_KEY)
    if not stored:
        raise CheckpointError(
            f"{ckpt} holds no run configuration (it was not written by this project's CLI). Pass the "
            "config it was trained with: --config <config.yaml>."
        )
    return [argv[0], "--config", stored, *argv[1:]]


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, fsynced checkpoint writes and code-free (``weights_only``) loads.

    Lightning's own save goes through a temporary file in the system temp folder and moves it into
    place: a copy, not an atomic rename, when that folder is on another filesystem, and nothing is
    flushed to disk. Here the temporary file sits next to the target, so ``os.replace`` is atomic.
    Remote (fsspec URL) paths fall back to Lightning's save.

    The checkpoint is serialised into the temporary file by the caller; flushing it to disk, the
    rename and the folder's flush (together often longer than a whole epoch of a small model) then
    run on a background thread while training goes on, in order with later saves and removals. A
    save to a path waits for the previous save to that path; loading, ``flush()`` and ``teardown()``
    (the end of every ``fit``/``test``) wait for all of them, and a failed one is raised there or at
    the next save. Under ``torch.distributed`` (other ranks may read the file) and with
    ``background_sync=False`` everything happens before ``save_checkpoint`` returns.

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
        # Hidden and not ending in .ckpt: never mistaken for a checkpoint.
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}.{next(self._tmp_ids)}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb")  # noqa: SIM115  (closed by _commit, or by _discard on failure)
        except OSError as err:
            raise _write_error(target, err) from err
        writer = _RecordingWriter(f)
        try:
            torch.save(checkpoint, writer)
            f.flush()
        except BaseException as err:
            _discard(f, tmp)
            # PyTorch's serialiser reports a failed write as a RuntimeError ("unexpected pos"):
            # the OSError behind it says what happened.
            cause = writer.error or (err if isinstance(err, OSError) else None)
            if cause is not None:
                raise _write_error(target, cause) from err
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
            raise CheckpointError("weights_only=False is refused: loading a checkpoint must not run code.")
        self.flush()
        return load_checkpoint(path, map_location=map_location, lightning=False)

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


class _RecordingWriter:
    """A file's ``write``/``flush`` that remembers the first ``OSError`` (disk full, file too large)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def _commit(f: Any, tmp: Path, target: Path) -> None:
    """Flush the written temporary file to disk and rename it over ``target`` (atomic)."""
    try:
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, target)
    except BaseException as err:
        _discard(f, tmp)
        if isinstance(err, OSError):
            raise _write_error(target, err) from err
        raise
    _fsync_dir(target.parent)


def _discard(f: Any, tmp: Path) -> None:
    """Close and delete a failed temporary file. Closing flushes what is buffered, which fails
    again on a full disk: that error is expected here, and the file goes regardless."""
    with contextlib.suppress(OSError):
        f.close()
    tmp.unlink(missing_ok=True)


def _write_error(target: Path, err: OSError) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"could not write checkpoint {target}: {err.strerror or err}. The previous checkpoints are intact. "
        "Free disk space, or pass a writable folder with --trainer.logger.init_args.save_dir=<folder>."
    )


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened."""
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
