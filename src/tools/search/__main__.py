"""``python -m src.tools.search``: the command line, the checks before any trial, and the study run
with ``Study.optimize`` (see :mod:`src.tools.search`)."""

from __future__ import annotations

import argparse
import fcntl
import re
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from src.runtime.errors import Interrupted, RunFailure, UsageError, exit_on_error
from src.tools.child_run import Children, cli_command, print_configs
from src.tools.search.space import Param, baseline_params, build_pruner, format_value, parse_space

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
  --space 'model.init_args.bn_position=choice(before_activation,after_activation)'
  --space 'data.init_args.batch_size=choice(128,256,512)'
The learning rate is model.init_args.lr: the optimiser's, and the peak of the one-cycle schedule.

pruners (--pruner), Optuna's, judged on the metric after each validation epoch (steps are epochs):
  median (MedianPruner), halving (SuccessiveHalvingPruner), hyperband (HyperbandPruner),
  threshold(lower=0.5) (ThresholdPruner), none; arguments in brackets: 'median(n_warmup_steps=4)'.

Everything after `--` goes to every trial's command line (--trainer.max_epochs=5, ...).
Exit status: 0 when the study has a complete trial, 1 when none completed or --max_failures trials
failed in a row, 2 for bad input, 130/143 when interrupted (the same command resumes).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.search",
        description="Hyperparameter search with Optuna, where every trial is a normal CLI run.",
        epilog=SPACE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage="%(prog)s --config YAML --space SPEC [--space SPEC ...] --trials N [options] [-- CLI overrides]",
    )
    add = parser.add_argument
    add("--config", action="append", required=True, help="base config (repeat to stack overlays)")
    add("--space", action="append", required=True, metavar="SPEC", help="KEY=TYPE(ARGS), see below")
    add("--trials", type=int, required=True, help="trials in the study, counting earlier runs of it")
    add("--study", default=None, help="study name (default: the config's file name)")
    add("--output", type=Path, default=None, help="default: lightning_logs/search/<study>")
    add("--storage", default=None, help="Optuna RDB URL (default: sqlite:///OUTPUT/study.db)")
    add("--timeout", type=float, default=None, help="start no trial after S seconds")
    add("--metric", default="val_acc", help="validation metric to optimise (default: val_acc)")
    add(
        "--direction",
        choices=("maximize", "minimize"),
        default=None,
        help="default: minimize for *loss, else maximize",
    )
    add("--pruner", default="median", help="median (default), halving, hyperband, threshold(...) or none")
    add("--sampler", choices=("tpe", "random"), default="tpe", help="default: tpe")
    add("--startup_trials", type=int, default=10, help="random trials before TPE models (default 10)")
    add("--seed", type=int, default=None, help="sampler seed (offset by the trials already in the study)")
    add("--max_failures", type=int, default=3, help="stop after this many failed trials in a row (0: never)")
    add("--final_seeds", type=int, default=0, help="re-train and test the best config over K seeds")
    add(
        "--baseline", action="store_true", help="first trial: the config's own values (when inside the space)"
    )
    add("--check", action="store_true", help="only check the space against the CLI; print a trial's command")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, unknown = build_parser().parse_known_args(argv[:cut])
    with exit_on_error(), Children() as children:
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r}; overrides for the trials go after `--`")
        return _search(args, argv[cut + 1 :], argv, children)


