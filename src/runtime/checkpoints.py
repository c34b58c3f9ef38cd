"""Checkpoint files: written atomically, read without running code, and errors that say what to pass.

- :class:`SafeCheckpointIO` writes each checkpoint to a hidden temporary file in the same folder,
  flushes it to disk and renames it over the target, so a crash, a kill or a full disk mid-save
  leaves the previous file intact and no temporary file behind. A save that holds the same state as
  the one before it (``last.ckpt`` right after the best checkpoint of the same epoch) is not
  serialised again: it becomes a hard link to that file. It loads with
  ``torch.load(weights_only=True)`` only.
- :func:`load_checkpoint` is that safe load with a clear :class:`CheckpointError`.
- :func:`check_ckpt_path` checks a command's ``--ckpt_path`` before anything reads it.

The CLI installs the plugin in every run (``trainer.plugins``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from src.runtime.errors import RunFailure, UsageError
from src.runtime.same_state import StateFingerprint

WHAT_TO_PASS = (
    "Pass a .ckpt written by this project, e.g. lightning_logs/<name>/version_N/checkpoints/last.ckpt."
)
# Where a run keeps its resolved configuration, so `validate/test/predict --ckpt_path` rebuild it.
CONFIG_KEY = "cli_config"
_ZIP_MAGIC = b"PK\x03\x04"


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
        raise CheckpointError(f"checkpoint {path!r} is not a file: nothing is at that path. {WHAT_TO_PASS}")
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
    """What is wrong with a file ``torch.load`` could not read, and the checkpoints beside it to use."""
    try:
        with open(path, "rb") as f:
            written_by_torch = f.read(4) == _ZIP_MAGIC  # torch.save writes a zip archive
    except OSError:
        written_by_torch = False
    if written_by_torch:
        reason = (str(err).strip().splitlines() or [""])[0].removeprefix("Weights only load failed. ")
        what = f"it is truncated or corrupt, e.g. a copy or a save that did not finish (PyTorch: {reason.rstrip('.')})"
    else:
        what = "it is not a PyTorch Lightning checkpoint (not a file that torch.save wrote)"
    others = _checkpoints_beside(Path(path))
    todo = (
        f"Other checkpoints in its folder: {', '.join(others)}; pass one of those."
        if others
        else WHAT_TO_PASS
    )
    return f"could not read checkpoint {path!r}: {what}. {todo}"


def _checkpoints_beside(path: Path) -> list[str]:
    """The other complete-looking ``.ckpt`` files in ``path``'s folder, newest first."""
    try:
        found = [p for p in path.parent.glob("*.ckpt") if p.name != path.name and zipfile.is_zipfile(p)]
    except OSError:
        return []
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:4]]


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


def check_ckpt_path(subcommand: str | None, ckpt_path: str | None) -> None:
    """Refuse a ``--ckpt_path`` before Lightning reads anything: a file must be a checkpoint this
    project can load (:class:`CheckpointError` says what is wrong with it);
    ``best`` names a checkpoint only after a fit in the same command; ``hpc`` and ``registry`` name
    sources this project does not use. ``last`` is resolved once the settings are known."""
    if ckpt_path is None or ckpt_path == "last":
        return
    if ckpt_path == "best":
        raise CheckpointError(
            f"--ckpt_path=best names the best checkpoint of a fit in the same command; {subcommand} has none to "
            "name. Pass a checkpoint file (.../version_N/checkpoints/<file>.ckpt), or last."
        )
    if ckpt_path == "hpc":
        raise CheckpointError(
            "--ckpt_path=hpc names Lightning's SLURM auto-requeue checkpoint (hpc_ckpt_N.ckpt), which this project "
            "does not write: its SLURM script requeues a run with --ckpt_path=last. Pass last or a checkpoint file."
        )
    if ckpt_path.lower() == "registry" or ckpt_path.lower().startswith("registry:"):
        raise CheckpointError(
            f"--ckpt_path={ckpt_path} loads from Lightning's online model registry, which this project does not "
            "use. Pass a checkpoint file, or last."
        )
    read_metadata(ckpt_path)  # a CheckpointError when it is missing, a folder or not a checkpoint


