"""Run a config over a grid of overrides and seeds, then tabulate and plot what the runs recorded.

    python -m src.tools.ablate --config configs/mnist1d_resnet_bn.yaml \\
        --grid model.init_args.batch_norm=true,false --grid model.init_args.dropout=0.0,0.3 \\
        --seeds 3 --output docs/ablations/mnist1d --trainer.max_epochs=30

Every combination of ``--grid`` values is a variant; each variant runs once per seed, one after
the other, as a normal ``python -m src.cli fit --test_after_fit=true`` run with its files under
``RUNS_DIR/<variant>/seed_<n>/`` (its console output ``console.log`` and the run folder its loggers
make there, whichever loggers the config lists); ``RUNS_DIR`` defaults to
``lightning_logs/ablations/<name of OUTPUT>``, so the summary can go to a folder kept in git while
checkpoints stay in the ignored ``lightning_logs``. Any argument this script does not know
(``--trainer.max_epochs=3``, ``--data.init_args.data_dir=...``) is passed to every run. Before any
run starts, the CLI's own parser checks every variant's command line.

Results are read back from each run folder's ``summary.json`` (best ``val_acc``, ``test_acc``, the
first epoch whose ``val_acc`` reaches ``--target``) and from ``process.json`` beside it (wall and
CPU time of the run's process, start-up and data loading included). The sweep writes
``OUTPUT/summary.md``, ``OUTPUT/summary.csv`` (mean ± std per variant), ``OUTPUT/runs.csv`` (one row
per run) and ``OUTPUT/val_acc.png`` (validation accuracy per epoch, mean over seeds with a ±1 std
band). Running the same command again resumes: runs whose summary holds a test result are
skipped, unfinished ones are started afresh.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.runtime.errors import RunFailure, UsageError, exit_on_error
from src.runtime.startup import fast_exit
from src.tools.child_run import (
    Children,
    child_env,
    cli_command,
    into_folder,
    log_tail,
    print_configs,
    run_folder,
)

Grid = list[tuple[str, list[str]]]
PROCESS_FILE = "process.json"  # beside the run folder: exit code, wall and CPU time of the run's process


# ---------------------------------------------------------------------- grid


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``[512,256],[64]`` → ``['[512,256]', '[64]']``."""
    out, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    out.append(current.strip())
    return out


def parse_grid_arg(text: str) -> tuple[str, list[str]]:
    """``key=v1,v2`` → ``(key, [v1, v2])``. Commas inside brackets stay in one value (``[3,5]``)."""
    key, sep, values = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or not values.strip():
        raise ValueError(
            f"--grid {text!r}: expected KEY=VALUE1,VALUE2,... e.g. --grid model.init_args.batch_norm=true,false"
        )
    out = split_top_level(values)
    if any(v == "" for v in out):
        raise ValueError(f"--grid {text!r} has an empty value; remove the extra comma")
    if len(set(out)) != len(out):
        raise ValueError(f"--grid {text!r} repeats a value")
    return key, out


def variants(grid: Grid) -> list[tuple[str, list[str]]]:
    """Every combination of the grid values: ``(folder-safe name, CLI overrides)``."""
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise UsageError(f"a --grid key is given twice: {keys}")
    short = [k.rsplit(".", 1)[-1] for k in keys]
    labels = short if len(set(short)) == len(short) else keys
    out = []
    for combo in itertools.product(*(vals for _, vals in grid)):
        name = "+".join(f"{lab}={v}" for lab, v in zip(labels, combo, strict=True)) or "base"
        out.append(
            (
                re.sub(r"[^A-Za-z0-9._=+-]", "_", name),
                [f"--{k}={v}" for k, v in zip(keys, combo, strict=True)],
            )
        )
    return out


# ---------------------------------------------------------------------- reading a run's results
@dataclass
class RunResult:
    variant: str
    seed: int
    val_acc: list[tuple[int, float]] = field(default_factory=list)  # (epoch, value), epoch from 1
    test_acc: float = math.nan
    wall_s: float = math.nan
    cpu_s: float = math.nan

    @property
    def best_val_acc(self) -> float:
        return max((v for _, v in self.val_acc), default=math.nan)

    def epochs_to(self, target: float) -> float:
        return next((float(e) for e, v in self.val_acc if v >= target), math.nan)


