"""Hyperparameter search with Optuna, where every trial is a normal CLI run.

    python -m src.tools.search --config configs/fashion_mnist_mlp_bn.yaml \\
        --space 'model.init_args.dropout=float(0.0,0.5)' \\
        --space 'model.init_args.lr=float(1e-3,3e-2,log)' \\
        --space 'model.init_args.bn_position=choice(before_activation,after_activation)' \\
        --trials 20 --study fmnist --output lightning_logs/search/fmnist \\
        -- --data.init_args.data_dir=../shared/data/fashion_mnist

Each trial is ``python -m src.cli fit --config ... <extra overrides> <the trial's values>`` in a
subprocess, logging to ``OUTPUT/runs/trial_NNNN`` (its config.yaml, checkpoints, TensorBoard
events and console output ``trial.log``), so ``tensorboard --logdir OUTPUT`` shows every trial
side by side. A callback added to the run (``src.tools.search_pruning.OptunaPruning``) reports the
monitored metric every validation epoch to the study's storage and stops the run when the
pruner says so. The objective is the best value of the metric over the trial's epochs.

The study lives in an RDB storage, by default ``sqlite:///OUTPUT/study.db``: running the same
command again resumes (finished trials are kept, a trial that a killed search left running is
marked FAIL and run again with the same values), and a larger ``--trials`` adds trials. Several
copies of the command (on several machines with ``--storage postgresql://...``) share one study
and its trial budget.

After every trial: ``OUTPUT/trials.md`` and ``trials.csv`` (values, state, metric, run folder,
duration, CPU time) and ``OUTPUT/best_config.yaml`` (the best trial's config.yaml, ready for
``--config``); at the end ``OUTPUT/history.png`` and ``OUTPUT/importance.png``. ``--final-seeds K``
then re-trains the best config over K seeds with ``src.tools.ablate`` and tests it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from src.tools.ablate import split_top_level

if TYPE_CHECKING:
    import optuna

ROOT = Path(__file__).resolve().parents[2]
RUNS = "runs"  # trial run folders: OUTPUT/runs/trial_NNNN
CALLBACK = "src.tools.search_pruning.OptunaPruning"
PID_ENV = "BN_SEARCH_PID"  # the search's pid: a trial kills itself when its search is gone
# How a trial gets the storage URL: in its environment, so credentials stay out of its config.yaml.
STORAGE_ENV = "BN_SEARCH_STORAGE"
TAIL_LINES = 25  # lines of a failed trial's console output kept in the storage
HEARTBEAT_S, GRACE_S = 60, 180  # Optuna heartbeat of running trials (for workers on other machines)
MAX_RETRY = 3  # how often a trial interrupted with its search is run again

SPACE_HELP = """\
search space (repeat --space for each setting; KEY is any CLI key, without the leading --):
  KEY=float(LOW,HIGH)        uniform float in [LOW, HIGH]
  KEY=float(LOW,HIGH,log)    log-uniform (LOW > 0)
  KEY=int(LOW,HIGH)          integer in [LOW, HIGH]; int(LOW,HIGH,log) log-uniform (LOW >= 1)
  KEY=choice(A,B,...)        one of the values, as they would be written on the command line;
                             commas inside brackets stay in one value: choice([512,256],[1024,512])
examples:
  --space 'model.init_args.dropout=float(0.0,0.5)'
  --space 'model.init_args.lr=float(1e-4,1e-1,log)'
  --space 'model.init_args.hidden_size=int(64,512,log)'
  --space 'model.init_args.bn_position=choice(before_activation,after_activation)'
  --space 'data.init_args.batch_size=choice(128,256,512)'
The learning rate is model.init_args.lr: the optimiser's, and the peak of the one-cycle schedule.

pruners (--pruner), Optuna's, judged on the metric after each validation epoch (steps are epochs):
  median                     MedianPruner (Optuna's defaults: n_startup_trials=5, n_warmup_steps=0)
  halving                    SuccessiveHalvingPruner        hyperband   HyperbandPruner
  threshold(lower=0.5)       ThresholdPruner: stop a trial below (or above: upper=) a value
  none                       no pruning
  arguments in brackets: 'median(n_startup_trials=3,n_warmup_steps=4)', 'halving(min_resource=2)'.

Everything after `--` goes to every trial's command line (--trainer.max_epochs=5,
--data.init_args.data_dir=..., --trainer.devices=2 --trainer.strategy=ddp ...).
Exit status: 0 when the study has a complete trial, 1 when none completed, 2 for bad input,
130/143 when interrupted (the running trial is stopped and run again by the same command).
"""


class UsageError(Exception):
    """Bad input: printed as one ``error:`` line, exit status 2."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM received by the search (a BaseException, so no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Param:
    """One ``--space`` entry: a CLI key and the distribution of its values."""

    key: str
    kind: str  # float | int | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[str, ...] = ()

    def suggest(self, trial: optuna.trial.Trial) -> Any:
        """The trial's value (sampled, or the stored one for a trial run again)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))

    def override(self, value: Any) -> str:
        return f"--{self.key}={_format_value(value)}"

    def probe_values(self) -> list[Any]:
        """Values the CLI must accept before the search starts: both ends, or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    @property
    def spec(self) -> str:
        if self.kind == "choice":
            return f"{self.key}=choice({','.join(self.choices)})"
        fmt = (lambda v: str(int(v))) if self.kind == "int" else _format_value
        return f"{self.key}={self.kind}({fmt(self.low)},{fmt(self.high)}{',log' if self.log else ''})"


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SPEC = re.compile(r"^(?P<kind>[A-Za-z_]+)\((?P<args>.*)\)$", re.S)
_EXAMPLE = "e.g. --space 'model.init_args.dropout=float(0.0,0.5)'"


