"""A search once its command is checked: open the study (or refuse it), ``Study.optimize`` until the
budget is used, then what it writes under ``--output``: the trials table (``Study.trials_dataframe``),
the best trial's config ready for ``--config``, Optuna's plots, and the final step."""

from __future__ import annotations

import fcntl
import statistics
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from src.runtime.errors import Interrupted, RunFailure, UsageError
from src.tools.search import study as studies
from src.tools.search.space import baseline_params, build_pruner, format_value, labels
from src.tools.search.trial import CALLBACK, Search, TrialFailed

DIGITS = {"value": "{:.4f}", "duration_s": "{:.0f}", "cpu_s": "{:.0f}"}  # trials.md; other floats: 4 digits


def run(search: Search, resumable: list[str], command: str) -> int:
    """Run the search; its exit status (errors are raised)."""
    args = search.args
    contract = {"config": studies.trial_config(search.base, resumable), "overrides": search.extra, "command": command,
                "space": sorted(p.spec for p in search.space), "metric": args.metric, "direction": args.direction}  # fmt: skip
    study = _open(search, contract)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.baseline:
        params, outside = baseline_params(search.base, search.space)
        if outside:
            print(f"info: --baseline: the config's own values are outside the space ({', '.join(outside)})")
        elif not any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
            study.enqueue_trial(params, user_attrs={"baseline": True})
    command = study.user_attrs[studies.CONTRACT]["command"]  # the tables show the command that made the study
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
    else:
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
        study = studies.open_study(studies.open_storage(url, heartbeat=True), url, args.study, contract)
    except UsageError:
        raise
    except Exception as err:  # a URL Optuna cannot open: a missing driver, no server, no rights
        first = (str(err).splitlines() or [""])[0]
        raise UsageError(
            f"--storage {studies.mask(url)}: cannot open it: {type(err).__name__}: {first}"
        ) from None
    # A resumed search must not draw its first values again: offset the seed by the trials there.
    seed = None if args.seed is None else args.seed + len(study.get_trials(deepcopy=False))
    study.sampler = (
        optuna.samplers.RandomSampler(seed=seed) if args.sampler == "random"
        else optuna.samplers.TPESampler(seed=seed, n_startup_trials=args.startup_trials, constant_liar=True)
    )  # fmt: skip
    study.pruner = build_pruner(args.pruner)
    return study


def _optimize(study: optuna.Study, search: Search, command: str) -> None:
    """``Study.optimize`` until the study has ``--trials`` counted trials (or ``--timeout``)."""
    args = search.args
    if dead := studies.fail_dead_workers(study):
        print(f"trials {dead} were left running by a search that stopped: marked FAIL, run again")
    where = f"{args.study!r} ({studies.mask(args.storage)})"
    print(f"study {where}: {len(studies.counted(study))} of {args.trials} trials counted; {args.metric} "
          f"{args.direction}; trials in {search.folder(0).parent}", flush=True)  # fmt: skip

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        studies.fail_dead_workers(study)
        write_tables(study, search, command)
        write_best_config(study, search)
        if not trial.user_attrs.get("note", "").startswith("not run"):
            print(progress_line(study, search, trial), flush=True)
        if search.children.signum is not None:
            study.stop()

    started = time.monotonic()
    search.children.check("interrupted: no trial was started")
    try:
        if len(studies.counted(study)) < args.trials:
            budget = MaxTrialsCallback(args.trials, states=studies.COUNTED)
            study.optimize(
                search, timeout=args.timeout, catch=(TrialFailed,), callbacks=[budget, after_trial]
            )
    except (Interrupted, UsageError) as stop:
        if isinstance(stop, Interrupted):
            studies.retry(study, studies.frozen(study, search.current))  # the stopped trial, to run again
        write_tables(study, search, command)
        raise
    search.children.check(f"interrupted after trial {search.current}; the same command resumes the search")
    if search.stop_reason:
        raise RunFailure(search.stop_reason)
    if args.timeout is not None and time.monotonic() - started > args.timeout:
        print(f"--timeout {args.timeout:g} s reached: no new trial")


def _wait_for_other_workers(study: optuna.Study, search: Search, poll_s: float = 15.0) -> None:
    """Before the final step: let other workers' trials finish (or be failed, if their worker died)."""
    while running := [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]:
        print(f"waiting for trials {running} of other workers before the final step", flush=True)
        time.sleep(poll_s)
        search.children.check("interrupted before the final step; the same command resumes it")
        studies.fail_dead_workers(study)


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
        runs = sweep([str(best_config)], [], seeds, folder, [], 0.8, folder / "runs", search.children)
    accs = [r.test_acc for r in runs]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"final: trial {number}'s config re-trained over {seeds} seeds: test_acc "
          f"{statistics.mean(accs):.4f} ± {std:.4f} ({folder / 'summary.md'})")  # fmt: skip


