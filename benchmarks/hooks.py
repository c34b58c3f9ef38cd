"""Where a run's time goes besides training: a pair's fit under Lightning's ``SimpleProfiler`` (the
CLI's ``--trainer.profiler``), each callback hook and checkpoint save summed over the run, in ms per
training epoch.

    python -m benchmarks.hooks --pair mnist1d_resnet_bn --epochs 25 [-- CLI overrides]
    python -m benchmarks.hooks --config configs/my_pair.yaml --epochs 5   # any config, a pair of your own

The fit is ``python -m src.cli fit`` in a subprocess, as in :mod:`benchmarks.runner`, without the
test; Lightning's profiler writes what it timed to a JSON file (:class:`HookTimes`). Rows under
``--min_ms`` are summed into one (or left out, for the hooks that run less than once an epoch). The
training epoch's own time (``run_training_epoch``) is the scale: a hook at 10 % of it costs a tenth
of an epoch.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from lightning.pytorch.profilers import SimpleProfiler
from lightning.pytorch.utilities import rank_zero_only

from benchmarks.results import load_average
from benchmarks.runner import PAIRS, ROOT, local_data, run_command

# Lightning names a callback's hook "[Callback]Name{state key}.hook": the state key is dropped.
_STATE = re.compile(r"\{.*\}(?=\.)")


class HookTimes(SimpleProfiler):
    """Lightning's ``SimpleProfiler`` writing every timed action's durations to ``output`` (JSON)
    instead of printing its table."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output

    @rank_zero_only
    def describe(self) -> None:
        Path(self.output).write_text(json.dumps(self.recorded_durations))


def per_epoch(durations: dict[str, list[float]]) -> tuple[int, float, dict[str, float], dict[str, float]]:
    """The epochs trained, a training epoch's mean ms, each callback hook's and ``save_checkpoint``'s
    ms per epoch where it runs at least once an epoch, and the total ms of those that run less often
    (``setup``, ``on_fit_start``, ...); the callbacks of one class and hook are summed."""
    epochs = len(durations.get("run_training_epoch", [])) or 1
    epoch_ms = 1000 * sum(durations.get("run_training_epoch", [0.0])) / epochs
    calls: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for action, times in durations.items():
        if action.startswith("[Callback]") or action == "save_checkpoint":
            name = _STATE.sub("", action.removeprefix("[Callback]"))
            calls[name] += len(times)
            total[name] += 1000 * sum(times)
    recurring = {k: ms / epochs for k, ms in total.items() if calls[k] >= epochs}
    return epochs, epoch_ms, recurring, {k: ms for k, ms in total.items() if calls[k] < epochs}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hooks",
        description=__doc__.split("\n\n")[0],
        epilog="Everything after `--` goes to the fit's command line (python -m src.cli fit ...).",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--pair", choices=sorted(PAIRS), help="a shipped pair, its data local (default mnist1d_resnet_bn)"
    )
    which.add_argument("--config", type=Path, help="any config instead, e.g. a pair of your own")
    parser.add_argument("--epochs", type=int, default=25, help="max_epochs of the fit (default 25)")
    parser.add_argument("--min_ms", type=float, default=0.2, help="rows below this are summed (default 0.2)")
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1 :]
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.config is not None and not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    config = str(args.config.resolve()) if args.config else PAIRS[args.pair or "mnist1d_resnet_bn"].config
    name = args.config.stem if args.config else args.pair or "mnist1d_resnet_bn"
    print(f"command: python -m benchmarks.hooks {shlex.join(argv)}")
    print(f"load average at the start: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench_hooks_") as tmp:
        output = Path(tmp, "hooks.json")
        flags = [
            "fit", "--config", str(ROOT / config), *local_data(config), f"--trainer.max_epochs={args.epochs}",
            "--trainer.enable_progress_bar=false", "--test_after_fit=false",
            f"--trainer.logger.init_args.save_dir={tmp}", "--trainer.profiler=benchmarks.hooks.HookTimes",
            f"--trainer.profiler.init_args.output={output}", *extra,
        ]  # fmt: skip
        done = run_command(flags)
        if done["returncode"] != 0 or not output.is_file():
            print(done["output"][-3000:], file=sys.stderr)
            print(f"error: the fit failed (exit {done['returncode']}); its output is above", file=sys.stderr)
            return done["returncode"] or 1
        epochs, epoch_ms, recurring, once = per_epoch(json.loads(output.read_text()))
    print(f"load average at the end: {load_average()}")
    print(f"\n{name}: {epochs} epochs, a training epoch {epoch_ms:.1f} ms (run_training_epoch)")
    print("Nested rows overlap: `save_checkpoint` runs inside the checkpoint callbacks' hooks, and the")
    print("`on_save_checkpoint` hooks inside it.\n")
    print("| callback hook (every epoch) | ms per epoch | % of an epoch |\n|---|---|---|")
    shown = sorted(((ms, name) for name, ms in recurring.items() if ms >= args.min_ms), reverse=True)
    rest = sum(recurring.values()) - sum(ms for ms, _ in shown)
    for ms, name in [*shown, (rest, f"the other {len(recurring) - len(shown)}")]:
        print(f"| {name} | {ms:.2f} | {100 * ms / epoch_ms:.1f} |")
    print("\n| callback hook (once or a few times a run) | ms in all |\n|---|---|")
    for ms, name in sorted(((ms, name) for name, ms in once.items() if ms >= args.min_ms), reverse=True):
        print(f"| {name} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
