"""A search once its command is checked: the objective (each trial a normal CLI run in a child
process, its result read back from the study's storage), ``Study.optimize`` until the budget is used,
then what it writes under ``--output``: the trials table (``Study.trials_dataframe``) and the best
trial's config ready for ``--config``."""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from src.runtime.errors import Interrupted, RunFailure, UsageError
from src.tools.child_run import Children, Finished, child_env, cli_command, into_folder, log_tail, run_folder
from src.tools.search import study as studies
from src.tools.search.space import Param, baseline_params, build_pruner, format_value, labels

CALLBACK = "src.tools.search.pruning.OptunaPruning"
DIGITS = {"value": "{:.4f}", "duration_s": "{:.0f}", "cpu_s": "{:.0f}"}  # other floats: 4 digits
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

    def command(self, values: dict[Param, Any], number: int) -> list[str]:
        args = self.args
        callback = dict(study_name=args.study, trial_number=number, monitor=args.metric, pruner=args.pruner)
        return cli_command(
            args.config,
            "--trainer.enable_progress_bar=false",  # the console goes to a file
            *self.extra,
            *(p.override(v) for p, v in values.items()),
            "--test_after_fit=false",  # trials decide on validation, never look at the test split
            *into_folder(self.base["trainer"], self.folder(number)),
            # Appended last, so that `--trainer.callbacks.init_args.*` among the overrides after `--`
            # still address the config's own last callback.
            f"--trainer.callbacks+={CALLBACK}",
            *(f"--trainer.callbacks.init_args.{k}={v}" for k, v in callback.items()),
        )

    def __call__(self, trial: optuna.trial.Trial) -> float:
        study, number = trial.study, trial.number
        if not studies.within_budget(study, number, self.args.trials):
            _record(trial, note="not run: the study's last trials were taken by other workers")
            study.stop()
            raise TrialFailed("over the budget")
        values = {p: p.suggest(trial) for p in self.space}
        retried = RetryHeartbeatStaleTrialCallback.retry_history(study.get_trials(deepcopy=False)[number])
        baseline = "the config's own values (--baseline)" if trial.user_attrs.get("baseline") else ""
        note = f"runs trial {retried[-1]} again" if retried else baseline
        _record(trial, **dict.fromkeys(OUTCOME), worker=studies.worker_info(), note=note)
        self.current, log = number, self.folder(number) / "trial.log"
        env = child_env(**{studies.STORAGE_ENV: self.args.storage, studies.PID_ENV: str(os.getpid())})
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
            studies.retry(study, stored)  # its values run again as a new trial
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


def run(search: Search, resumable: list[str], command: str) -> int:
    """Run the search; its exit status (errors are raised)."""
    args = search.args
    contract = {
        "config": studies.trial_config(search.base, resumable),
        "overrides": search.extra,
        "command": command,
        "space": sorted(p.spec for p in search.space),
        "metric": args.metric,
        "direction": args.direction,
    }
    study = _open(search, contract)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.baseline:
        params, outside = baseline_params(search.base, search.space)
        if outside:
            print(f"info: --baseline: the config's own values are outside the space ({', '.join(outside)})")
        elif not any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
            study.enqueue_trial(params, user_attrs={"baseline": True})
    _optimize(study, search)
    best, best_config = best_trial(study), write_best_config(study, search)
    print(f"wrote the trials' tables{', best_config.yaml' if best_config else ''} in {args.output}")
    if best is None:
        raise RunFailure("no trial completed; see trials.md and the trials' trial.log")
    print(f"best: trial {best.number}, {args.metric}={best.value:.4f}, {best.params}")
    if best_config is None:
        host, run_dir = best.user_attrs["worker"]["host"], best.user_attrs.get("run_dir")
        print(f"info: the best trial ran on {host}: its run folder {run_dir} and best_config.yaml are there")
    else:
        final = args.output / "final"
        print(f"best config: {best_config}; to re-train and test it over seeds 0-2 (docs/search.md):")
        print(
            f"  python -m src.tools.ablate --config {best_config} --seeds 3 --output {final} --runs_dir {final}/runs"
        )
    return 0