def parse_space(text: str) -> Param:
    """``KEY=float(lo,hi[,log])`` | ``KEY=int(lo,hi[,log])`` | ``KEY=choice(a,b,...)`` → :class:`Param`.

    Raises:
        UsageError: with a message naming the spec and what is wrong.
    """
    where = f"--space {text!r}"
    key, sep, dist = text.partition("=")
    key, dist = key.strip().removeprefix("--"), dist.strip()
    if not sep or not key or not dist:
        raise UsageError(f"{where}: expected KEY=TYPE(ARGS), {_EXAMPLE}")
    if not _KEY.match(key):
        raise UsageError(f"{where}: {key!r} is not a CLI key (dotted names such as model.init_args.dropout)")
    match = _SPEC.match(dist)
    if not match:
        raise UsageError(
            f"{where}: expected float(LOW,HIGH[,log]), int(LOW,HIGH[,log]) or choice(A,B,...) after '=', "
            f"{_EXAMPLE}"
        )
    kind, args = match["kind"], split_top_level(match["args"])
    if kind == "choice":
        if any(a == "" for a in args):
            raise UsageError(f"{where}: an empty choice; remove the extra comma")
        if len(args) < 2:
            raise UsageError(f"{where}: choice needs at least two values (a fixed value goes after `--`)")
        if len(set(args)) != len(args):
            raise UsageError(f"{where}: a choice is repeated")
        return Param(key, "choice", choices=tuple(args))
    if kind not in ("float", "int"):
        raise UsageError(
            f"{where}: unknown type {kind!r}; use float(LOW,HIGH[,log]), int(LOW,HIGH[,log]) or choice(A,B,...)"
        )
    log = len(args) == 3 and args[2] == "log"
    if len(args) not in (2, 3) or (len(args) == 3 and not log):
        raise UsageError(f"{where}: {kind} takes LOW,HIGH and optionally log, e.g. {kind}(1,10,log)")
    try:
        low, high = (float(a) if kind == "float" else _parse_int(a) for a in args[:2])
    except ValueError:
        raise UsageError(
            f"{where}: LOW and HIGH must be {'numbers' if kind == 'float' else 'integers'}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UsageError(f"{where}: LOW and HIGH must be finite")
    if low >= high:
        raise UsageError(f"{where}: LOW must be below HIGH (a fixed value goes after `--`)")
    if log and low <= 0:
        raise UsageError(f"{where}: a log range needs LOW > 0")
    return Param(key, kind, low, high, log)


def _parse_int(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def _format_value(value: Any) -> str:
    # repr keeps every digit of a float, so the run gets exactly the value the study records.
    return repr(value) if isinstance(value, float) else str(value)


def labels(space: list[Param]) -> dict[str, str]:
    """Short column names: the last part of each key, or the whole key where two would clash."""
    short = {p.key: p.key.rsplit(".", 1)[-1] for p in space}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clashes else s) for k, s in short.items()}


# ---------------------------------------------------------------------- pruner, storage
PRUNERS = {
    "median": "MedianPruner",
    "halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
    "none": "NopPruner",
}


def build_pruner(spec: str) -> optuna.pruners.BasePruner:
    """``median`` / ``halving(min_resource=2,reduction_factor=3)`` / ``none`` → an Optuna pruner."""
    import optuna

    text = spec.strip()
    name, _, rest = text.partition("(")
    name = name.strip()
    if name not in PRUNERS or (rest and not rest.endswith(")")):
        raise UsageError(
            f"--pruner {spec!r}: use one of {', '.join(PRUNERS)}, e.g. 'median(n_warmup_steps=3)'"
        )
    kwargs: dict[str, Any] = {}
    for item in split_top_level(rest[:-1]) if rest[:-1].strip() else []:
        k, eq, v = item.partition("=")
        if not eq:
            raise UsageError(f"--pruner {spec!r}: arguments are NAME=VALUE, e.g. n_warmup_steps=3")
        kwargs[k.strip()] = yaml.safe_load(v)
    try:
        return getattr(optuna.pruners, PRUNERS[name])(**kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--pruner {spec!r}: {err}") from None


def open_storage(url: str, heartbeat: bool = False, on_stale: Any = None) -> optuna.storages.RDBStorage:
    """An RDB storage; with ``heartbeat``, trials stale for ``GRACE_S`` are failed (and ``on_stale`` runs)."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes write to one file (workers, their trials): wait for the lock
        # instead of failing with "database is locked" after Python's default 5 s.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    if heartbeat:
        kwargs.update(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        # Optuna 4.9 renamed the callback argument; accept both releases.
        import inspect

        params = inspect.signature(optuna.storages.RDBStorage).parameters
        name = (
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in params
            else "failed_trial_callback"
        )
        kwargs[name] = on_stale
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except SQLAlchemyError:
            # Workers started together all create the schema of a new database; the losers of
            # that race fail on a unique constraint and find the schema made on a second try.
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def _retry_callback() -> Any:
    """Optuna's callback that enqueues a failed trial's values again (renamed in Optuna 4.9)."""
    import optuna

    cls = (
        getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        or optuna.storages.RetryFailedTrialCallback
    )
    return cls(max_retry=MAX_RETRY)


def _mask(url: str) -> str:
    """A storage URL without its password, for printing."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


# ---------------------------------------------------------------------- workers
def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux /proc), to tell a live worker from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie is dead already


