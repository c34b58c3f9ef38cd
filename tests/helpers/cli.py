"""Run ``python -m src.cli`` (and other entry points) in a subprocess, as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def config(name: str) -> str:
    return str(ROOT / "configs" / f"{name}.yaml")


def env() -> dict[str, str]:
    """The environment of every subprocess: this checkout importable, one torch thread, no Hub."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BN_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def run_module(
    module: str, *args: str, cwd: Path | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS``; with ``check`` a failure shows the end of its output."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    return run_module("src.cli", *args, cwd=cwd, timeout=timeout, check=check)


def start_cli(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    """Start ``python -m src.cli ARGS`` without waiting for it."""
    return subprocess.Popen(
        [sys.executable, "-m", "src.cli", *args],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def refused(proc: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Assert a user-facing refusal: the exit status, no traceback, and each message fragment on stderr."""
    said = proc.stderr
    assert proc.returncode == code, (
        f"exit {proc.returncode}, expected {code}\n{proc.stdout[-2000:]}\n{said[-4000:]}"
    )
    assert "Traceback" not in said, said[-4000:]
    for fragment in fragments:
        assert fragment in said, f"{fragment!r} not in stderr:\n{said[-4000:]}"
    return said


def warnings_in(stderr: str) -> list[str]:
    """Lines of ``stderr`` that are warnings (Python's ``file:line: Category: message`` form or Lightning's)."""
    return [line for line in stderr.splitlines() if "Warning" in line or "warn" in line.lower()]


def data_class(config_path: Path | str) -> str:
    """The short class name of a config's DataModule (the key of ``tests.helpers.data.TINY_DATA``)."""
    import yaml

    return yaml.safe_load(Path(config_path).read_text())["data"]["class_path"].rsplit(".", 1)[-1]


def build(*args: str) -> object:
    """The model, data and Trainer of a CLI command, built in this process without running it
    (``src.cli.main(args, run=False)``), for tests that look inside them."""
    from src.cli import main

    argv, sys.argv = sys.argv, sys.argv[:1]  # pytest's own flags are not the CLI's
    try:
        return main(list(args), run=False)
    finally:
        sys.argv = argv


def read_only(folder: Path) -> list[str] | None:
    """A command prefix that runs a command with ``folder`` read-only, or ``None`` where this machine
    cannot do it. Root ignores file permissions, so it uses a read-only bind mount in a private mount
    namespace (``unshare -m``); other users get ``chmod``-style permissions from the caller."""
    if os.geteuid() != 0:
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, str(folder)]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None
