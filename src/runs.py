"""Run folders (``<save_dir>/<name>/version_N``): claimed atomically, locked while in use, and found
again for ``fit --ckpt_path=last`` only when they hold the run the command describes."""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from src.errors import UserError

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
_held_locks: list[Any] = []  # open lock files: released when the process ends, however it ends
_claimed: list[Path] = []  # run folders this process created


def versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(
        int(p.name[8:]) for p in root.iterdir() if p.name.startswith("version_") and p.name[8:].isdigit()
    )


def claim_version(root: Path) -> int:
    """Create ``root/version_N`` for the next free N with ``os.mkdir``, which fails if it exists.

    Two runs that list the folder at the same moment would both pick the same N (Lightning's
    loggers list it and take max + 1); only one of them can create the folder, the other moves on.
    """
    root.mkdir(parents=True, exist_ok=True)
    v = max(versions(root), default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{v}")
            _claimed.append(root / f"version_{v}")
            return v
        except FileExistsError:
            v += 1


def discard_unused() -> None:
    """Remove the run folders this process claimed for a run that stopped on an error before it
    started (before its ``config.yaml`` was written: at most an empty event file inside), so failed
    commands leave no empty ``version_N`` behind."""
    for folder in _claimed:
        names = {p.name for p in folder.iterdir()} if folder.is_dir() else {"config.yaml"}
        if "config.yaml" not in names and all(n == ".lock" or n.startswith("events.out.tfevents") for n in names):
            shutil.rmtree(folder, ignore_errors=True)


def lock(run_dir: Path) -> None:
    """Hold an exclusive lock on ``run_dir`` for the life of this process.

    The lock is an ``flock`` on ``run_dir/.lock``: the kernel releases it when the process ends, also
    on SIGKILL, so a killed run never leaves it stuck. A second process gets :class:`UserError`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")  # noqa: SIM115  (held open until the process ends)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(
            f"the run folder {run_dir} is in use by {holder}. Wait for it to finish (or stop it), or start "
            "a separate run without --ckpt_path."
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()}")
    f.flush()
    _held_locks.append(f)


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