def worker_info() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def worker_alive(info: dict[str, Any]) -> bool | None:
    """Whether the worker that started a trial still runs: None when it ran on another machine."""
    if not info or info.get("host") != socket.gethostname():
        return None
    pid = int(info["pid"])
    if Path("/proc").is_dir():
        start = _process_start(pid)
        return start is not None and (info.get("start") in (None, start))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- the study's trials
def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> dict[int, int]:
    """``{failed trial number: number of the trial that ran it again}``."""
    out = {}
    for t in trials:
        history = t.system_attrs.get("retry_history") or []
        if history:
            out[history[-1]] = t.number
    return out


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that use the budget: finished or running, but not a failure that was run again."""
    from optuna.trial import TrialState

    retried = retried_numbers(trials)
    return [
        t
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        or (t.state == TrialState.FAIL and t.number not in retried)
    ]


def fail_and_retry(study: optuna.Study, storage: Any, trial_id: int, note: str) -> bool:
    """Mark a running trial FAIL and enqueue its values again; False if it had finished meanwhile."""
    import optuna
    from optuna.trial import TrialState

    try:
        storage.set_trial_user_attr(trial_id, "note", note)
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker got there first
    _retry_callback()(study, storage.get_trial(trial_id))
    return True


def recover_dead_trials(study: optuna.Study, storage: Any) -> list[int]:
    """Fail (and run again) the trials whose search process is gone.

    On this machine a dead worker is known at once (its pid); for workers on other machines
    Optuna's heartbeat fails a trial after ``GRACE_S`` seconds without a beat.
    """
    import optuna
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_alive(t.user_attrs.get("worker") or {}) is False and fail_and_retry(
            study, storage, t._trial_id, "its search process died while it ran"
        ):
            failed.append(t.number)
    optuna.storages.fail_stale_trials(study)
    return failed


# ---------------------------------------------------------------------- checking against the CLI
@dataclass
class Setup:
    """Everything a trial's command line is made of."""

    configs: list[str]
    extra: list[str]
    space: list[Param]
    output: Path
    study_name: str
    storage_url: str
    metric: str
    pruner: str

    def command(self, values: dict[str, Any], run_name: str, trial_id: int) -> list[str]:
        by_key = {p.key: p for p in self.space}
        return [
            sys.executable,
            "-m",
            "src.cli",
            "fit",
            *(a for c in self.configs for a in ("--config", c)),
            "--trainer.enable_progress_bar=false",  # the console goes to a file
            *self.extra,
            *(by_key[k].override(v) for k, v in values.items()),
            # The search decides on validation only; the final step tests the chosen config.
            "--test_after_fit=false",
            f"--trainer.logger.init_args.save_dir={self.output.resolve()}",
            f"--trainer.logger.init_args.name={RUNS}",
            f"--trainer.logger.init_args.version={run_name}",
            # Appended last, so that `--trainer.callbacks.init_args.*` in the extra overrides still
            # address the config's own last callback.
            f"--trainer.callbacks+={CALLBACK}",
            f"--trainer.callbacks.init_args.study_name={self.study_name}",
            f"--trainer.callbacks.init_args.trial_id={trial_id}",
            f"--trainer.callbacks.init_args.monitor={self.metric}",
            f"--trainer.callbacks.init_args.pruner={self.pruner}",
            "--trainer.callbacks.init_args.watch_parent=true",
        ]

    def env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        return {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{path}"
            if path
            else str(ROOT),  # the runs import this checkout's src
            STORAGE_ENV: self.storage_url,
            PID_ENV: str(os.getpid()),
        }


# Parses each probe command line with the CLI's own parser in one process (importing the CLI
# takes seconds, a parse a fraction of one); `--print_config` makes each parse print the resolved
# config and exit instead of training. Stops at the first refusal.
_PROBE = """
import contextlib, io, json, sys
from src.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if isinstance(stop.code, str):
                err.write(stop.code + "\\n")
        except Exception as exc:
            code = 1
            err.write(f"{type(exc).__name__}: {exc}\\n")
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    if code:
        break
print(json.dumps(results))
"""