def _search(args: argparse.Namespace, extra: list[str], argv: list[str], children: Children) -> int:
    try:
        import optuna
    except ImportError:
        raise UsageError("the search needs Optuna: pip install -e '.[search]'") from None
    from src.tools.search.study import mask, open_storage, open_study, trial_config
    from src.tools.search.trial import Search

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own line per trial
    # Heartbeat, retry and Matplotlib plots are marked experimental: the search pins the Optuna it runs on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    space = _check_args(args, extra)
    output = (
        args.output or Path("lightning_logs/search") / (args.study or Path(args.config[0]).stem)
    ).resolve()
    url = args.storage or f"sqlite:///{output / 'study.db'}"
    direction = args.direction or ("minimize" if args.metric.endswith("loss") else "maximize")
    print(f"checking {len(space)} search settings against the CLI ...", flush=True)
    base, resumable = check_with_cli(args.config, extra, space)
    children.check("interrupted: nothing was started")
    search = Search(args.config, extra, space, output, args.study or Path(args.config[0]).stem, url, args.metric,
                    args.pruner, args.trials, args.max_failures, base, children)  # fmt: skip
    if args.check:
        example = search.command({p.key: p.probe_values()[0] for p in space}, 0)
        print(f"ok: the CLI accepts every probe; a trial runs:\n  {shlex.join(['python', *example[1:]])}")
        return 0
    command = mask(shlex.join(["python", "-m", "src.tools.search", *argv]))
    contract = {"config": trial_config(base, resumable), "overrides": extra, "space": sorted(p.spec for p in space),
                "metric": args.metric, "direction": direction, "command": command}  # fmt: skip
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = open_storage(url, heartbeat=True)
        study = open_study(storage, url, search.study_name, contract)
        seed = None if args.seed is None else args.seed + len(study.get_trials(deepcopy=False))
        sampler = (
            optuna.samplers.RandomSampler(seed=seed) if args.sampler == "random"
            else optuna.samplers.TPESampler(seed=seed, n_startup_trials=args.startup_trials, constant_liar=True)
        )  # fmt: skip
        study = optuna.load_study(
            study_name=search.study_name, storage=storage, sampler=sampler, pruner=build_pruner(args.pruner)
        )
    except UsageError:
        raise
    except Exception as err:  # a URL Optuna cannot open: a missing driver, no server, no rights
        first = (str(err).splitlines() or [""])[0]
        raise UsageError(f"--storage {mask(url)}: cannot open it: {type(err).__name__}: {first}") from None
    output.mkdir(parents=True, exist_ok=True)
    if args.baseline:
        _enqueue_baseline(study, base, space)
    _optimize(study, search, args, stored_command(study))
    return _finish(study, search, args, stored_command(study))


def stored_command(study: Any) -> str:
    from src.tools.search.study import CONTRACT

    return study.user_attrs[CONTRACT]["command"]


def _check_args(args: argparse.Namespace, extra: list[str]) -> list[Param]:
    if args.trials < 1:
        raise UsageError("--trials must be >= 1")
    for c in args.config:
        if not Path(c).is_file():
            raise UsageError(f"--config {c}: no such file")
    space = [parse_space(s) for s in args.space]
    keys = [p.key for p in space]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UsageError(f"a --space key is given twice: {twice[0]}")
    fixed = [f.split("=", 1)[0].removeprefix("--") for f in extra]
    both = [k for k in keys if k in fixed]
    if both:
        raise UsageError(f"--{both[0]} is both searched (--space) and fixed after `--`; keep one")
    build_pruner(args.pruner)
    return space


def check_with_cli(
    configs: list[str], extra: list[str], space: list[Param]
) -> tuple[dict[str, Any], list[str]]:
    """Run the CLI's own parser (``--print_config``, no training) on the command and its trials.

    Both ends of every range and every choice are tried, so an unknown key or a value the CLI
    refuses stops the search before any trial runs. Returns the command's resolved config (the
    config's own values of the searched keys) and its DataModule's ``resumable_options``.

    Raises:
        UsageError: the CLI's message, or why the config cannot be searched (no validation).
    """
    probes = max([2, *(len(p.probe_values()) for p in space)])
    values: list[dict[str, Any]] = [{}] + [
        {p.key: p.probe_values()[min(i, len(p.probe_values()) - 1)] for p in space} for i in range(probes)
    ]
    by_key = {p.key: p for p in space}
    argvs = [cli_command(configs, *extra, *(by_key[k].override(x) for k, x in v.items()))[3:] for v in values]
    results = print_configs(argvs)
    for probe, parsed in zip(values, results, strict=False):
        if parsed.code != 0:
            said = parsed.message()
            named = [
                f"{k}={format_value(v)}"
                for k, v in probe.items()
                if re.search(rf"\b{k.rsplit('.', 1)[-1]}\b", said)
            ]
            raise UsageError(f"the CLI refused {', '.join(named) or 'the command line'}: {said}")
        config = parsed.config or {}
        data, trainer = (config.get("data") or {}).get("init_args") or {}, config.get("trainer") or {}
        if data.get("val_size") == 0 or trainer.get("limit_val_batches") in (0, 0.0):
            searched = [
                f" (from --space {k}={format_value(v)})" for k, v in probe.items() if k.endswith("val_size")
            ]
            raise UsageError(
                f"{'val_size=0' if data.get('val_size') == 0 else 'limit_val_batches=0'}{''.join(searched[:1])}: "
                "a search needs validation to score its trials; keep a validation split for the search"
            )
    return results[0].config or {}, results[0].resumable


def _enqueue_baseline(study: Any, config: dict[str, Any], space: list[Param]) -> None:
    """Make the config's own values the study's next trial (once per study), if they are in the space."""
    params, outside = baseline_params(config, space)
    if outside:
        print(
            f"info: --baseline: the config's own values are outside the space ({', '.join(outside)})",
            flush=True,
        )
    elif not any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(params, user_attrs={"baseline": True})


