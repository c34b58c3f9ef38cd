"""Run folders (``<save_dir>/<name>/version_N``): claimed atomically and locked while in use. Which
run a command continues is :mod:`src.runtime.resume`."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from src.runtime.errors import UsageError
from src.runtime.run_state import RunState


def versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(
        int(p.name[8:]) for p in root.iterdir() if p.name.startswith("version_") and p.name[8:].isdigit()
    )


def claim_version(root: Path, state: RunState) -> int:
    """Create ``root/version_N`` for the next free N with ``os.mkdir``, which fails if it exists.

    Two runs that list the folder at the same moment would both pick the same N (Lightning's
    loggers list it and take max + 1); only one of them can create the folder, the other moves on.
    """
    made = [p for p in (root, *root.parents) if not p.exists()]  # removed with the run folder when left empty
    root.mkdir(parents=True, exist_ok=True)
    v = max(versions(root), default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{v}")
            state.claimed += [root / f"version_{v}", *made]
            return v
        except FileExistsError:
            v += 1


def lock(run_dir: Path, state: RunState) -> None:
    """Hold an exclusive lock on ``run_dir`` for the life of the command (``state``).

    The lock is an ``flock`` on ``run_dir/.lock``: the kernel releases it when the process ends, also
    on SIGKILL, so a killed run never leaves it stuck. A second process gets :class:`UsageError`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(
            f"the run folder {run_dir} is in use by {holder}. Wait for it to finish (or stop it), or start "
            "a separate run without --ckpt_path."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()}".encode())
    state.locks.append(fd)


# ---------------------------------------------------------------------------------- what a command continues
def logger_root(logger_cfg: Any, default_root_dir: str | None = None) -> Path:
    """Where a config's runs live: ``save_dir/name`` of its first TensorBoard or CSV logger, or
    ``<default_root_dir>/lightning_logs`` for a run without one (see :mod:`src.runtime.loggers`)."""
    for cfg in logger_cfg if isinstance(logger_cfg, list) else [logger_cfg]:
        cfg = cfg.as_dict() if hasattr(cfg, "as_dict") else cfg
        if not isinstance(cfg, dict):
            continue
        if str(cfg.get("class_path", "")).rsplit(".", 1)[-1] in ("TensorBoardLogger", "CSVLogger"):
            args = cfg.get("init_args") or {}
            name = args.get("name") if args.get("name") is not None else "lightning_logs"
            return Path(args.get("save_dir") or ".") / name
    return Path(default_root_dir or ".") / "lightning_logs"


def is_rank_zero() -> bool:
    """The main process of a (possibly distributed) run, from the launcher's environment."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def versioned(logger: Any, init_args: dict[str, Any], resume_dir: Path | None, state: RunState) -> Any:
    """The TensorBoard/CSV logger of a run, built with its run folder fixed: the version the config
    names, the resumed run's, or a new ``version_N`` claimed atomically. Rank 0 locks the folder
    for the life of the process."""
    if "://" in str(logger.root_dir):
        return logger
    root = Path(logger.root_dir).resolve()
    if init_args.get("version") is not None:
        version = init_args["version"]
    elif resume_dir is not None and resume_dir.parent.resolve() == root:
        version = int(resume_dir.name.removeprefix("version_"))
    elif is_rank_zero():
        version = _claim(root, state, "--trainer.logger.init_args.save_dir")
    else:  # other ranks take rank 0's folder through Lightning's broadcasts
        return logger
    if is_rank_zero():
        lock(root / (version if isinstance(version, str) else f"version_{version}"), state)
    return type(logger)(**{**init_args, "version": version})


def folder_without_logger(root: Path, resume_dir: Path | None, state: RunState) -> Path | None:
    """The run folder of a run without a TensorBoard/CSV logger: the resumed run's, or a new
    ``root/version_N`` (rank 0; other ranks take rank 0's)."""
    if not is_rank_zero():
        return None
    if resume_dir is not None and resume_dir.parent.resolve() == root.resolve():
        folder = resume_dir
    else:
        folder = root / f"version_{_claim(root, state, '--trainer.default_root_dir')}"
    lock(folder, state)
    return folder


def _claim(root: Path, state: RunState, flag: str) -> int:
    try:
        return claim_version(root, state)
    except OSError as err:
        raise UsageError(
            f"cannot write the log folder {root}: {err.strerror or err}. Pass a writable folder with "
            f"{flag}=<folder>."
        ) from err