def check_with_cli(setup: Setup) -> dict[str, Any]:
    """Run the CLI's own parser (``--print_config``, no training) on the trial command lines.

    Both ends of every range and every choice are tried, so an unknown key or a value the CLI
    refuses stops the search before any trial runs (one process, a few seconds). Returns the
    resolved config without any searched value (the config's own values).

    Raises:
        UsageError: the CLI's message, or why the config cannot be searched (no validation).
    """
    probes = max([2, *(len(p.probe_values()) for p in setup.space)])
    # First the config as it is (no searched value: its own values, for --baseline), then the probes.
    values: list[dict[str, Any]] = [{}] + [
        {p.key: p.probe_values()[min(i, len(p.probe_values()) - 1)] for p in setup.space}
        for i in range(probes)
    ]
    # each from `fit` on (the probe process is the CLI already)
    argvs = [[*setup.command(v, "trial_check", -1)[3:], "--print_config"] for v in values]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs)], capture_output=True, text=True, env=setup.env()
    )
    try:
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise UsageError(
            f"could not run the CLI to check the search: {proc.stderr.strip()[-2000:]}"
        ) from None
    for probe, result in zip(values, results, strict=False):
        if result["code"] != 0:
            raise UsageError(_refusal(result["stderr"], setup.space, probe))
        _check_searchable(yaml.safe_load(result["stdout"]) or {}, probe)
    return yaml.safe_load(results[0]["stdout"]) or {}


