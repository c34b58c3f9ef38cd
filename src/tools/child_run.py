"""CLI runs started by the tools (search, ablate): each a normal ``python -m src.cli fit`` in a
process of its own, its files in a folder of the tool's choosing, whatever loggers its config has.

- :func:`cli_command` and :func:`child_env`: the command line, and an environment in which the
  child imports this checkout's ``src`` wherever the tool was started.
- :func:`parse_each`: the CLI's own parser (``--print_config``, nothing trains) on several
  command lines in one child process (``python -m src.tools.child_run`` reads them on stdin):
  the tools check what they will run, and read the resolved configs, before any run starts.
- :func:`into_folder`: the overrides that put a run's files under a given folder, and
  :func:`run_folder` finds the run folder a child made there (the one holding its ``config.yaml``).
- :class:`Children`: runs them one at a time with their console output in a file and their CPU
  time measured, and passes SIGINT/SIGTERM on to the running child's process group.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from src.runtime.errors import Interrupted, UsageError
from src.runtime.startup import fast_exit

ROOT = Path(__file__).resolve().parents[2]


def cli_command(configs: list[str], *args: str) -> list[str]:
    """``python -m src.cli fit --config C ... ARGS``."""
    return [sys.executable, "-m", "src.cli", "fit", *(a for c in configs for a in ("--config", c)), *args]


def child_env(**extra: str) -> dict[str, str]:
    """This environment with this checkout first on ``PYTHONPATH``, plus ``extra``."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *([path] if path else [])]), **extra}


# ---------------------------------------------------------------------- the CLI's parser, in a child
@dataclass
class Parsed:
    """The CLI's verdict on one command line: its resolved config, or its refusal."""

    code: int
    config: dict[str, Any] | None
    stderr: str
    resumable: list[str]  # the DataModule's options a resumed run may change (its ``resumable_options``)

    def message(self) -> str:
        """The CLI's error without the parser's internals (or its last line, for a crash)."""
        lines = [line.strip().removeprefix("- ") for line in self.stderr.splitlines() if line.strip()]
        start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
        if start is None:
            return lines[-1] if lines else f"exit {self.code}"
        noise = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")
        kept = [line for line in lines[start:] if not line.startswith(noise)]
        return " ".join(kept).removeprefix("error:").strip()


def print_configs(argvs: list[list[str]]) -> list[Parsed]:
    """Parse each ``argv`` (after ``python -m src.cli``) in one child process; stops at the first refusal."""
    proc = subprocess.run(
        [sys.executable, "-m", "src.tools.child_run"],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        env=child_env(),
        start_new_session=True,  # a Ctrl-C reaches the tool, which stops once the parser has answered
    )
    try:
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise UsageError(f"could not run the CLI's parser: {proc.stderr.strip()[-2000:]}") from None
    return [Parsed(**r) for r in results]


def parse_each(argvs: list[list[str]]) -> list[dict[str, Any]]:
    """What :func:`print_configs` returns, computed in this process (the child's side)."""
    from src.cli import main

    results = []
    for argv in argvs:
        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([*argv, "--print_config"])
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                if isinstance(stop.code, str):
                    err.write(stop.code + "\n")
            except Exception as exc:  # a crash while parsing: its message is the refusal
                code = 1
                err.write(f"{type(exc).__name__}: {exc}\n")
        config = yaml.safe_load(out.getvalue()) if code == 0 else None
        results.append(
            {"code": code, "config": config, "stderr": err.getvalue(), "resumable": _resumable(config)}
        )
        if code:
            break
    return results


def _resumable(config: dict[str, Any] | None) -> list[str]:
    from jsonargparse.typing import import_object

    class_path = ((config or {}).get("data") or {}).get("class_path")
    return list(getattr(import_object(class_path), "resumable_options", ())) if class_path else []


# ---------------------------------------------------------------------- where a child's files go
def into_folder(trainer: dict[str, Any], folder: Path) -> list[str]:
    """Overrides that put a run's files under ``folder``: Lightning's ``default_root_dir`` and the
    ``save_dir`` of every logger that has one (the other settings of each logger as ``trainer``
    resolves them), so a run lands there whichever loggers its config lists, or none."""
    loggers = trainer.get("logger")
    items = loggers if isinstance(loggers, list) else [loggers]

    def moved(lg: Any) -> Any:
        if isinstance(lg, dict) and "save_dir" in (lg.get("init_args") or {}):
            return {**lg, "init_args": {**lg["init_args"], "save_dir": str(folder)}}
        return lg

    new = [moved(lg) for lg in items]
    out = [f"--trainer.default_root_dir={folder}"]
    if new != items:
        out.append("--trainer.logger=" + json.dumps(new if isinstance(loggers, list) else new[0]))
    return out


def run_folder(folder: Path) -> Path | None:
    """The run folder a child made under ``folder``: the shallowest one holding a ``config.yaml``."""
    found = sorted(folder.rglob("config.yaml"), key=lambda p: len(p.parts)) if folder.is_dir() else []
    return found[0].parent if found else None


# ---------------------------------------------------------------------- running them
@dataclass
class Finished:
    code: int
    cpu_s: float  # CPU time of the child and what it waited for (start-up and data loading included)
    wall_s: float


class Children:
    """Runs CLI children one at a time, each in a session of its own (a Ctrl-C in the terminal
    reaches only the tool). A SIGINT/SIGTERM the tool receives goes on to the running child's
    process group (every DDP rank) and is kept in :attr:`signum`: the tool stops at its next step
    (:meth:`check`), after the child has stopped and said so in its log."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._proc: subprocess.Popen | None = None
        self._before: dict[int, Any] = {}

    def __enter__(self) -> Children:
        self._before = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signum)

    def check(self, message: str) -> None:
        """Raise :class:`Interrupted` with ``message`` once a signal came."""
        if self.signum is not None:
            raise Interrupted(self.signum, message)

    def run(self, cmd: list[str], log_path: Path, env: dict[str, str]) -> Finished:
        """Run ``cmd`` to its end, its output in ``log_path`` (first line: the command)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cpu, start = _children_cpu_s(), time.monotonic()
        with log_path.open("w") as log:
            log.write(shlex.join(cmd) + "\n\n")
            log.flush()
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                code = self._proc.wait()
            finally:
                self._proc = None
        return Finished(code, round(_children_cpu_s() - cpu, 1), round(time.monotonic() - start, 1))


def log_tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    with fast_exit():
        print(json.dumps(parse_each(json.load(sys.stdin))))