def read_run(folder: Path, variant: str = "", seed: int = 0) -> RunResult | None:
    """One run's results from its run folder's ``summary.json`` (under ``folder``), or ``None``
    while it holds no test result (the run has not finished)."""
    run = run_folder(folder)
    try:
        summary = json.loads((run / "summary.json").read_text()) if run else {}
    except (OSError, json.JSONDecodeError):
        return None
    test_acc = (summary.get("test") or {}).get("test_acc")
    if test_acc is None:
        return None
    result = RunResult(variant, seed, test_acc=test_acc)
    for entry in summary.get("epochs") or []:
        if entry.get("val_acc") is not None:
            result.val_acc.append((entry["epoch"] + 1, entry["val_acc"]))
    process = folder / PROCESS_FILE
    if process.is_file():
        times = json.loads(process.read_text())
        result.wall_s, result.cpu_s = times["wall_s"], times["cpu_s"]
    return result


# ---------------------------------------------------------------------- running
def check_variants(configs: list[str], extra: list[str], grid: Grid) -> dict[str, dict[str, Any]]:
    """Each variant's resolved config, from the CLI's own parser (nothing trains).

    Raises:
        UsageError: the CLI's message for the first variant it refuses.
    """
    named = variants(grid)
    argvs = [cli_command(configs, *extra, *overrides)[3:] for _, overrides in named]
    parsed = print_configs(argvs)
    for (name, _), result in zip(named, parsed, strict=False):
        if result.code != 0:
            raise UsageError(f"the CLI refused variant {name}: {result.message()}")
    return {name: result.config or {} for (name, _), result in zip(named, parsed, strict=True)}


def run_one(cmd: list[str], folder: Path, children: Children) -> None:
    """One normal CLI run with its files under ``folder``; raise with the log's tail if it fails."""
    log = folder / "console.log"
    done = children.run(cmd, log, child_env())
    children.check(
        f"interrupted: run {folder} stopped; the same command runs it again (finished runs are kept)"
    )
    if done.code != 0:
        raise RunFailure(
            f"run {folder} failed (exit {done.code}); its output is in {log}:\n{log_tail(log, 30)}"
        )
    (folder / PROCESS_FILE).write_text(
        json.dumps({"exit_code": done.code, "wall_s": done.wall_s, "cpu_s": done.cpu_s}) + "\n"
    )


def sweep(
    configs: list[str],
    grid: Grid,
    seeds: int,
    output: Path,
    extra: list[str],
    target: float,
    runs_dir: Path | None,
    children: Children,
) -> list[RunResult]:
    """Run (or skip, when finished) every variant × seed, then write the summary and the plot."""
    runs_dir = (runs_dir or Path("lightning_logs/ablations") / output.resolve().name).resolve()
    resolved = check_variants(configs, extra, grid)
    children.check("interrupted: no run was started")
    results = []
    todo = [(name, ovr, s) for name, ovr in variants(grid) for s in range(seeds)]
    for i, (name, overrides, seed) in enumerate(todo, 1):
        folder = runs_dir / name / f"seed_{seed}"
        done = read_run(folder, name, seed)
        if done is None:
            if folder.exists():  # interrupted: start it again from scratch
                shutil.rmtree(folder)
            print(f"[{i}/{len(todo)}] {name} seed {seed}: running", flush=True)
            settings = [
                f"--seed_everything={seed}",
                "--test_after_fit=true",
                "--trainer.enable_progress_bar=false",
            ]
            run_one(
                cli_command(
                    configs, *extra, *overrides, *settings, *into_folder(resolved[name]["trainer"], folder)
                ),
                folder,
                children,
            )
            done = read_run(folder, name, seed)
            if done is None:
                raise RunFailure(f"run {folder} finished without a test result in its summary.json")
            print(
                f"    test_acc {done.test_acc:.4f}  ({done.wall_s:.0f} s wall, {done.cpu_s:.0f} s CPU)",
                flush=True,
            )
        else:
            print(f"[{i}/{len(todo)}] {name} seed {seed}: finished before, skipped", flush=True)
        results.append(done)
    write_summary(results, output, target)
    seeds_note = f"mean ± std over {seeds} seed{'s' if seeds > 1 else ''}"
    plot_curves(
        results, output / "val_acc.png", f"{' + '.join(Path(c).stem for c in configs)} ({seeds_note})"
    )
    print(
        f"\n{(output / 'summary.md').read_text()}\nWrote {output}/summary.md, summary.csv, runs.csv, val_acc.png"
    )
    return results