def baseline_params(config: dict[str, Any], space: list[Param]) -> tuple[dict[str, Any], list[str]]:
    """The config's own value of every searched key, as a trial's params; and the keys that cannot be.

    A choice matches when its text reads (as YAML) to the config's value (``[512,256]``, ``true``).
    """
    params, outside = {}, []
    for p in space:
        node: Any = config
        for part in p.key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if p.kind == "choice":
            match = [c for c in p.choices if _yaml_value(c) == node]
            if match:
                params[p.key] = match[0]
                continue
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and p.low <= node <= p.high:
            params[p.key] = int(node) if p.kind == "int" else float(node)
            continue
        outside.append(f"{p.key}={node!r}")
    return params, outside


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _refusal(stderr: str, space: list[Param], values: dict[str, Any]) -> str:
    """One line from the CLI's error: its message, and the --space entries it names."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    if start is None:  # no parser message (a crash while parsing): its last line
        body = [next((line for line in reversed(lines) if line.strip()), "no message")]
    else:
        skip = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")
        body = [
            line.strip().removeprefix("- ")
            for line in lines[start:]
            if line.strip() and not line.strip().startswith(skip)
        ]
        body[0] = body[0].removeprefix("error:").strip()
    message = " ".join(b for b in body if b)
    named = [
        p
        for p in space
        if p.key in values and re.search(rf"\b{re.escape(p.key.rsplit('.', 1)[-1])}\b", message)
    ]
    where = ", ".join(f"{p.key}={_format_value(values[p.key])}" for p in named) or "the command line"
    return f"the CLI refused {where}: {message}"


def _check_searchable(config: dict[str, Any], values: dict[str, Any]) -> None:
    data = ((config.get("data") or {}).get("init_args")) or {}
    trainer = config.get("trainer") or {}
    searched = [f"{k}={_format_value(v)}" for k, v in values.items() if k.endswith(".val_size")]
    shown = f" (from --space {searched[0]})" if searched else ""
    if data.get("val_size") == 0:
        raise UsageError(
            f"val_size=0{shown}: a search needs validation to score its trials. Keep a val_size for the "
            "search (the final step re-trains the best config the same way)."
        )
    if trainer.get("limit_val_batches") in (0, 0.0):
        raise UsageError("--trainer.limit_val_batches=0: a search needs validation to score its trials.")
    logger = trainer.get("logger")
    if not isinstance(logger, dict) or "TensorBoardLogger" not in str(logger.get("class_path")):
        raise UsageError(
            "the config has no TensorBoardLogger (trainer.logger): the search puts each trial's run folder "
            "under --output through it. Use a config from configs/."
        )


# ---------------------------------------------------------------------- running one trial
@dataclass
class Outcome:
    state: str  # COMPLETE | PRUNED | FAIL
    value: float | None = None
    note: str = ""
    missing_metric: list[str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def best_of(values: list[float], direction: str) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return None
    return max(finite) if direction == "maximize" else min(finite)


def run_trial(setup: Setup, study: optuna.Study, storage: Any, trial: optuna.trial.Trial) -> Outcome:
    """Run one trial's CLI process to its end and read what it reported (does not tell the study)."""
    values = {p.key: p.suggest(trial) for p in setup.space}
    run_name = f"trial_{trial.number:04d}"
    run_dir = setup.output / RUNS / run_name
    # A trial run again (a failed one re-enqueued by Optuna's retry callback) keeps its history.
    history = storage.get_trial(trial._trial_id).system_attrs.get("retry_history") or [None]
    retry_of = history[-1]
    attrs = {
        "worker": worker_info(),
        "run_dir": f"{RUNS}/{run_name}",
        "note": f"runs trial {retry_of} again"
        if retry_of is not None
        else "the config's own values (--baseline)"
        if trial.user_attrs.get("baseline")
        else "",
        # A trial run again starts with a copy of the failed one's attributes: clear its outcome.
        **dict.fromkeys(("pruned_epoch", "missing_metric", "error", "cpu_s", "exit_code")),
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    cmd = setup.command(values, run_name, trial._trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "trial.log"
    beat = threading.Event()
    threading.Thread(target=_heartbeat, args=(storage, trial._trial_id, beat), daemon=True).start()
    cpu_before = _children_cpu_s()
    with log_path.open("w") as log:
        log.write(shlex.join(cmd) + "\n\n")
        log.flush()
        # A session of its own: a Ctrl-C in the terminal reaches only the search, which stops the
        # trial's whole process group (DDP ranks included) itself.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=setup.env(), start_new_session=True
        )
        try:
            code = proc.wait()
        except BaseException:
            _stop_group(proc)
            raise
        finally:
            beat.set()
    cpu_s = round(_children_cpu_s() - cpu_before, 1)
    trial.set_user_attr("cpu_s", cpu_s)
    trial.set_user_attr("exit_code", code)
    frozen = storage.get_trial(trial._trial_id)
    reported = [frozen.intermediate_values[s] for s in sorted(frozen.intermediate_values)]
    stats = {"epochs": len(reported), "cpu_s": cpu_s}
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        trial.set_user_attr("error", "\n".join(tail))
        last = next((line for line in reversed(tail) if line.strip()), "")
        return Outcome("FAIL", note=f"exit {code}: {last.strip()[:200]}", stats=stats)
    if frozen.user_attrs.get("missing_metric") is not None:
        return Outcome(
            "FAIL",
            note=f"no '{setup.metric}' logged",
            missing_metric=frozen.user_attrs["missing_metric"],
            stats=stats,
        )
    if frozen.user_attrs.get("pruned_epoch") is not None:  # Optuna keeps a pruned trial's last value
        last = reported[-1] if reported else None
        note = f"pruned after epoch {frozen.user_attrs['pruned_epoch']}"
        return Outcome("PRUNED", value=last, note=note, stats=stats)
    value = best_of(reported, study.direction.name.lower())
    if value is None:
        return Outcome("FAIL", note=f"the run reported no finite '{setup.metric}'", stats=stats)
    return Outcome("COMPLETE", value=value, stats=stats)


def _heartbeat(storage: Any, trial_id: int, stop: threading.Event) -> None:
    """Optuna's heartbeat while the trial runs, so workers elsewhere can tell a dead worker's trial."""
    while True:
        with contextlib.suppress(Exception):  # a busy database: the next beat will do
            storage.record_heartbeat(trial_id)
        if stop.wait(HEARTBEAT_S):
            return


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the trial's process group (all DDP ranks), SIGKILL what is left after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------- outputs
def trial_rows(study: optuna.Study, space: list[Param]) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, the values, epochs, times, run folder, note."""
    trials = study.get_trials(deepcopy=False)
    again = retried_numbers(trials)
    names = labels(space)
    rows = []
    for t in trials:
        end = t.datetime_complete or (datetime.now() if t.datetime_start else None)
        note = t.user_attrs.get("note", "")
        if t.number in again:
            note = (
                f"{note}; run again as trial {again[t.number]}"
                if note
                else f"run again as trial {again[t.number]}"
            )
        if t.state.name == "FAIL" and not note:
            note = "failed"
        if t.state.name == "WAITING":  # enqueued; the user attributes are the failed trial's
            history = t.system_attrs.get("retry_history") or []
            note = f"waits to run trial {history[-1]} again" if history else "enqueued"
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name, "value": t.value}
        row.update({names[p.key]: t.params.get(p.key) for p in space})
        row.update(
            epochs=len(t.intermediate_values),
            duration_s=round((end - t.datetime_start).total_seconds(), 1)
            if t.datetime_start and end
            else None,
            cpu_s=t.user_attrs.get("cpu_s"),
            run_dir=t.user_attrs.get("run_dir", "") if t.state.name != "WAITING" else "",
            note=note,
        )
        rows.append(row)
    return rows


def write_tables(study: optuna.Study, setup: Setup, command: str) -> None:
    """``trials.csv`` (every digit) and ``trials.md`` (rounded, with a header) in the output folder."""
    rows = trial_rows(study, setup.space)
    setup.output.mkdir(parents=True, exist_ok=True)
    columns = [
        "trial",
        "state",
        "value",
        *labels(setup.space).values(),
        "epochs",
        "duration_s",
        "cpu_s",
        "run_dir",
        "note",
    ]
    with (setup.output / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(column: str, v: Any) -> str:
        if v is None or v == "":
            return "—" if column not in ("note", "run_dir") else ""
        if isinstance(v, float):
            return (
                f"{v:.0f}"
                if column in ("duration_s", "cpu_s")
                else f"{v:.4f}"
                if column == "value"
                else f"{v:.4g}"
            )
        return str(v).replace("|", "\\|")

    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    try:
        best = study.best_trial
        best_line = f"best: trial {best.number}, {setup.metric} = {best.value:.4f}"
    except ValueError:
        best_line = "best: no complete trial yet"
    header = [
        f"# Study `{setup.study_name}`: {setup.metric} ({study.direction.name.lower()}), "
        f"{len(counted(study.get_trials(deepcopy=False)))} trials counted",
        "",
        f"States: {', '.join(f'{k} {v}' for k, v in sorted(states.items()))}; {best_line}. "
        f"`value` is the best {setup.metric} over the trial's epochs (the last reported one for PRUNED).",
        "",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines = header + ["| " + " | ".join(cell(c, r[c]) for c in columns) + " |" for r in rows]
    (setup.output / "trials.md").write_text("\n".join(lines) + "\n")


def write_best_config(study: optuna.Study, setup: Setup) -> Path | None:
    """The best trial's config.yaml, without the search's callback and logging to lightning_logs."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    source = setup.output / best.user_attrs.get("run_dir", "") / "config.yaml"
    if not source.is_file():
        return None
    config = yaml.safe_load(source.read_text())
    trainer = config.setdefault("trainer", {})
    trainer["callbacks"] = [
        c
        for c in trainer.get("callbacks") or []
        if not (isinstance(c, dict) and c.get("class_path") == CALLBACK)
    ]
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {}).update(
            save_dir="lightning_logs", name=f"{setup.study_name}_best", version=None
        )
    config["test_after_fit"] = True  # as in configs/: fit, then test the best checkpoint
    values = ", ".join(f"{k}={_format_value(v)}" for k, v in best.params.items())
    path = setup.output / "best_config.yaml"
    path.write_text(
        f"# Best trial of study {setup.study_name!r}: trial {best.number}, {setup.metric}={best.value:.4f}\n"
        f"# ({values}).\n"
        f"# Its resolved config ({best.user_attrs.get('run_dir')}/config.yaml) without the search's pruning\n"
        f"# callback, testing after fit, logging to lightning_logs/{setup.study_name}_best:\n"
        f"#   python -m src.cli fit --config {path}\n" + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def write_plots(study: optuna.Study, setup: Setup) -> list[str]:
    """Optuna's optimisation history and parameter importances (matplotlib) as PNGs; info lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    info = []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        if complete:
            ax = ovm.plot_optimization_history(study, target_name=setup.metric)
            ax.figure.set_size_inches(7, 4.2)
            ax.figure.tight_layout()
            ax.figure.savefig(setup.output / "history.png", dpi=100)
            plt.close(ax.figure)
        else:
            info.append("info: no complete trial, so no history.png")
        varying = [p.key for p in setup.space if len({t.params.get(p.key) for t in complete}) > 1]
        if len(complete) < 2 or not varying:
            info.append(
                "info: parameter importance needs 2 complete trials with different values; no importance.png"
            )
            return info
        try:
            ax = ovm.plot_param_importances(study, params=varying, target_name=setup.metric)
        except ImportError:  # Optuna 4's default evaluator needs scikit-learn
            ax = ovm.plot_param_importances(
                study,
                params=varying,
                target_name=setup.metric,
                evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            )
        except (ValueError, RuntimeError) as err:
            info.append(f"info: no importance.png ({err})")
            return info
        ax.figure.set_size_inches(9, 1.6 + 0.45 * len(varying))
        ax.figure.tight_layout()
        ax.figure.savefig(setup.output / "importance.png", dpi=100)
        plt.close(ax.figure)
    return info


def progress_line(
    study: optuna.Study, setup: Setup, number: int, outcome: Outcome, values: dict[str, Any], budget: int
) -> str:
    names = labels(setup.space)
    shown = ", ".join(
        f"{names[k]}={v:.4g}" if isinstance(v, float) else f"{names[k]}={v}" for k, v in values.items()
    )
    try:
        best = study.best_trial
        best_text = f"best {best.value:.4f} (trial {best.number})"
    except ValueError:
        best_text = "best —"
    value = "" if outcome.value is None else f" {setup.metric}={outcome.value:.4f}"
    note = f" ({outcome.note})" if outcome.note else ""
    done = len([t for t in counted(study.get_trials(deepcopy=False)) if t.state.name != "RUNNING"])
    return (
        f"[{done}/{budget}] trial {number} {outcome.state}{value}{note} | {best_text} | {shown} | "
        f"{_plural(outcome.stats.get('epochs', 0), 'epoch')}, {outcome.stats.get('cpu_s', 0):.0f} s CPU"
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------- final step
def final_retrain(setup: Setup, best_config: Path, best_number: int, seeds: int) -> tuple[Path, float, float]:
    """Re-train the best config over ``seeds`` seeds with ``src.tools.ablate`` (fit + test).

    The runs go to ``OUTPUT/final/trial_NNNN`` (the best trial's number): run again, the step
    resumes its own runs, and a study whose best trial changed meanwhile gets new ones.
    Returns the folder and the mean and std of ``test_acc``.
    """
    from src.tools.ablate import sweep

    output = setup.output / "final" / f"trial_{best_number:04d}"
    results = sweep([str(best_config)], [], seeds, output, [], target=0.8, runs_dir=output / "runs")
    accs = [r.test_acc for r in results]
    return output, statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.search",
        description=__doc__.split("\n\n", 1)[0],
        epilog=SPACE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage="%(prog)s --config YAML --space SPEC [--space SPEC ...] --trials N [options] [-- CLI overrides]",
    )
    parser.add_argument(
        "--config", action="append", required=True, help="base config (repeat to stack overlays)"
    )
    parser.add_argument(
        "--space", action="append", required=True, metavar="SPEC", help="KEY=TYPE(ARGS), see below"
    )
    parser.add_argument(
        "--trials", type=int, required=True, help="trials in the study, counting earlier runs of it"
    )
    parser.add_argument("--study", default=None, help="study name (default: the config's file name)")
    parser.add_argument("--output", type=Path, default=None, help="default: lightning_logs/search/<study>")
    parser.add_argument("--storage", default=None, help="Optuna RDB URL (default: sqlite:///OUTPUT/study.db)")
    parser.add_argument("--timeout", type=float, default=None, help="start no trial after S seconds")
    parser.add_argument(
        "--metric", default="val_acc", help="validation metric to optimise (default: val_acc)"
    )
    parser.add_argument(
        "--direction",
        choices=("maximize", "minimize"),
        default=None,
        help="default: minimize for *loss, else maximize",
    )
    parser.add_argument(
        "--pruner", default="median", help="median (default), halving, hyperband or none; see below"
    )
    parser.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help="default: tpe")
    parser.add_argument(
        "--startup-trials", type=int, default=10, help="random trials before TPE models (default 10)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="sampler seed (offset by the trials already in the study)"
    )
    parser.add_argument(
        "--max-failures", type=int, default=3, help="stop after this many failed trials in a row (0: never)"
    )
    parser.add_argument(
        "--final-seeds", type=int, default=0, help="re-train and test the best config over K seeds"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first trial: the config's own values of the searched keys (when inside the space)",
    )
    parser.add_argument(
        "--check", action="store_true", help="only check the space against the CLI; print a trial's command"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _mask(shlex.join(["python", "-m", "src.tools.search", *argv]))
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args, unknown = build_parser().parse_known_args(argv)
    try:
        return _search(args, unknown, extra, command)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # the search said what happens next
        return 128 + stop.signum
    except KeyboardInterrupt:  # before any trial started
        print("\ninterrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _search(args: argparse.Namespace, unknown: list[str], extra: list[str], command: str) -> int:
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r}; overrides for the trials go after `--`")
    try:
        import optuna
    except ImportError:
        raise UsageError("the search needs Optuna: pip install -e '.[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings(
        "ignore", message=r".*Heartbeat of storage is supposed to be used with Study.optimize"
    )
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"optuna.*")

    if args.trials < 1:
        raise UsageError("--trials must be >= 1")
    for c in args.config:
        if not Path(c).is_file():
            raise UsageError(f"--config {c}: no such file")
    space = [parse_space(s) for s in args.space]
    keys = [p.key for p in space]
    if len(set(keys)) != len(keys):
        raise UsageError(f"a --space key is given twice: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    for item in extra:
        flag = item.split("=", 1)[0].removeprefix("--")
        if flag in keys:
            raise UsageError(f"--{flag} is both searched (--space) and fixed after `--`; keep one")
    build_pruner(args.pruner)
    study_name = args.study or Path(args.config[0]).stem
    output = (args.output or Path("lightning_logs/search") / study_name).resolve()
    url = args.storage or f"sqlite:///{output / 'study.db'}"
    direction = args.direction or ("minimize" if args.metric.endswith("loss") else "maximize")
    setup = Setup(args.config, extra, space, output, study_name, url, args.metric, args.pruner)

    print(f"checking {len(space)} search settings against the CLI ...", flush=True)
    base_config = check_with_cli(setup)
    if args.check:
        values = {p.key: p.probe_values()[0] for p in space}
        example = setup.command(values, "trial_NNNN", 0)
        print(f"ok: the CLI accepts every probe; a trial runs:\n  {shlex.join(['python', *example[1:]])}")
        return 0
    output.mkdir(parents=True, exist_ok=True)
    try:
        storage = open_storage(url, heartbeat=True, on_stale=_retry_callback())
        study = _open_study(optuna, storage, setup, direction, args)
        if args.baseline:
            _enqueue_baseline(study, base_config, space)
    except UsageError:
        raise
    except Exception as err:  # a URL Optuna cannot open: a missing driver, no server, no rights
        first = (str(err).splitlines() or [""])[0]
        raise UsageError(f"--storage {_mask(url)}: cannot open it: {type(err).__name__}: {first}") from None

    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    started, failures_in_a_row, trial = time.monotonic(), 0, None
    try:
        recovered = recover_dead_trials(study, storage)
        if recovered:
            print(
                f"trials {recovered} were left running by a search that stopped: marked FAIL, run again",
                flush=True,
            )
        done = len(counted(study.get_trials(deepcopy=False)))
        print(
            f"study {study_name!r} ({_mask(url)}): {done} of {args.trials} trials counted; "
            f"{setup.metric} {direction}; runs in {output / RUNS}",
            flush=True,
        )
        while True:
            recover_dead_trials(study, storage)
            if len(counted(study.get_trials(deepcopy=False))) >= args.trials:
                break
            if args.timeout is not None and time.monotonic() - started > args.timeout:
                print(f"--timeout {args.timeout:g} s reached: no new trial", flush=True)
                break
            trial = study.ask()
            outcome = run_trial(setup, study, storage, trial)
            values = dict(trial.params)
            if outcome.note:
                trial.set_user_attr("note", outcome.note)
            if outcome.state == "COMPLETE":
                study.tell(trial, outcome.value)
            else:
                study.tell(trial, state=getattr(optuna.trial.TrialState, outcome.state))
            number, trial = trial.number, None
            write_tables(study, setup, command)
            write_best_config(study, setup)
            print(progress_line(study, setup, number, outcome, values, args.trials), flush=True)
            if outcome.missing_metric is not None:
                raise UsageError(
                    f"the runs do not log '{setup.metric}' (they log: {', '.join(outcome.missing_metric)}); "
                    "pass one of those with --metric"
                )
            failures_in_a_row = failures_in_a_row + 1 if outcome.state == "FAIL" else 0
            if args.max_failures and failures_in_a_row >= args.max_failures:
                raise UsageError(
                    f"{failures_in_a_row} trials in a row failed; the last: {outcome.note} "
                    f"(full output: {output / RUNS}/trial_{number:04d}/trial.log)"
                )
    except Interrupted:
        if trial is not None:
            fail_and_retry(study, storage, trial._trial_id, "stopped with the interrupted search")
            print(
                f"\ninterrupted: trial {trial.number} stopped; the same command runs it again",
                file=sys.stderr,
            )
        else:
            print("\ninterrupted: the same command resumes the search", file=sys.stderr)
        write_tables(study, setup, command)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if args.final_seeds > 0:
        _wait_for_other_workers(study, storage)
    write_tables(study, setup, command)
    best_config = write_best_config(study, setup)
    for line in write_plots(study, setup):
        print(line, flush=True)
    written = ["trials.md", "trials.csv"] + [
        f for f in ("best_config.yaml", "history.png", "importance.png") if (output / f).is_file()
    ]
    print(f"wrote {', '.join(written)} in {output}", flush=True)
    if best_config is None:
        print("error: no trial completed; see trials.md and the trials' trial.log", file=sys.stderr)
        return 1
    best = study.best_trial
    print(
        f"best: trial {best.number}, {setup.metric}={best.value:.4f}, {best.params}\nbest config: {best_config}",
        flush=True,
    )
    if args.final_seeds > 0:
        with _exclusive(output / "final.lock") as mine:
            if not mine:
                print("another worker runs the final step; skipped here", flush=True)
                return 0
            folder, mean, std = final_retrain(setup, best_config, best.number, args.final_seeds)
        print(
            f"final: trial {best.number}'s config re-trained over {args.final_seeds} seeds: "
            f"test_acc {mean:.4f} ± {std:.4f} ({folder / 'summary.md'})",
            flush=True,
        )
    return 0


def _wait_for_other_workers(study: Any, storage: Any, poll_s: float = 15.0) -> None:
    """Before the final step: let other workers' trials finish (or be failed, if their worker died)."""
    told = False
    while True:
        recover_dead_trials(study, storage)
        running = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        if not running:
            return
        if not told:
            print(f"waiting for trials {running} of other workers before the final step", flush=True)
            told = True
        time.sleep(poll_s)


@contextlib.contextmanager
def _exclusive(path: Path) -> Any:
    """Yield True to the one process (of those sharing this folder) that holds ``path``'s lock."""
    import fcntl

    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _open_study(optuna: Any, storage: Any, setup: Setup, direction: str, args: argparse.Namespace) -> Any:
    """Create the study or load it; refuse one made for another space, metric or direction."""
    study = optuna.create_study(
        study_name=setup.study_name, storage=storage, direction=direction, load_if_exists=True
    )
    # One attribute, written in one call: two workers starting together must never see half of it.
    mine = {"space": [p.spec for p in setup.space], "metric": setup.metric, "direction": direction}
    if "contract" not in study.user_attrs:
        study.set_user_attr("contract", mine)
    stored = study.user_attrs["contract"]  # read from the storage again: another worker may have won
    if stored != mine:
        raise UsageError(
            f"study {setup.study_name!r} in {_mask(setup.storage_url)} was made for {stored.get('metric')} "
            f"({stored.get('direction')}) over {stored.get('space')}; pass the same --space/--metric/--direction, "
            "or another --study or --output"
        )
    # Offset the seed by the trials already there: a resumed search must not draw the values of
    # its first run again.
    seed = None if args.seed is None else args.seed + len(study.get_trials(deepcopy=False))
    if args.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=args.startup_trials, constant_liar=True
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    return optuna.load_study(
        study_name=setup.study_name, storage=storage, sampler=sampler, pruner=build_pruner(setup.pruner)
    )


def _enqueue_baseline(study: Any, config: dict[str, Any], space: list[Param]) -> None:
    """Make the config's own values the study's next trial (once per study), if they are in the space."""
    params, outside = baseline_params(config, space)
    if outside:
        print(
            f"info: --baseline: the config's own values are outside the space ({', '.join(outside)})",
            flush=True,
        )
        return
    if any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        return  # enqueued before (a resumed study)
    study.enqueue_trial(params, user_attrs={"baseline": True})


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


if __name__ == "__main__":
    sys.exit(main())