def _optimize(study: Any, search: Any, args: argparse.Namespace, command: str) -> None:
    """Run trials with ``Study.optimize`` until the study has ``--trials`` counted trials."""
    from optuna.study import MaxTrialsCallback

    from src.tools.search.report import progress_line, write_best_config, write_tables
    from src.tools.search.study import COUNTED, counted, fail_dead_workers, frozen, mask, retry
    from src.tools.search.trial import TrialFailed

    dead = fail_dead_workers(study)
    if dead:
        print(f"trials {dead} were left running by a search that stopped: marked FAIL, run again", flush=True)
    print(f"study {search.study_name!r} ({mask(search.url)}): {len(counted(study))} of {search.budget} trials counted; "
          f"{search.metric} {study.direction.name.lower()}; trials in {search.folder(0).parent}", flush=True)  # fmt: skip

    def after_trial(study: Any, trial: Any) -> None:
        fail_dead_workers(study)
        write_tables(study, search, command)
        write_best_config(study, search)
        if trial.state.name != "FAIL" or not trial.user_attrs.get("note", "").startswith("not run"):
            print(progress_line(study, search, trial), flush=True)
        if search.children.signum is not None:
            study.stop()

    started = time.monotonic()
    search.children.check("interrupted: no trial was started")
    try:
        if len(counted(study)) < search.budget:
            study.optimize(search, timeout=args.timeout, catch=(TrialFailed,),
                           callbacks=[MaxTrialsCallback(search.budget, states=COUNTED), after_trial])  # fmt: skip
    except Interrupted:
        retry(study, frozen(study, search.current))  # the stopped trial, to run again
        write_tables(study, search, command)
        raise
    except UsageError:
        write_tables(study, search, command)
        raise
    search.children.check(f"interrupted after trial {search.current}; the same command resumes the search")
    if search.stop_reason:
        raise RunFailure(search.stop_reason)
    if args.timeout is not None and time.monotonic() - started > args.timeout:
        print(f"--timeout {args.timeout:g} s reached: no new trial", flush=True)


def _finish(study: Any, search: Any, args: argparse.Namespace, command: str) -> int:
    """Tables, best config and plots; then the final step (``--final_seeds``)."""
    from optuna.trial import TrialState

    from src.tools.search.report import write_best_config, write_plots, write_tables

    if args.final_seeds > 0:
        _wait_for_other_workers(study, search)
    write_tables(study, search, command)
    best_config = write_best_config(study, search)
    for line in write_plots(study, search):
        print(line, flush=True)
    written = [
        f
        for f in ("trials.md", "trials.csv", "best_config.yaml", "history.png", "importance.png")
        if (search.output / f).is_file()
    ]
    print(f"wrote {', '.join(written)} in {search.output}", flush=True)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RunFailure("no trial completed; see trials.md and the trials' trial.log")
    best = study.best_trial
    print(f"best: trial {best.number}, {search.metric}={best.value:.4f}, {best.params}", flush=True)
    if best_config is None:
        print(f"info: trial {best.number} ran on {best.user_attrs['worker']['host']}: its run folder "
              f"{best.user_attrs.get('run_dir')} and best_config.yaml are there", flush=True)  # fmt: skip
        return 0
    print(f"best config: {best_config}", flush=True)
    if args.final_seeds > 0:
        _final_step(search, best_config, best.number, args.final_seeds)
    return 0


def _wait_for_other_workers(study: Any, search: Any, poll_s: float = 15.0) -> None:
    """Before the final step: let other workers' trials finish (or be failed, if their worker died)."""
    from src.tools.search.study import fail_dead_workers

    told = False
    while True:
        fail_dead_workers(study)
        running = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        if not running:
            return
        if not told:
            print(f"waiting for trials {running} of other workers before the final step", flush=True)
            told = True
        time.sleep(poll_s)
        search.children.check("interrupted before the final step; the same command resumes it")


def _final_step(search: Any, best_config: Path, number: int, seeds: int) -> None:
    """Re-train the best config over ``seeds`` seeds with ``src.tools.ablate`` (fit + test), in
    ``OUTPUT/final/trial_NNNN``: run again, it resumes its runs; one worker per output folder runs it."""
    from src.tools.ablate import sweep

    folder = search.output / "final" / f"trial_{number:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "final.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another worker runs the final step; skipped here", flush=True)
            return
        results = sweep([str(best_config)], [], seeds, folder, [], 0.8, folder / "runs", search.children)
    accs = [r.test_acc for r in results]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"final: trial {number}'s config re-trained over {seeds} seeds: test_acc "
          f"{statistics.mean(accs):.4f} ± {std:.4f} ({folder / 'summary.md'})", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