# ---------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[RunResult], target: float) -> list[dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(r.variant for r in results):
        runs = [r for r in results if r.variant == name]
        row: dict[str, Any] = {"variant": name, "runs": len(runs)}
        for col, values in (
            ("best_val_acc", [r.best_val_acc for r in runs]),
            ("test_acc", [r.test_acc for r in runs]),
            ("epochs_to_target", [r.epochs_to(target) for r in runs]),
            ("wall_s", [r.wall_s for r in runs]),
        ):
            row[f"{col}_mean"], row[f"{col}_std"] = _mean_std(values)
        row["reached_target"] = sum(not math.isnan(r.epochs_to(target)) for r in runs)
        rows.append(row)
    return rows


def write_summary(results: list[RunResult], output: Path, target: float) -> None:
    rows = summarise(results, target)
    output.mkdir(parents=True, exist_ok=True)
    with (output / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()} for row in rows
        )
    with (output / "runs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["variant", "seed", "best_val_acc", "test_acc", "epochs_to_target", "epochs", "wall_s", "cpu_s"]
        )
        for r in results:
            writer.writerow(
                [
                    r.variant,
                    r.seed,
                    round(r.best_val_acc, 5),
                    round(r.test_acc, 5),
                    r.epochs_to(target),
                    len(r.val_acc),
                    round(r.wall_s, 1),
                    round(r.cpu_s, 1),
                ]
            )

    def cell(row: dict[str, Any], col: str, digits: int) -> str:
        m, s = row[f"{col}_mean"], row[f"{col}_std"]
        return "—" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"

    lines = [
        f"| variant | runs | best val acc | test acc | epochs to val acc ≥ {target:g} | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        reached = (
            f" ({row['reached_target']}/{row['runs']} reached)" if row["reached_target"] < row["runs"] else ""
        )
        lines.append(
            f"| {row['variant']} | {row['runs']} | {cell(row, 'best_val_acc', 4)} | {cell(row, 'test_acc', 4)} | "
            f"{cell(row, 'epochs_to_target', 1)}{reached} | {cell(row, 'wall_s', 0)} |"
        )
    (output / "summary.md").write_text("\n".join(lines) + "\n")


def plot_curves(results: list[RunResult], path: Path, title: str = "") -> None:
    """Validation accuracy per epoch for each variant: mean over seeds, ±1 std band."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for name in dict.fromkeys(r.variant for r in results):
        per_epoch: dict[int, list[float]] = {}
        for r in results:
            if r.variant == name:
                for epoch, v in r.val_acc:
                    per_epoch.setdefault(epoch, []).append(v)
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        mean = np.array([np.mean(per_epoch[e]) for e in epochs])
        std = np.array([np.std(per_epoch[e]) for e in epochs])
        (line,) = ax.plot(epochs, mean, label=name)
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # unknown flags go to the runs: never take them for abbreviations of ours
    )
    add = parser.add_argument
    add("--config", action="append", required=True, help="base config (repeat to stack overlays)")
    add("--grid", action="append", default=[], type=_grid_type, help="KEY=V1,V2,... (repeat for more axes)")
    add("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    add("--output", type=Path, default=None, help="default: lightning_logs/ablations/<config name>")
    add("--runs_dir", type=Path, default=None, help="default: lightning_logs/ablations/<name of OUTPUT>")
    add("--target", type=float, default=0.8, help="val accuracy for the epochs-to-target column")
    args, extra = parser.parse_known_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    for c in args.config:
        if not Path(c).is_file():
            parser.error(f"--config {c}: no such file")
    output = args.output or Path("lightning_logs/ablations") / Path(args.config[0]).stem
    with exit_on_error(), Children() as children:
        sweep(args.config, args.grid, args.seeds, output, extra, args.target, args.runs_dir, children)


def _grid_type(text: str) -> tuple[str, list[str]]:
    try:
        return parse_grid_arg(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


if __name__ == "__main__":
    with fast_exit():
        main(sys.argv[1:])