def with_stored_config(argv: list[str]) -> list[str]:
    """The command line to parse: its ``--ckpt_path`` checked first (:func:`check_ckpt_path`), and for
    ``validate|test|predict --ckpt_path X`` without ``--config`` the configuration stored in the
    checkpoint put first, so the command runs as the run that wrote it did (its callbacks, logger,
    seed, optimiser); options given on the command line still override it."""
    if not argv or argv[0] not in ("fit", "validate", "test", "predict"):
        return argv
    ckpt = next((a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")), None)
    if ckpt is None and "--ckpt_path" in argv[:-1]:
        ckpt = argv[argv.index("--ckpt_path") + 1]
    check_ckpt_path(argv[0], ckpt)
    if argv[0] == "fit" or not ckpt or ckpt == "last":
        return argv
    if any(a in ("--config", "-c") or a.startswith("--config=") for a in argv):
        return argv
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

    Inside :meth:`reusing_the_last_save`, a save whose checkpoint holds the same state as this
    process's previous save (same step, same values, the same tensors unchanged:
    :class:`~src.runtime.same_state.StateFingerprint`) is not serialised: once the previous file is
    on disk, the new one is made a hard link to it (a flushed byte copy where the filesystem has no
    hard links) and renamed into place, atomic as every save. Both names then share one inode until
    one of them is saved again, which replaces it with a new inode (a rename), so the other keeps its
    bytes. Tools that rewrite a checkpoint in place (open and truncate it) would change both: write a
    new file and rename it instead. A save of the same state to the same file writes nothing.

    Args:
        background_sync: fsync and rename on a background thread (single process only).
    """

    def __init__(self, background_sync: bool = True) -> None:
        super().__init__()
        self.background_sync = background_sync
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}  # target path -> its latest fsync/rename (or removal)
        self._tmp_ids = itertools.count()
        self._last_save: tuple[Path, StateFingerprint] | None = None  # the previous save's file and state
        self._reuse = False

    @contextlib.contextmanager
    def reusing_the_last_save(self) -> Iterator[None]:
        """Saves in this block link to the previous save's file when they hold the same state."""
        self._reuse = True
        try:
            yield
        finally:
            self._reuse = False

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        previous, self._last_save = self._last_save, None
        if storage_options is not None or "://" in str(path):
            self.flush()
            return super().save_checkpoint(checkpoint, path, storage_options)
        self._raise_failed()
        target = Path(path)
        state = StateFingerprint(checkpoint)
        if self._reuse and previous is not None and previous[1] == state:
            self._last_save = (target, state)
            if previous[0] != target:
                self._link(previous[0], target)
            return
        earlier = self._pending.get(str(target))
        if earlier is not None:  # never two writes of one file in flight
            earlier.result()
        tmp = self._tmp_name(target)
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
        if self._in_background():
            self._pending[str(target)] = self._submit(_commit, f, tmp, target)
        else:
            _commit(f, tmp, target)
        self._last_save = (target, state)

    def _link(self, source: Path, target: Path) -> None:
        """``target`` made to hold ``source``'s bytes, after the saves queued so far (``source``'s
        own flush and rename among them)."""
        earlier = self._pending.get(str(target))
        if earlier is not None:
            earlier.result()
        tmp = self._tmp_name(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _write_error(target, err) from err
        if self._in_background():
            self._pending[str(target)] = self._submit(_link_commit, source, tmp, target)
        else:
            self.flush()
            _link_commit(source, tmp, target)

    def _tmp_name(self, target: Path) -> Path:
        # Hidden and not ending in .ckpt: never mistaken for a checkpoint.
        return target.with_name(f".{target.name}.tmp{os.getpid()}.{next(self._tmp_ids)}")

    def _in_background(self) -> bool:
        return self.background_sync and not (dist.is_available() and dist.is_initialized())

    def remove_checkpoint(self, path: _PATH) -> None:
        if self._last_save is not None and self._last_save[0] == Path(path):
            self._last_save = None  # nothing may link to a file that is going
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
        self._last_save = None  # and with it the tensors its fingerprint keeps alive
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


def _link_commit(source: Path, tmp: Path, target: Path) -> None:
    """Make ``target`` hold the bytes of ``source`` (on disk already): a hard link, or a copy flushed
    to disk where the filesystem has none, renamed over ``target`` (atomic)."""
    try:
        try:
            os.link(source, tmp)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOSPC, errno.EROFS):
                raise
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as copy:
                os.fsync(copy.fileno())
        os.replace(tmp, target)
        # Renaming a link over another link to the same file leaves both names (POSIX).
        tmp.unlink(missing_ok=True)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
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
