"""``python -m src.tools.search``: the command line and the checks made before anything is written."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from src.runtime.errors import UsageError, exit_on_error
from src.runtime.startup import fast_exit
from src.tools.child_run import Children, cli_command, print_configs
from src.tools.search.space import Param, build_pruner, format_value, lookup, parse_space

SPACE_HELP = """\
search space (repeat --space for each setting; KEY is any CLI key, without the leading --):
  KEY=float(LOW,HIGH)        uniform float in [LOW, HIGH]; float(LOW,HIGH,log) log-uniform (LOW > 0)
  KEY=int(LOW,HIGH)          integer in [LOW, HIGH]; int(LOW,HIGH,log) log-uniform (LOW >= 1)
  KEY=choice(A,B,...)        one of the values as written on the command line; commas inside
                             brackets stay in one value: choice([512,256],[1024,512])
  e.g. --space 'model.init_args.lr=float(1e-4,1e-1,log)' (the optimiser's lr, the one-cycle peak)
       --space 'model.init_args.bn_position=choice(before_activation,after_activation)'
pruners (--pruner), judged on the metric after each validation epoch: median, halving, hyperband,
  threshold(lower=0.5), none; Optuna's arguments in brackets: 'median(n_warmup_steps=4)'.
Everything after `--` goes to every trial's command line (--trainer.max_epochs=5, ...).
Exit status: 0 when the study has a complete trial, 1 when none completed or --max_failures trials
failed in a row, 2 for bad input (nothing written), 130/143 when interrupted (the same command resumes).
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
    add("--direction", choices=("maximize", "minimize"), help="default: minimize for *loss, else maximize")
    add("--pruner", default="median", help="median (default), halving, hyperband, threshold(...) or none")
    add("--sampler", choices=("tpe", "random"), default="tpe", help="default: tpe")
    add("--startup_trials", type=int, default=10, help="random trials before TPE models (default 10)")
    add("--seed", type=int, default=None, help="sampler seed (offset by the trials already in the study)")
    add("--max_failures", type=int, default=3, help="stop after this many failed trials in a row (0: never)")
    add("--baseline", action="store_true", help="first trial: the config's own values (if inside the space)")
    add("--check", action="store_true", help="only check the space against the CLI; print a trial's command")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, unknown = build_parser().parse_known_args(argv[:cut])
    with exit_on_error(), Children() as children:
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r}; overrides for the trials go after `--`")
        extra, space = argv[cut + 1 :], _check_args(args, argv[cut + 1 :])
        try:
            import optuna
        except ImportError:
            raise UsageError("the search needs Optuna: pip install -e '.[search]'") from None
        from src.tools.search.run import Search, run
        from src.tools.search.study import mask

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own line per trial
        # Heartbeat and retry are marked experimental; pyproject pins the Optuna they work with.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        print(f"checking {len(space)} search settings against the CLI ...", flush=True)
        base, resumable = check_with_cli(args.config, extra, space)
        children.check("interrupted: nothing was started")
        search = Search(args, extra, space, base, children)
        if args.check:
            example = search.command({p: p.probe_values()[0] for p in space}, 0)
            print(f"ok: the CLI accepts every probe; a trial runs:\n  {shlex.join(['python', *example[1:]])}")
            return 0
        return run(search, resumable, mask(shlex.join(["python", "-m", "src.tools.search", *argv])))


def _check_args(args: argparse.Namespace, extra: list[str]) -> list[Param]:
    """The command line's own checks; fills in the defaults that depend on other options."""
    if args.trials < 1:
        raise UsageError("--trials must be >= 1")
    for c in args.config:
        if not Path(c).is_file():
            raise UsageError(f"--config {c}: no such file")
    space = [parse_space(s) for s in args.space]
    keys = [p.key for p in space]
    fixed = {f.split("=", 1)[0].removeprefix("--") for f in extra}
    for key in keys:
        if keys.count(key) > 1:
            raise UsageError(f"a --space key is given twice: {key}")
        if key in fixed:
            raise UsageError(f"--{key} is both searched (--space) and fixed after `--`; keep one")
    build_pruner(args.pruner)
    args.study = args.study or Path(args.config[0]).stem
    args.output = (args.output or Path("lightning_logs/search") / args.study).resolve()
    args.storage = args.storage or f"sqlite:///{args.output / 'study.db'}"
    args.direction = args.direction or ("minimize" if args.metric.endswith("loss") else "maximize")
    return space


def check_with_cli(
    configs: list[str], extra: list[str], space: list[Param]
) -> tuple[dict[str, Any], list[str]]:
    """Run the CLI's own parser (``--print_config``, no training) on the command and on its trials with
    both ends of every range and every choice; the command's resolved config and its DataModule's
    ``resumable_options``, or a :class:`UsageError` with the CLI's message."""
    n = max([2, *(len(p.probe_values()) for p in space)])
    probes = [{}] + [
        {p: p.probe_values()[min(i, len(p.probe_values()) - 1)] for p in space} for i in range(n)
    ]
    results = print_configs(
        [cli_command(configs, *extra, *(p.override(v) for p, v in probe.items()))[3:] for probe in probes]
    )
    for probe, parsed in zip(probes, results, strict=False):
        shown = {p.key: f"{p.key}={format_value(v)}" for p, v in probe.items()}
        if parsed.code != 0:
            said = parsed.message()
            named = [s for k, s in shown.items() if re.search(rf"\b{k.rsplit('.', 1)[-1]}\b", said)]
            raise UsageError(f"the CLI refused {', '.join(named) or 'the command line'}: {said}")
        for key in ("data.init_args.val_size", "trainer.limit_val_batches"):
            if lookup(parsed.config, key) == 0:
                searched = f" (from --space {shown[key]})" if key in shown else ""
                raise UsageError(
                    f"{key.rsplit('.', 1)[-1]}=0{searched}: a search needs validation to score its trials; "
                    "keep a validation split"
                )
    return results[0].config or {}, results[0].resumable


if __name__ == "__main__":
    with fast_exit():
        sys.exit(main())
