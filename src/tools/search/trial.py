"""One trial: its command line (a normal CLI run, in its own folder) and the objective that runs it
in a child process and reads its result back from the study's storage."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from src.runtime.errors import Interrupted, UsageError
from src.tools.child_run import Children, Finished, child_env, cli_command, into_folder, log_tail, run_folder
from src.tools.search.pruning import PID_ENV, STORAGE_ENV
from src.tools.search.space import Param
from src.tools.search.study import frozen, within_budget, worker_info

RUNS = "runs"  # the trials' folders: OUTPUT/runs/trial_NNNN
CALLBACK = "src.tools.search.pruning.OptunaPruning"
# A trial's outcome, recorded by the search and its callback; cleared when a failed trial runs again.
OUTCOME = ("run_dir", "pruned_epoch", "missing_metric", "error", "epochs", "cpu_s", "exit_code")


class TrialFailed(Exception):
    """A trial that did not give a result; the study records it FAIL and goes on."""


@dataclass
class Search:
    """What every trial is made of, and the objective that runs one (``study.optimize(search)``)."""

    args: argparse.Namespace  # the command line, its defaults filled in (study, output, storage, direction)
    extra: list[str]  # the overrides after `--`
    space: list[Param]
    base: dict[str, Any]  # the command's resolved config, without any searched value
    children: Children
    failures: int = 0  # failed trials in a row
    stop_reason: str | None = None  # set when --max_failures stopped the search
    current: int | None = None  # the trial this worker runs

    def folder(self, number: int) -> Path:
        return self.args.output / RUNS / f"trial_{number:04d}"

    def command(self, values: dict[str, Any], number: int) -> list[str]:
        by_key = {p.key: p for p in self.space}
        callback = {"study_name": self.args.study, "trial_number": number, "monitor": self.args.metric,
                    "pruner": self.args.pruner, "watch_parent": "true"}  # fmt: skip
        return cli_command(
            self.args.config,
            "--trainer.enable_progress_bar=false",  # the console goes to a file
            *self.extra,
            *(by_key[k].override(v) for k, v in values.items()),
            "--test_after_fit=false",  # trials decide on validation; --final_seeds tests the best config
            *into_folder(self.base["trainer"], self.folder(number)),
            # Appended last, so that `--trainer.callbacks.init_args.*` among the overrides after `--`
            # still address the config's own last callback.
            f"--trainer.callbacks+={CALLBACK}",
            *(f"--trainer.callbacks.init_args.{k}={v}" for k, v in callback.items()),
        )

    def __call__(self, trial: optuna.trial.Trial) -> float:
        study = trial.study
        if not within_budget(study, trial.number, self.args.trials):
            trial.set_user_attr("note", "not run: the study's last trials were taken by other workers")
            study.stop()
            raise TrialFailed("over the budget")
        values = {p.key: p.suggest(trial) for p in self.space}
        retried = RetryHeartbeatStaleTrialCallback.retry_history(frozen(study, trial.number))
        note = (
            f"runs trial {retried[-1]} again" if retried
            else "the config's own values (--baseline)" if trial.user_attrs.get("baseline")
            else ""
        )  # fmt: skip
        _set(trial, {"worker": worker_info(), "note": note, **dict.fromkeys(OUTCOME)})
        self.current = trial.number
        log = self.folder(trial.number) / "trial.log"
        env = child_env(**{STORAGE_ENV: self.args.storage, PID_ENV: str(os.getpid())})
        done = self.children.run(self.command(values, trial.number), log, env)
        return self._result(trial, done, log)

    def _result(self, trial: optuna.trial.Trial, done: Finished, log: Path) -> float:
        run = run_folder(self.folder(trial.number))
        stored = frozen(trial.study, trial.number)  # with what the trial's callback recorded
        reported, attrs = stored.intermediate_values, stored.user_attrs
        run_dir = str(run) if run else None
        _set(
            trial, {"run_dir": run_dir, "epochs": len(reported), "cpu_s": done.cpu_s, "exit_code": done.code}
        )
        if done.code != 0:
            if self.children.signum is not None:
                trial.set_user_attr("note", "stopped with the interrupted search")
                again = f"interrupted: trial {trial.number} stopped; the same command runs it again"
                raise Interrupted(self.children.signum, again)
            tail = log_tail(log)
            trial.set_user_attr("error", tail)
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            self._failed(trial, f"exit {done.code}: {last.strip()[:200]}")
        if attrs.get("missing_metric") is not None:
            raise UsageError(
                f"the runs do not log '{self.args.metric}' (they log: {', '.join(attrs['missing_metric'])}); "
                "pass one of those with --metric"
            )
        finite = [v for v in reported.values() if not math.isnan(v)]
        if attrs.get("pruned_epoch") is not None:
            self.failures = 0
            trial.set_user_attr("note", f"pruned after epoch {attrs['pruned_epoch']}")
            raise optuna.TrialPruned()  # Optuna keeps the last reported value
        if not finite:
            self._failed(trial, f"the run reported no finite '{self.args.metric}'")
        self.failures = 0
        return max(finite) if trial.study.direction == optuna.study.StudyDirection.MAXIMIZE else min(finite)

    def _failed(self, trial: optuna.trial.Trial, note: str) -> None:
        trial.set_user_attr("note", note)
        self.failures += 1
        if self.args.max_failures and self.failures >= self.args.max_failures:
            log = self.folder(trial.number) / "trial.log"
            self.stop_reason = f"{self.failures} trials in a row failed; the last: {note} (its output: {log})"
            trial.study.stop()
        raise TrialFailed(note)


def _set(trial: optuna.trial.Trial, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
