"""What a run ran with, as tracking tools record it: ``provenance.json`` in the run folder and the
same record in every checkpoint it writes (key ``provenance``).

    {"packages": {"python": "3.11.7", "torch": "2.13.0", "lightning": "2.6.6", ...},
     "code": {"commit": "1a2b3c4...", "dirty": false},
     "data_fingerprint": "sha256:6f3b..."}

- ``packages``: Python and the installed versions of :data:`PACKAGES` and of the project's other
  declared runtime dependencies (the installed project's metadata).
- ``code``: the project's git commit and whether tracked files differ from it (``git status`` in the
  project root, the folder holding ``src/``, whatever the working directory); ``"unknown"`` for
  both outside a git checkout or without git.
- ``data_fingerprint``: the DataModule's :meth:`~src.data.base.ClassificationDataModule.data_fingerprint`
  of the data it loaded; ``null`` when it loaded none (a ``predict`` of given inputs).

A command that loads a checkpoint (``validate``/``test``/``predict --ckpt_path``, a resumed ``fit``)
says in one line what differs from the checkpoint's record (:func:`differences`); it never refuses.
A checkpoint without the record (older, or written elsewhere) gets no line.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from src.runtime.summary import write_json

FILENAME = "provenance.json"
CHECKPOINT_KEY = "provenance"
UNKNOWN = "unknown"
# Recorded always; the project's other runtime dependencies are read from its installed metadata.
PACKAGES = ("torch", "lightning", "torchmetrics", "jsonargparse", "numpy")
PROJECT = "bn-classifiers"
ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


# ---------------------------------------------------------------------------------- what is recorded
@functools.cache
def package_versions() -> dict[str, str]:
    """``{"python": ..., name: version}`` for :data:`PACKAGES` and the project's declared runtime
    dependencies that are installed."""
    versions = {"python": platform.python_version()}
    for name in dict.fromkeys([*PACKAGES, *declared_dependencies()]):
        version = _installed(name)
        if version is not None:
            versions[name] = version
    return versions


def declared_dependencies() -> list[str]:
    """The names of the project's runtime dependencies (no extras): from ``pyproject.toml`` in a
    checkout, else from the installed project's metadata; none when neither is there."""
    requirements = _pyproject_dependencies(ROOT / "pyproject.toml")
    if requirements is None:
        try:
            requirements = importlib.metadata.requires(PROJECT) or []
        except importlib.metadata.PackageNotFoundError:
            return []
    names = []
    for requirement in requirements:
        found = _NAME.match(requirement)
        if found and "extra" not in requirement.partition(";")[2]:
            names.append(re.sub(r"[-_.]+", "-", found.group(1)).lower())
    return names


def _pyproject_dependencies(path: Path) -> list[str] | None:
    """``[project] dependencies`` of this project's ``pyproject.toml``; ``None`` when it has none to read
    (an installed copy, or Python 3.10 without ``tomllib``)."""
    try:
        import tomllib

        project = tomllib.loads(path.read_text()).get("project") or {}
    except (ImportError, OSError, ValueError):
        return None
    dependencies = project.get("dependencies")
    return list(dependencies) if project.get("name") == PROJECT and isinstance(dependencies, list) else None


@functools.cache
def code_state(root: Path = ROOT) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout whose top folder is ``root``;
    :data:`UNKNOWN` for both when ``root`` is not one (an installed copy) or git cannot say."""
    found = _git(root, "rev-parse", "--show-toplevel", "HEAD")
    lines = found.splitlines() if found is not None else []
    if len(lines) != 2 or Path(lines[0]).resolve() != root.resolve():
        return {"commit": UNKNOWN, "dirty": UNKNOWN}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": lines[1], "dirty": UNKNOWN if status is None else bool(status.strip())}


def _git(root: Path, *args: str) -> str | None:
    """``git ARGS`` in ``root``: its output, or ``None`` when git is missing or fails."""
    try:
        done = subprocess.run(
            # no optional locks: a status never takes the index lock a concurrent git command needs
            ["git", "--no-optional-locks", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def data_fingerprint(trainer: Trainer) -> str | None:
    """The fingerprint the trainer's DataModule gives its data; ``None`` without one."""
    fingerprint = getattr(trainer.datamodule, "data_fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def provenance(trainer: Trainer) -> dict[str, Any]:
    """The record of this process and the trainer's data (see the module's docstring)."""
    return {
        "packages": dict(package_versions()),  # copies: the cached records stay as read
        "code": dict(code_state()),
        "data_fingerprint": data_fingerprint(trainer),
    }


# ---------------------------------------------------------------------------------- what differs
def differences(saved: Any, now: dict[str, Any]) -> str | None:
    """One line naming what differs between a checkpoint's record ``saved`` and ``now`` (packages,
    code, data); ``None`` when nothing known differs or ``saved`` is not a record."""
    if not isinstance(saved, dict):
        return None
    made = _package_changes(saved.get("packages"), now["packages"])
    code = _code_change(saved.get("code"), now["code"])
    if code:
        made.append(code)
    data = saved.get("data_fingerprint")
    other_data = None not in (data, now["data_fingerprint"]) and data != now["data_fingerprint"]
    if not made and not other_data:
        return None
    parts = [f"this checkpoint was made with {_and(made)}"] if made else []
    if other_data:
        whose = "its" if made else "this checkpoint's"
        parts.append(f"{whose} data fingerprint differs from this data's")
    return f"note: {'; '.join(parts)}."


def _package_changes(saved: Any, now: dict[str, str]) -> list[str]:
    if not isinstance(saved, dict):
        return []
    changes = []
    for name, version in saved.items():
        current = now.get(name) or _installed(name)  # recorded then, no longer declared now
        if current != version:
            changes.append(f"{name} {version} (now {current or 'not installed'})")
    return changes


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _code_change(saved: Any, now: dict[str, Any]) -> str | None:
    if not isinstance(saved, dict) or UNKNOWN in (saved.get("commit"), now["commit"]):
        return None  # one side unknown: not known to differ
    dirty = (saved.get("dirty"), now["dirty"])
    if saved.get("commit") == now["commit"] and (dirty[0] == dirty[1] or UNKNOWN in dirty):
        return None
    return f"code {_describe(saved)} (now {_describe(now)})"


def _describe(code: dict[str, Any]) -> str:
    commit = str(code.get("commit"))[:7]
    return f"{commit}, dirty" if code.get("dirty") is True else commit


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


# ---------------------------------------------------------------------------------- the callback
class RunProvenance(Callback):
    """Record the run's provenance in its folder (``provenance.json``, rank 0, once the data is set up)
    and in every checkpoint; say in one line what differs from a loaded checkpoint's record.

    The CLI adds it to every run.
    """

    def __init__(self) -> None:
        self._record: dict[str, Any] | None = None
        self._written: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # The DataModule's setup ran just before: its data is loaded.
        self._record = provenance(trainer)
        folder = None if trainer.fast_dev_run else trainer.log_dir  # a collective under DDP
        if folder is None or not trainer.is_global_zero or self._written == Path(folder):
            return  # a test after fit keeps the fit's record
        write_json(Path(folder) / FILENAME, self._record)
        self._written = Path(folder)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_KEY] = self._record if self._record is not None else provenance(trainer)

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        line = differences(checkpoint.get(CHECKPOINT_KEY), self._record or provenance(trainer))
        if line:
            rank_zero_info(line)
