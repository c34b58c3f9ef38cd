"""The study in its storage: opening it, the contract it keeps (what defines its trials), the trial
budget shared by its workers, and trials whose worker died."""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from src.runtime.errors import UsageError
from src.runtime.settings import config_differences

HEARTBEAT_S, GRACE_S = 60, 180  # a running trial beats every minute; 3 minutes without a beat: stale
MAX_RETRY = 3  # how often a trial whose worker died is run again
# What the budget counts: finished and running trials. Failures do not (--max_failures stops a search
# whose trials keep failing); a failed trial whose worker died runs again as a new, counted trial.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
CONTRACT = "contract"  # the study's user attribute that records what defines its trials
PID_ENV = "BN_SEARCH_PID"  # the search's pid: a trial kills itself when its search is gone
# How a trial gets the storage URL: in its environment, so credentials stay out of its config.yaml.
STORAGE_ENV = "BN_SEARCH_STORAGE"


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a failed trial's values again (at most ``MAX_RETRY`` times), as Optuna does for a stale one."""
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def mask(url: str) -> str:
    """A storage URL without its password, for printing."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


def open_storage(url: str, heartbeat: bool = False) -> optuna.storages.RDBStorage:
    """An RDB storage; with ``heartbeat``, a trial without a beat for ``GRACE_S`` is failed and run again."""
    from sqlalchemy.exc import SQLAlchemyError

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Workers and their trials write to one file: wait for its lock instead of Python's 5 s.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    if heartbeat:
        kwargs.update(
            heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, heartbeat_stale_trial_callback=retry
        )
    # Workers started together all create the schema of a new database; the losers of that race
    # fail on a unique constraint and find the schema made on a later try.
    for _ in range(4):
        with contextlib.suppress(SQLAlchemyError):
            return optuna.storages.RDBStorage(url, **kwargs)
        time.sleep(0.5 + random.random())
    return optuna.storages.RDBStorage(url, **kwargs)


def open_study(storage: Any, url: str, name: str, contract: dict[str, Any]) -> optuna.Study:
    """Create the study with ``contract``, or load it and refuse it if it was made for other trials.
    Of several workers starting together one creates it (atomically) and records the contract."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=contract["direction"])
        study.set_user_attr(CONTRACT, contract)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
    for _ in range(20):  # its creator writes the contract right after creating it
        if (stored := study.user_attrs.get(CONTRACT)) is not None:
            break
        time.sleep(0.5)
    else:
        raise UsageError(
            f"study {name!r} records no search settings: it was not made by this command; pass another --study"
        )
    differences = contract_differences(stored, contract)
    if differences:
        raise UsageError(
            f"study {name!r} in {mask(url)} holds trials of another experiment; this command differs in:\n"
            + "\n".join(f"  {d}" for d in differences)
            + f"\nThe study's command: {stored.get('command')}\n"
            "Resume it with the study's settings, or start another study with --study NAME or --output DIR."
        )
    return study


def contract_differences(stored: dict[str, Any], mine: dict[str, Any], most: int = 10) -> list[str]:
    """``what: the study's -> this command's`` for each setting that defines a trial and differs."""
    out = [
        f"--{k}: {stored.get(k)} -> {mine[k]}"
        for k in ("space", "metric", "direction")
        if stored.get(k) != mine[k]
    ]
    config = config_differences(stored.get("config") or {}, mine["config"])
    out += config[:most] + ([f"... and {len(config) - most} more settings"] if len(config) > most else [])
    theirs, ours = stored.get("overrides") or [], mine["overrides"]
    if config and theirs != ours:
        gone, new = [o for o in theirs if o not in ours], [o for o in ours if o not in theirs]
        out.append(f"overrides after `--`: {' '.join(gone) or '(none)'} -> {' '.join(new) or '(none)'}")
    return out


def trial_config(config: dict[str, Any], resumable: list[str]) -> dict[str, Any]:
    """The resolved config without the DataModule options a resumed run may change (where the
    data is read from, workers...): what a trial's results depend on."""
    data = config.get("data") or {}
    init = {k: v for k, v in (data.get("init_args") or {}).items() if k not in resumable}
    return {**config, "data": {**data, "init_args": init}}


# ---------------------------------------------------------------------- the budget, retries
def counted(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=COUNTED)


def within_budget(study: optuna.Study, number: int, budget: int) -> bool:
    """Whether trial ``number`` is among the study's first ``budget`` counted trials. The storage
    numbers trials one at a time, so workers that asked at the same moment agree on who is over."""
    return sum(t.number < number for t in counted(study)) < budget


def rerun_of(trials: list[FrozenTrial]) -> dict[int, int]:
    """``{failed trial number: number of the trial that runs it again}``."""
    return {h[-1]: t.number for t in trials if (h := RetryHeartbeatStaleTrialCallback.retry_history(t))}


# ---------------------------------------------------------------------- workers
def _started(pid: int) -> str | None:
    """A process's start time (Linux /proc), to tell a live worker from a reused pid; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def worker_info() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _started(os.getpid())}


def fail_dead_workers(study: optuna.Study) -> list[int]:
    """Fail, and run again, the running trials whose worker on this machine is gone (seen at once by
    its recorded pid); a worker elsewhere is found by the heartbeat after ``GRACE_S``."""
    if not Path("/proc/self/stat").is_file():
        return []
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        info = t.user_attrs.get("worker") or {}
        if info.get("host") != socket.gethostname() or _started(int(info["pid"])) == info.get("start"):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # it finished meanwhile, or another worker failed it first
        retry(study, t)
        failed.append(t.number)
    return failed