def _open(search: Search, contract: dict) -> optuna.Study:
    """The study, with the sampler and pruner of this command (neither is kept in the storage)."""
    args, url = search.args, search.args.storage
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = studies.open_storage(url, heartbeat=True)
    except Exception as err:  # a URL Optuna cannot open: a missing driver, no server, no rights
        said = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        raise UsageError(f"--storage {studies.mask(url)}: cannot open it: {said}") from None
    study = studies.open_study(storage, url, args.study, contract)
    # A resumed search must not draw its first values again: offset the seed by the trials there.
    seed = None if args.seed is None else args.seed + len(study.get_trials(deepcopy=False))
    if args.sampler == "random":
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        study.sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=args.startup_trials, constant_liar=True
        )
    study.pruner = build_pruner(args.pruner)
    return study


def _optimize(study: optuna.Study, search: Search) -> None:
    """``Study.optimize`` until the study has ``--trials`` counted trials (or ``--timeout``); it stops
    after ``--max_failures`` failed trials in a row."""
    args, failures, stop_reason = search.args, 0, None
    if dead := studies.fail_dead_workers(study):
        print(f"trials {dead} were left running by a search that stopped: marked FAIL, run again")
    print(
        f"study {args.study!r} ({studies.mask(args.storage)}): {len(studies.counted(study))} of {args.trials} "
        f"trials counted; {args.metric} {args.direction}; trials in {search.folder(0).parent}",
        flush=True,
    )

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal failures, stop_reason
        studies.fail_dead_workers(study)
        table = write_tables(study, search)
        write_best_config(study, search)
        if trial.user_attrs.get("note", "").startswith("not run"):
            return
        print(progress_line(table, search, trial.number, best_trial(study)), flush=True)
        failures = failures + 1 if trial.state == TrialState.FAIL else 0
        if args.max_failures and failures >= args.max_failures:
            log, note = search.folder(trial.number) / "trial.log", trial.user_attrs["note"]
            stop_reason = f"{failures} trials in a row failed; the last: {note} (its output: {log})"
        if stop_reason or search.children.signum is not None:
            study.stop()

    started = time.monotonic()
    search.children.check("interrupted: no trial was started")
    try:
        if len(studies.counted(study)) < args.trials:
            callbacks = [MaxTrialsCallback(args.trials, states=studies.COUNTED), after_trial]
            study.optimize(search, timeout=args.timeout, catch=(TrialFailed,), callbacks=callbacks)
    finally:
        write_tables(study, search)
    search.children.check(f"interrupted after trial {search.current}; the same command resumes the search")
    if stop_reason:
        raise RunFailure(stop_reason)
    if args.timeout is not None and time.monotonic() - started > args.timeout:
        print(f"--timeout {args.timeout:g} s reached: no new trial")


# ---------------------------------------------------------------------- what the search writes
def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """``Study.best_trial``, or ``None`` while no trial is complete."""
    try:
        return study.best_trial
    except ValueError:
        return None


def cell(column: str, value: Any) -> str:
    """A value as ``trials.md`` and the progress lines show it."""
    if value is None or value == "" or (isinstance(value, float) and pd.isna(value)):
        return "" if column in ("note", "run_dir") else "—"
    return DIGITS.get(column, "{:.4g}").format(value) if isinstance(value, float) else str(value)


def trial_table(study: optuna.Study, search: Search) -> pd.DataFrame:
    """One row per trial: number, state, value, the searched values, epochs, times, run folder, note."""
    names = {f"params_{k}": v for k, v in labels(search.space).items()}
    attrs = {f"user_attrs_{k}": k for k in ("epochs", "cpu_s", "run_dir", "note", "exit_code")}
    columns = ["trial", "state", "value", *names.values(), "epochs", "duration_s", "cpu_s", "run_dir", "note"]
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    df = df.rename(columns={"number": "trial", **names, **attrs}).reindex(
        columns=[*columns, "duration", "exit_code"]
    )
    df["duration_s"] = pd.to_timedelta(df["duration"]).dt.total_seconds().round(1)
    output = search.args.output
    df["run_dir"] = [
        str(Path(r).relative_to(output)) if isinstance(r, str) and Path(r).is_relative_to(output) else r
        for r in df["run_dir"]
    ]
    again = studies.rerun_of(study.get_trials(deepcopy=False))
    df["note"] = [
        _note(*row, again) for row in zip(df["trial"], df["state"], df["note"], df["exit_code"], strict=True)
    ]
    return df[columns]


