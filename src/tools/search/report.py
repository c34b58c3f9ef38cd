"""What a search writes under ``--output``: the trials table (``Study.trials_dataframe``), the best
trial's config ready for ``--config``, Optuna's plots, and the progress line of each trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from src.tools.search.space import format_value, labels
from src.tools.search.study import counted, rerun_of
from src.tools.search.trial import CALLBACK, Search

DIGITS = {"value": "{:.4f}", "duration_s": "{:.0f}", "cpu_s": "{:.0f}"}  # trials.md; other floats: 4 digits


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
    df["run_dir"] = [_shown(r, search.args.output) for r in df["run_dir"]]
    again = rerun_of(study.get_trials(deepcopy=False))
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


def _shown(run_dir: Any, output: Path) -> str:
    if not isinstance(run_dir, str):
        return ""
    return str(Path(run_dir).relative_to(output)) if Path(run_dir).is_relative_to(output) else run_dir


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
        f"# Study `{search.args.study}`: {metric} ({search.args.direction}), {len(counted(study))} trials counted",
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
    ours = [
        c for c in trainer.get("callbacks") or [] if isinstance(c, dict) and c.get("class_path") == CALLBACK
    ]
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or [] if c not in ours]
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
    plots = {"history.png": (ovm.plot_optimization_history(study, target_name=metric), 4.2)}
    if len(complete) >= 2 and varying:
        ax = ovm.plot_param_importances(study, params=varying, target_name=metric)
        plots["importance.png"] = (ax, 1.6 + 0.45 * len(varying))
    for name, (ax, height) in plots.items():
        ax.figure.set_size_inches(7 if name == "history.png" else 9, height)
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
    done = sum(t.state != TrialState.RUNNING for t in counted(study))
    epochs = trial.user_attrs.get("epochs") or 0
    return (
        f"[{done}/{search.args.trials}] trial {trial.number} {trial.state.name}{value}{note} | "
        f"{f'best {best.value:.4f} (trial {best.number})' if best else 'best —'} | {shown} | "
        f"{epochs} epoch{'' if epochs == 1 else 's'}, {trial.user_attrs.get('cpu_s') or 0:.0f} s CPU"
    )
