"""Run a config over a grid of overrides and seeds, then tabulate and plot what the runs logged.

    python -m src.tools.ablate --config configs/mnist1d_resnet_bn.yaml \\
        --grid model.init_args.batch_norm=true,false --grid model.init_args.dropout=0.0,0.3 \\
        --seeds 3 --output docs/ablations/mnist1d --trainer.max_epochs=30

Every combination of ``--grid`` values is a variant; each variant runs once per seed, one after
the other, as a normal ``python -m src.cli fit --test_after_fit=true`` run whose TensorBoard log
folder is ``RUNS_DIR/<variant>/seed_<n>`` (its console output beside it in ``seed_<n>.txt``);
``RUNS_DIR`` defaults to ``lightning_logs/ablations/<name of OUTPUT>``, so the summary can go to a
folder kept in git while checkpoints stay in the ignored ``lightning_logs``. Any argument this script does not know
(``--trainer.max_epochs=3``, ``--data.init_args.data_dir=...``) is passed to every run.

Results are read back from the runs' own TensorBoard event files: best ``val_acc``, ``test_acc``,
the first epoch whose ``val_acc`` reaches ``--target``, and the wall time between the run's first
and last logged event (training and testing, without process start-up and data loading). The sweep writes ``OUTPUT/summary.md``, ``OUTPUT/summary.csv`` (mean ± std
per variant), ``OUTPUT/runs.csv`` (one row per run, with the CPU time of its process) and ``OUTPUT/val_acc.png`` (validation
accuracy per epoch, mean over seeds with a ±1 std band). Running the same command again resumes:
runs whose folder already holds a ``test_acc`` are skipped, unfinished ones are started afresh.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Grid = list[tuple[str, list[str]]]
CPU_FILE = "cpu_seconds.txt"  # written beside the event files: CPU time of the run's process


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
        raise ValueError(f"a --grid key is given twice: {keys}")
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


# ---------------------------------------------------------------------- reading a run's logs
@dataclass
class RunResult:
    variant: str
    seed: int
    val_acc: list[tuple[int, float]] = field(default_factory=list)  # (epoch, value), epoch from 1
    test_acc: float = math.nan
    wall_s: float = math.nan
    cpu_s: float = math.nan  # CPU time of the whole run process (NaN for runs made before it was recorded)

    @property
    def best_val_acc(self) -> float:
        return max((v for _, v in self.val_acc), default=math.nan)

    def epochs_to(self, target: float) -> float:
        return next((float(e) for e, v in self.val_acc if v >= target), math.nan)


def read_run(run_dir: Path, variant: str = "", seed: int = 0) -> RunResult | None:
    """Results of one run from its TensorBoard event files, or ``None`` if it logged no ``test_acc``."""
    if not run_dir.is_dir() or not list(run_dir.glob("events.out.tfevents.*")):
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    if "test_acc" not in tags:
        return None
    result = RunResult(variant, seed, test_acc=events.Scalars("test_acc")[-1].value)
    step_epoch = {e.step: int(e.value) for e in events.Scalars("epoch")} if "epoch" in tags else {}
    if "val_acc" in tags:
        for i, e in enumerate(events.Scalars("val_acc")):
            result.val_acc.append((step_epoch.get(e.step, i) + 1, e.value))
    times = [e.wall_time for tag in tags for e in events.Scalars(tag)]
    result.wall_s = max(times) - min(times)
    cpu_file = run_dir / CPU_FILE
    if cpu_file.is_file():
        result.cpu_s = float(cpu_file.read_text())
    return result


# ---------------------------------------------------------------------- running
def run_one(configs: list[str], overrides: list[str], run_dir: Path, seed: int, log_file: Path) -> None:
    """One normal CLI run with its own log folder; raise with the log's tail if it fails."""
    cmd = [
        sys.executable,
        "-m",
        "src.cli",
        "fit",
        *(a for c in configs for a in ("--config", c)),
        *overrides,
        f"--seed_everything={seed}",
        "--test_after_fit=true",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={run_dir.parent.parent.resolve()}",
        f"--trainer.logger.init_args.name={run_dir.parent.name}",
        f"--trainer.logger.init_args.version={run_dir.name}",
    ]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(
            f"run {run_dir} failed (exit {proc.returncode}); its output is in {log_file}:\n{tail}"
        )


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _env() -> dict[str, str]:
    """The runs import ``src`` from this checkout wherever the sweep is started."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def sweep(
    configs: list[str],
    grid: Grid,
    seeds: int,
    output: Path,
    extra: list[str],
    target: float,
    runs_dir: Path | None = None,
) -> list[RunResult]:
    """Run (or skip, when finished) every variant × seed, then write the summary and the plot."""
    runs_dir = runs_dir or Path("lightning_logs/ablations") / output.resolve().name
    results = []
    todo = [(name, ovr, s) for name, ovr in variants(grid) for s in range(seeds)]
    for i, (name, overrides, seed) in enumerate(todo, 1):
        run_dir = runs_dir / name / f"seed_{seed}"
        done = read_run(run_dir, name, seed)
        if done is None:
            if run_dir.exists():  # interrupted: start it again from scratch
                shutil.rmtree(run_dir)
            print(f"[{i}/{len(todo)}] {name} seed {seed}: running", flush=True)
            start, cpu = time.perf_counter(), _children_cpu_s()
            run_one(configs, [*extra, *overrides], run_dir, seed, run_dir.with_suffix(".txt"))
            # CPU time (user + system, all threads) including start-up and data loading: on a
            # shared machine it is the honest cost of a run, where wall time also counts others' load.
            (run_dir / CPU_FILE).write_text(f"{_children_cpu_s() - cpu:.2f}\n")
            done = read_run(run_dir, name, seed)
            if done is None:
                raise SystemExit(
                    f"run {run_dir} finished but logged no test_acc; is test_after_fit possible?"
                )
            print(
                f"    test_acc {done.test_acc:.4f}  ({time.perf_counter() - start:.0f} s wall, "
                f"{done.cpu_s:.0f} s CPU)",
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
def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # unknown flags go to the runs: never take them for abbreviations of ours
    )
    parser.add_argument(
        "--config", action="append", required=True, help="base config (repeat to stack overlays)"
    )
    parser.add_argument(
        "--grid", action="append", default=[], type=_grid_type, help="KEY=V1,V2,... (repeat for more axes)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    parser.add_argument(
        "--output", type=Path, default=None, help="default: lightning_logs/ablations/<config name>"
    )
    parser.add_argument(
        "--runs_dir", type=Path, default=None, help="default: lightning_logs/ablations/<name of OUTPUT>"
    )
    parser.add_argument(
        "--target", type=float, default=0.8, help="val accuracy for the epochs-to-target column"
    )
    args, extra = parser.parse_known_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    for c in args.config:
        if not Path(c).is_file():
            parser.error(f"--config {c}: no such file")
    output = args.output or Path("lightning_logs/ablations") / Path(args.config[0]).stem
    return sweep(args.config, args.grid, args.seeds, output, extra, args.target, args.runs_dir)


def _grid_type(text: str) -> tuple[str, list[str]]:
    try:
        return parse_grid_arg(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


if __name__ == "__main__":
    main()