def _note(number: int, state: str, note: Any, code: Any, again: dict[int, int]) -> str:
    note = note if isinstance(note, str) else ""
    if state == "FAIL" and pd.isna(code) and not note.startswith("not run"):  # its worker died first
        note = "its search process died while it ran"
    elif state == "WAITING":
        note = "waits to run again" if number in again.values() else "enqueued"
    later = f"run again as trial {again[number]}" if number in again else ""
    return "; ".join(n for n in (note, later) if n)


def write_tables(study: optuna.Study, search: Search) -> pd.DataFrame:
    """``trials.csv`` (every digit) and ``trials.md`` (rounded, with a header) in the output folder;
    the table they show."""
    table, args, best = trial_table(study, search), search.args, best_trial(study)
    table.to_csv(args.output / "trials.csv", index=False)
    states = ", ".join(f"{k} {v}" for k, v in table["state"].value_counts().sort_index().items())
    best_text = f"trial {best.number}, {args.metric} = {best.value:.4f}" if best else "no complete trial yet"
    lines = [
        f"# Study `{args.study}`: {args.metric} ({args.direction}), {len(studies.counted(study))} trials counted",
        "",
        f"States: {states}; best: {best_text}. `value` is the best {args.metric} over the trial's epochs "
        "(the last reported one for PRUNED).",
        "",
        f"Command: `{study.user_attrs[studies.CONTRACT]['command']}`",  # the command that made the study
        "",
        "| " + " | ".join(table.columns) + " |",
        "|" + "---|" * len(table.columns),
        *(
            "| " + " | ".join(cell(c, row[c]).replace("|", "\\|") for c in table.columns) + " |"
            for _, row in table.iterrows()
        ),
    ]
    (args.output / "trials.md").write_text("\n".join(lines) + "\n")
    return table


def progress_line(table: pd.DataFrame, search: Search, number: int, best: FrozenTrial | None) -> str:
    """The line printed after trial ``number`` (docs/search.md): its row of the table."""
    row, metric = table.set_index("trial").loc[number], search.args.metric
    shown = ", ".join(f"{name}={cell(name, row[name])}" for name in labels(search.space).values())
    value = f" {metric}={cell('value', row['value'])}" if pd.notna(row["value"]) else ""
    note = f" ({row['note']})" if row["note"] else ""
    done = table["state"].isin(("COMPLETE", "PRUNED")).sum()
    epochs = cell("epochs", row["epochs"])
    return (
        f"[{done}/{search.args.trials}] trial {number} {row['state']}{value}{note} | "
        f"{f'best {best.value:.4f} (trial {best.number})' if best else 'best —'} | {shown} | "
        f"{epochs} epoch{'' if epochs == '1' else 's'}, {cell('cpu_s', row['cpu_s'])} s CPU"
    )


def write_best_config(study: optuna.Study, search: Search) -> Path | None:
    """The best trial's ``config.yaml`` as the command would run it: without the search's callback,
    its loggers, progress bar and testing as in the command's own config. ``None`` when no trial
    completed, or the best one ran on another machine (its run folder is there)."""
    best = best_trial(study)
    source = Path(best.user_attrs.get("run_dir") or "/nonexistent", "config.yaml") if best else None
    if source is None or not source.is_file():
        return None
    config = yaml.safe_load(source.read_text())
    trainer, own = config["trainer"], search.base["trainer"]
    callbacks = trainer.get("callbacks") or []
    trainer["callbacks"] = [
        c for c in callbacks if not (isinstance(c, dict) and c.get("class_path") == CALLBACK)
    ]
    trainer.update({key: own.get(key) for key in ("logger", "default_root_dir", "enable_progress_bar")})
    config["test_after_fit"] = search.base.get("test_after_fit")
    values = ", ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
    path = search.args.output / "best_config.yaml"
    path.write_text(
        f"# Best trial of study {search.args.study!r}: trial {best.number}, {search.args.metric}={best.value:.4f}\n"
        f"# ({values}), from {source}\n"
        f"#   python -m src.cli fit --config {path}\n" + yaml.safe_dump(config, sort_keys=False)
    )
    return path
