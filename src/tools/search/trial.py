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
from src.tools.search.study import retry, within_budget, worker_info

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
    current: int | None = None  # the trial this worker runs

    def folder(self, number: int) -> Path:
        return self.args.output / "runs" / f"trial_{number:04d}"

    def command(self, values: dict[str, Any], number: int) -> list[str]:
        args, by_key = self.args, {p.key: p for p in self.space}
        callback = dict(study_name=args.study, trial_number=number, monitor=args.metric, pruner=args.pruner)
        return cli_command(
            args.config,
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
        study, number = trial.study, trial.number
        if not within_budget(study, number, self.args.trials):
            _record(trial, note="not run: the study's last trials were taken by other workers")
            study.stop()
            raise TrialFailed("over the budget")
        values = {p.key: p.suggest(trial) for p in self.space}
        retried = RetryHeartbeatStaleTrialCallback.retry_history(study.get_trials(deepcopy=False)[number])
        if retried:
            note = f"runs trial {retried[-1]} again"
        else:
            note = "the config's own values (--baseline)" if trial.user_attrs.get("baseline") else ""
        _record(trial, **dict.fromkeys(OUTCOME), worker=worker_info(), note=note)
        self.current, log = number, self.folder(number) / "trial.log"
        env = child_env(**{STORAGE_ENV: self.args.storage, PID_ENV: str(os.getpid())})
        done = self.children.run(self.command(values, number), log, env)
        return self._result(trial, done, log)

    def _result(self, trial: optuna.trial.Trial, done: Finished, log: Path) -> float:
        study, number, run = trial.study, trial.number, run_folder(self.folder(trial.number))
        stored = study.get_trials(deepcopy=False)[number]  # with what the trial's callback recorded
        reported, attrs = stored.intermediate_values, stored.user_attrs
        run_dir = str(run) if run else None
        _record(trial, run_dir=run_dir, epochs=len(reported), cpu_s=done.cpu_s, exit_code=done.code)
        if done.code != 0 and self.children.signum is not None:
            _record(trial, note="stopped with the interrupted search")
            retry(study, stored)  # its values run again as a new trial
            raise Interrupted(
                self.children.signum, f"interrupted: trial {number} stopped; the same command runs it again"
            )
        if done.code != 0:
            tail = log_tail(log)
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            _record(trial, error=tail, note=f"exit {done.code}: {last.strip()[:200]}")
            raise TrialFailed(f"exit {done.code}")
        if attrs.get("missing_metric") is not None:
            raise UsageError(
                f"the runs do not log '{self.args.metric}' (they log: {', '.join(attrs['missing_metric'])}); "
                "pass one of those with --metric"
            )
        if attrs.get("pruned_epoch") is not None:
            _record(trial, note=f"pruned after epoch {attrs['pruned_epoch']}")
            raise optuna.TrialPruned()  # Optuna keeps the last reported value
        finite = [v for v in reported.values() if not math.isnan(v)]
        if not finite:
            _record(trial, note=f"the run reported no finite '{self.args.metric}'")
            raise TrialFailed("no finite value")
        return (max if self.args.direction == "maximize" else min)(finite)


def _record(trial: optuna.trial.Trial, **attrs: Any) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
