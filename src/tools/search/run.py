"""A search once its command is checked: open the study (or refuse it), ``Study.optimize`` until the
budget is used, then the tables, the best config, the plots and the final step."""

from __future__ import annotations

import fcntl
import statistics
import time
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from src.runtime.errors import Interrupted, RunFailure, UsageError
from src.tools.search.report import progress_line, write_best_config, write_plots, write_tables
from src.tools.search.space import baseline_params, build_pruner
from src.tools.search.study import (
    CONTRACT,
    COUNTED,
    counted,
    fail_dead_workers,
    frozen,
    mask,
    open_storage,
    open_study,
    retry,
    trial_config,
)
from src.tools.search.trial import Search, TrialFailed


def run(search: Search, resumable: list[str], command: str) -> int:
    """Run the search; its exit status (errors are raised)."""
    args = search.args
    contract = {"config": trial_config(search.base, resumable), "overrides": search.extra, "command": command,
                "space": sorted(p.spec for p in search.space), "metric": args.metric, "direction": args.direction}  # fmt: skip
    study = _open(search, contract)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.baseline:
        params, outside = baseline_params(search.base, search.space)
        if outside:
            print(f"info: --baseline: the config's own values are outside the space ({', '.join(outside)})")
        elif not any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
            study.enqueue_trial(params, user_attrs={"baseline": True})
    command = study.user_attrs[CONTRACT]["command"]  # the tables show the command that made the study
    _optimize(study, search, command)
    if args.final_seeds > 0:
        _wait_for_other_workers(study, search)
    write_tables(study, search, command)
    best_config = write_best_config(study, search)
    for line in write_plots(study, search):
        print(line)
    print(f"wrote the trials' tables{', best_config.yaml' if best_config else ''} and plots in {args.output}")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RunFailure("no trial completed; see trials.md and the trials' trial.log")
    best = study.best_trial
    print(f"best: trial {best.number}, {args.metric}={best.value:.4f}, {best.params}")
    if best_config is None:
        print(f"info: trial {best.number} ran on {best.user_attrs['worker']['host']}: its run folder "
              f"{best.user_attrs.get('run_dir')} is there, and best_config.yaml is written there")  # fmt: skip
        return 0
    print(f"best config: {best_config}")
    if args.final_seeds > 0:
        _final_step(search, best_config, best.number)
    return 0


def _open(search: Search, contract: dict) -> optuna.Study:
    """The study, with the sampler and pruner of this command (neither is kept in the storage)."""
    args, url = search.args, search.args.storage
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = open_storage(url, heartbeat=True)
        study = open_study(storage, url, args.study, contract)
    except UsageError:
        raise
    except Exception as err:  # a URL Optuna cannot open: a missing driver, no server, no rights
        first = (str(err).splitlines() or [""])[0]
        raise UsageError(f"--storage {mask(url)}: cannot open it: {type(err).__name__}: {first}") from None
    # A resumed search must not draw its first values again: offset the seed by the trials there.
    seed = None if args.seed is None else args.seed + len(study.get_trials(deepcopy=False))
    sampler = (
        optuna.samplers.RandomSampler(seed=seed) if args.sampler == "random"
        else optuna.samplers.TPESampler(seed=seed, n_startup_trials=args.startup_trials, constant_liar=True)
    )  # fmt: skip
    return optuna.load_study(
        study_name=args.study, storage=storage, sampler=sampler, pruner=build_pruner(args.pruner)
    )


def _optimize(study: optuna.Study, search: Search, command: str) -> None:
    """``Study.optimize`` until the study has ``--trials`` counted trials (or ``--timeout``)."""
    dead = fail_dead_workers(study)
    if dead:
        print(f"trials {dead} were left running by a search that stopped: marked FAIL, run again")
    print(f"study {search.args.study!r} ({mask(search.args.storage)}): {len(counted(study))} of {search.args.trials} "
          f"trials counted; {search.args.metric} {search.args.direction}; trials in {search.folder(0).parent}", flush=True)  # fmt: skip

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        fail_dead_workers(study)
        write_tables(study, search, command)
        write_best_config(study, search)
        if not trial.user_attrs.get("note", "").startswith("not run"):
            print(progress_line(study, search, trial), flush=True)
        if search.children.signum is not None:
            study.stop()

    started = time.monotonic()
    search.children.check("interrupted: no trial was started")
    try:
        if len(counted(study)) < search.args.trials:
            budget = MaxTrialsCallback(search.args.trials, states=COUNTED)
            study.optimize(
                search, timeout=search.args.timeout, catch=(TrialFailed,), callbacks=[budget, after_trial]
            )
    except (Interrupted, UsageError) as stop:
        if isinstance(stop, Interrupted):
            retry(study, frozen(study, search.current))  # the stopped trial, to run again
        write_tables(study, search, command)
        raise
    search.children.check(f"interrupted after trial {search.current}; the same command resumes the search")
    if search.stop_reason:
        raise RunFailure(search.stop_reason)
    if search.args.timeout is not None and time.monotonic() - started > search.args.timeout:
        print(f"--timeout {search.args.timeout:g} s reached: no new trial")


def _wait_for_other_workers(study: optuna.Study, search: Search, poll_s: float = 15.0) -> None:
    """Before the final step: let other workers' trials finish (or be failed, if their worker died)."""
    while running := [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]:
        print(f"waiting for trials {running} of other workers before the final step", flush=True)
        time.sleep(poll_s)
        search.children.check("interrupted before the final step; the same command resumes it")
        fail_dead_workers(study)


def _final_step(search: Search, best_config: Path, number: int) -> None:
    """Re-train the best config over ``--final_seeds`` seeds with ``src.tools.ablate`` (fit + test), in
    ``OUTPUT/final/trial_NNNN``: run again, it resumes its runs; one worker per output folder runs it."""
    from src.tools.ablate import sweep

    folder, seeds = search.args.output / "final" / f"trial_{number:04d}", search.args.final_seeds
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "final.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another worker runs the final step; skipped here")
            return
        accs = [
            r.test_acc
            for r in sweep([str(best_config)], [], seeds, folder, [], 0.8, folder / "runs", search.children)
        ]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"final: trial {number}'s config re-trained over {seeds} seeds: test_acc "
          f"{statistics.mean(accs):.4f} ± {std:.4f} ({folder / 'summary.md'})")  # fmt: skip
