"""Run folders (``<save_dir>/<name>/version_N``): claimed atomically, locked while in use, and found
again for ``fit --ckpt_path=last`` only when they hold the run the command describes."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from src.runtime.errors import UsageError
from src.runtime.run_state import RunState

# Settings a resumed run may change: how long it runs, where and how fast, what it prints and
# where data is read from. Everything else describes the experiment and must match.
RESUMABLE_CHANGES = (
    "ckpt_path",
    "test_after_fit",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.min_epochs",
    "trainer.min_steps",
    "trainer.callbacks",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.num_sanity_val_steps",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.sync_batchnorm",
    "trainer.plugins",
    "trainer.profiler",
    "trainer.detect_anomaly",
    "trainer.default_root_dir",
    "trainer.limit_test_batches",
    "trainer.limit_predict_batches",
    "data.init_args.cache_dir",
    "data.init_args.hf_cache_dir",
    "data.init_args.data_dir",
    "data.init_args.data_files",
    "data.init_args.num_workers",
    "data.init_args.eval_batch_size",
    "data.init_args.predict_texts",
    "data.init_args.predict_file",
    "model.init_args.compile_model",
)


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
    root.mkdir(parents=True, exist_ok=True)
    v = max(versions(root), default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{v}")
            state.claimed.append(root / f"version_{v}")
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


@dataclass
class Candidate:
    """A run folder with a ``checkpoints/last.ckpt`` and the settings its config differs in."""

    version: int
    checkpoint: Path
    differences: list[str]


def resumable_runs(root: Path, config: dict[str, Any], only_version: int | None = None) -> list[Candidate]:
    """Runs under ``root`` with a ``last.ckpt``, newest first, each with the settings (outside
    :data:`RESUMABLE_CHANGES`) in which its saved ``config.yaml`` differs from ``config``."""
    found = []
    for v in versions(root):
        if only_version is not None and v != only_version:
            continue
        last = root / f"version_{v}" / "checkpoints" / "last.ckpt"
        if not last.is_file():
            continue
        saved_file = root / f"version_{v}" / "config.yaml"
        try:
            saved = yaml.safe_load(saved_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            differences = [f"(its {saved_file.name} is missing or unreadable)"]
        else:
            differences = config_differences(saved, config)
        found.append(Candidate(v, last, differences))
    return sorted(found, key=lambda c: c.checkpoint.stat().st_mtime, reverse=True)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every leaf setting that differs and that a resume may not change."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(flat_saved) | set(flat_current)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        a, b = flat_saved.get(key), flat_current.get(key)  # absent and null are the same
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


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


def resolve_checkpoint(
    subcommand: str | None, ckpt_path: str | None, root: Path | None, config: dict[str, Any], version: Any
) -> tuple[Path | None, Path | None]:
    """The checkpoint file a command loads, and for ``fit`` the run folder it continues.

    ``last`` is the ``last.ckpt`` of the newest run under ``root`` whose saved config matches this
    command's (``version`` narrows it to one run); a ``fit`` with no run to continue starts a new
    one. A file continues its own run folder when it is that run's ``last.ckpt``.
    """
    if ckpt_path == "last":
        if root is None:
            raise UsageError(
                "--ckpt_path=last needs a logger with a save_dir (it looks for the run's folder)."
            )
        candidates = resumable_runs(root, config, only_version=version)
        match = next((c for c in candidates if not c.differences), None)
        if match is None:
            if not candidates and version is None and subcommand == "fit":
                from lightning.pytorch.utilities import rank_zero_info

                rank_zero_info(
                    f"--ckpt_path=last: no run under {root} has a last.ckpt yet; starting a new run."
                )
                return None, None
            raise UsageError(_no_matching_run(root, candidates, version))
        return match.checkpoint, match.checkpoint.parents[1] if subcommand == "fit" else None
    if ckpt_path in (None, "best", "hpc", "registry"):
        return None, None
    path = Path(ckpt_path)
    if not path.is_file():
        raise UsageError(f"--ckpt_path {ckpt_path!r} is not a file. Pass the path of a .ckpt file (or last).")
    own_run = (
        subcommand == "fit"
        and path.name == "last.ckpt"
        and root is not None
        and path.resolve().parents[2] == root.resolve()
    )
    return path, path.parents[1] if own_run else None


def _no_matching_run(root: Path, candidates: list[Candidate], version: Any) -> str:
    if not candidates:
        where = f"version_{version}" if version is not None else "any run"
        return f"--ckpt_path=last: {where} under {root} has no checkpoints/last.ckpt. Pass a checkpoint file."
    lines = [
        f"--ckpt_path=last: no run under {root} was started with these settings, so none is resumed (a "
        "resume continues the same experiment). The runs with a last.ckpt and what differs (run -> command):"
    ]
    for c in candidates[:5]:
        more = " ..." if len(c.differences) > 6 else ""
        lines.append(f"  version_{c.version}: " + "; ".join(c.differences[:6]) + more)
    lines.append("Pass the settings of the run to resume, or start a new run without --ckpt_path.")
    return "\n".join(lines)


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