# ---------------------------------------------------------------------- what the search writes
def trial_table(study: optuna.Study, search: Search) -> pd.DataFrame:
    """One row per trial: number, state, value, the searched values, epochs, times, run folder, note."""
    names = labels(search.space)
    columns = ["trial", "state", "value", *names.values(), "epochs", "duration_s", "cpu_s", "run_dir", "note"]
    renamed = {"number": "trial", **{f"params_{k}": v for k, v in names.items()}}
    renamed.update({f"user_attrs_{k}": k for k in ("epochs", "cpu_s", "run_dir", "note", "exit_code")})
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    if df.empty:
        return pd.DataFrame(columns=columns)
    df = df.rename(columns=renamed).reindex(columns=[*columns, "duration", "exit_code"])
    df["duration_s"] = pd.to_timedelta(df["duration"]).dt.total_seconds().round(1)
    output = search.args.output
    df["run_dir"] = [
        ""
        if not isinstance(r, str)
        else str(Path(r).relative_to(output))
        if Path(r).is_relative_to(output)
        else r
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


def write_tables(study: optuna.Study, search: Search, command: str) -> None:
    """``trials.csv`` (every digit) and ``trials.md`` (rounded, with a header) in the output folder."""
    table, metric, best = trial_table(study, search), search.args.metric, _best(study)
    table.to_csv(search.args.output / "trials.csv", index=False)

    def cell(column: str, v: Any) -> str:
        if v is None or v == "" or (isinstance(v, float) and pd.isna(v)):
            return "" if column in ("note", "run_dir") else "—"
        return DIGITS.get(column, "{:.4g}").format(v) if isinstance(v, float) else str(v).replace("|", "\\|")

    states = ", ".join(f"{k} {v}" for k, v in table["state"].value_counts().sort_index().items())
    best_line = (
        f"best: trial {best.number}, {metric} = {best.value:.4f}" if best else "best: no complete trial yet"
    )
    lines = [
        f"# Study `{search.args.study}`: {metric} ({search.args.direction}), {len(studies.counted(study))} trials counted",
        "",
        f"States: {states}; {best_line}. `value` is the best {metric} over the trial's epochs "
        "(the last reported one for PRUNED).",
        "",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(table.columns) + " |",
        "|" + "---|" * len(table.columns),
        *("| " + " | ".join(cell(c, row[c]) for c in table.columns) + " |" for _, row in table.iterrows()),
    ]
    (search.args.output / "trials.md").write_text("\n".join(lines) + "\n")


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def write_best_config(study: optuna.Study, search: Search) -> Path | None:
    """The best trial's ``config.yaml`` as the command would run it: without the search's callback,
    its loggers, progress bar and testing as in the command's own config. ``None`` when no trial
    completed, or the best one ran on another machine (its run folder is there)."""
    best = _best(study)
    source = Path(best.user_attrs.get("run_dir") or "/nonexistent", "config.yaml") if best else None
    if best is None or not source.is_file():
        return None
    config = yaml.safe_load(source.read_text())
    trainer, own = config["trainer"], search.base["trainer"]
    trainer["callbacks"] = [
        c
        for c in trainer.get("callbacks") or []
        if not (isinstance(c, dict) and c.get("class_path") == CALLBACK)
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


def write_plots(study: optuna.Study, search: Search) -> list[str]:
    """Optuna's optimisation history and parameter importances (matplotlib) as PNGs; info lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return ["info: no complete trial, so no history.png"]
    varying = [p.key for p in search.space if len({format_value(t.params.get(p.key)) for t in complete}) > 1]
    metric = search.args.metric
    plots = {"history.png": (ovm.plot_optimization_history(study, target_name=metric), (7, 4.2))}
    if len(complete) >= 2 and varying:
        ax = ovm.plot_param_importances(study, params=varying, target_name=metric)
        plots["importance.png"] = (ax, (9, 1.6 + 0.45 * len(varying)))
    for name, (ax, size) in plots.items():
        ax.figure.set_size_inches(*size)
        ax.figure.tight_layout()
        ax.figure.savefig(search.args.output / name, dpi=100)
        plt.close(ax.figure)
    if len(plots) == 1:
        return ["info: parameter importance needs 2 complete trials with different values; no importance.png"]
    return []


def progress_line(study: optuna.Study, search: Search, trial: FrozenTrial) -> str:
    names, best = labels(search.space), _best(study)
    shown = ", ".join(
        f"{names[k]}={v:.4g}" if isinstance(v, float) else f"{names[k]}={v}" for k, v in trial.params.items()
    )
    value = "" if trial.value is None else f" {search.args.metric}={trial.value:.4f}"
    note = f" ({trial.user_attrs['note']})" if trial.user_attrs.get("note") else ""
    done = sum(t.state != TrialState.RUNNING for t in studies.counted(study))
    epochs = trial.user_attrs.get("epochs") or 0
    return (
        f"[{done}/{search.args.trials}] trial {trial.number} {trial.state.name}{value}{note} | "
        f"{f'best {best.value:.4f} (trial {best.number})' if best else 'best —'} | {shown} | "
        f"{epochs} epoch{'' if epochs == 1 else 's'}, {trial.user_attrs.get('cpu_s') or 0:.0f} s CPU"
    )
