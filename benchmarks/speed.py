"""Speed of the project's training loop against a hand-written loop and the seeds' loops.

    python -m benchmarks.speed                                   # every pair, 1 torch thread
    python -m benchmarks.speed --pairs mnist1d_resnet_bn --threads 2 --compile
    python -m benchmarks.speed --compare-threads --repeats 4     # torch threads 1 vs 2

For each dataset/model pair (one config in ``configs/``; local data under ``$BN_DATA_DIR``,
default ``../shared/data``) it prints:

- epoch wall time, CPU time and training samples/s of (a) the project through the Trainer with the
  config as a user runs it (``python -m src.cli fit --config ...``: progress bar, validation,
  checkpoints, TensorBoard, LR monitor, activation statistics, early stopping; the bar is drawn
  to /dev/null so the tables stay readable; the test after fit is left out) and (b) a
  hand-written PyTorch loop over the same network, tensors, batch size, optimiser,
  schedule, augmentation, weight averaging and mixup (where the config has them) and per-epoch
  validation pass. At the config's batch size the figures are
  the median epoch of ``--full-repeats`` full-length runs of each (alternating, same process); at
  ``--batch-sizes`` (32 and 100) the median epoch of short runs;
- time to a target test accuracy, epochs and final test accuracy of those full runs of (a) and (b),
  and of (c) the seed's loop: a ``DataLoader`` over a per-sample ``Dataset``, batch 32, the seed's
  optimiser, ``loss.item()`` every step, same network. Test accuracy is measured after every epoch
  in all three; that evaluation is not counted in the times. (a) is timed from the CLI call (a
  user waits for parsing, building and the sanity check too: the "startup" column); (b) and (c)
  from their first step, their model and data already built.

CPU time (``time.process_time``, all threads of the process) is printed beside wall time: on a
shared machine it is less sensitive to other jobs' load.

Goals (issue 5): (a)/(b) <= 1.10 per epoch at the config's batch size, and (a) reaches the target
at least 5x sooner than (c), with an equal or better final accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset

from src.models.bn_cnn import mixup_step
from src.models.classifier import _accepts_unset

# Local copies of the Hub datasets (parquet), so the benchmark runs offline.
DATA_DIR = os.environ.get("BN_DATA_DIR", "../shared/data")


@dataclass
class Pair:
    """One dataset/model pair and its seed's training loop."""

    config: str
    seed_optimizer: Any  # callable(params) -> optimizer, as in the seed notebook
    seed_epochs: int
    target: float  # test accuracy both the project and the seed's loop are timed to
    seed_batch_size: int = 32
    note: str = ""
    overrides: list[str] = field(default_factory=list)


PAIRS = {
    # seed 003: SGD lr 0.05, momentum 0.9 (its loader used batch 200; the seed loop uses 32)
    "mnist1d_resnet_bn": Pair(
        config="configs/mnist1d_resnet_bn.yaml",
        seed_optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        seed_epochs=60,
        target=0.60,  # about the best the seed loop reaches (0.58-0.62 in 60 epochs)
        note="seed 003 network, SGD(0.05, momentum 0.9)",
    ),
    "mnist1d_resconv_bn": Pair(
        config="configs/mnist1d_resconv_bn.yaml",
        seed_optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        seed_epochs=60,
        target=0.98,  # the seed loop on this network: 0.989 final, 0.994 best in 60 epochs
        note="seed 003 loop (SGD 0.05, momentum 0.9) on the conv network",
    ),
    # seed 004: SGD lr 0.1, batch 32, 10 epochs (its test accuracy: 0.83 on a 6,000-image subset)
    "fashion_mnist_mlp_bn": Pair(
        config="configs/fashion_mnist_mlp_bn.yaml",
        seed_optimizer=partial(torch.optim.SGD, lr=0.1),
        seed_epochs=10,
        target=0.85,
        note="seed 004 loop: SGD(0.1), 10 epochs, full training split",
        overrides=[f"--data.init_args.data_dir={DATA_DIR}/fashion_mnist"],
    ),
    # seed 001: Adam lr 1e-3, 10 epochs (its loader used batch 64; the seed loop uses 32)
    "ag_news_cnn_bn": Pair(
        config="configs/ag_news_cnn_bn.yaml",
        seed_optimizer=partial(torch.optim.Adam, lr=1e-3),
        seed_epochs=10,
        target=0.70,  # the seed's own test figure: weighted F1 0.693
        note="seed 001 loop: Adam(1e-3), 10 epochs, no scheduler",
        overrides=[
            "--data.init_args.data_files="
            f"{{train: {DATA_DIR}/ag_news/train_first_10429_rows.parquet, test: {DATA_DIR}/ag_news/test.parquet}}"
        ],
    ),
}


# ---------------------------------------------------------------------------------------- helpers
def build(config: str, overrides: list[str]) -> Any:
    """Model, DataModule and Trainer from a config, exactly as ``python -m src.cli`` builds them."""
    from src.cli import main

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return main(["--config", config, *overrides], run=False)
    finally:
        sys.argv = argv


@torch.no_grad()
def accuracy(net: nn.Module, dm: Any, split: tuple[Tensor, ...], batch_size: int = 4096) -> float:
    was_training = net.training
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=split[0].device)
    for start in range(0, len(split[0]), batch_size):
        batch = dm.transform_batch(dm.collate(tuple(t[start : start + batch_size] for t in split)), False)
        correct += (net(batch[0]).argmax(-1) == batch[1]).sum()
    net.train(was_training)
    return int(correct) / len(split[0])


class Clock:
    """Wall time with the test evaluations taken out, and the first time a target was reached."""

    def __init__(self, target: float) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.excluded = 0.0
        self.cpu_excluded = 0.0
        self.target = target
        self.time_to_target: float | None = None
        self.train_start: float | None = None  # first training step (Trainer runs)
        self.epoch_ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time: less sensitive to other jobs' load
        self.accs: list[float] = []

    def now(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def epoch_end(self, evaluate: Any) -> None:
        self.epoch_ends.append(self.now())
        self.cpu_ends.append(time.process_time() - self.cpu_start - self.cpu_excluded)
        t0, c0 = time.perf_counter(), time.process_time()
        acc = evaluate()
        self.excluded += time.perf_counter() - t0
        self.cpu_excluded += time.process_time() - c0
        self.accs.append(acc)
        if self.time_to_target is None and acc >= self.target:
            self.time_to_target = self.epoch_ends[-1]

    def shift(self, seconds: float) -> None:
        self.epoch_ends = [t + seconds for t in self.epoch_ends]
        if self.train_start is not None:
            self.train_start += seconds
        if self.time_to_target is not None:
            self.time_to_target += seconds

    def epoch_times(self, cpu: bool = False) -> list[float]:
        ends = self.cpu_ends if cpu else self.epoch_ends
        return [b - a for a, b in zip(ends, ends[1:], strict=False)]


class EpochClock(Callback):
    """Times each epoch of a Trainer run (validation and checkpointing included) and, outside
    the timing, measures test accuracy after it."""

    def __init__(self, target: float = 0.0, evaluate: bool = True) -> None:
        self.clock = Clock(target)
        self.evaluate = evaluate

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.clock.train_start = self.clock.now()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        dm = trainer.datamodule
        self.clock.epoch_end(lambda: accuracy(pl_module, dm, dm.splits["test"]) if self.evaluate else 0.0)


def run_project(pair: Pair, extra: list[str], target: float, evaluate: bool, save_dir: str | None) -> Clock:
    """(a): ``python -m src.cli fit --config ...`` in this process, with an epoch clock added; the
    progress bar (on, as a user runs it) draws to /dev/null."""
    from src.cli import main

    args = [
        "fit",
        "--config",
        pair.config,
        "--test_after_fit=false",
        *([f"--trainer.logger.init_args.save_dir={save_dir}"] if save_dir else []),
        *pair.overrides,
        *extra,
    ]
    clock = {
        "class_path": "benchmarks.speed.EpochClock",
        "init_args": {"target": target, "evaluate": evaluate},
    }
    args.append(f"--trainer.callbacks+={json.dumps(clock)}")
    start = time.perf_counter()
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            cli = main(args)
    finally:
        sys.argv = argv
    clock = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "EpochClock").clock
    clock.shift(clock.start - start)  # count from the CLI call, as a user waits
    return clock


def run_hand_loop(
    pair: Pair,
    batch_size: int,
    epochs: int,
    target: float,
    evaluate: bool,
    schedule_epochs: int | None = None,
) -> Clock:
    """(b): the same network, tensors, batch size, optimiser, schedule, weight averaging, mixup and
    per-epoch validation, in a plain PyTorch loop. ``schedule_epochs``: length of a one-cycle schedule (the Trainer's
    ``max_epochs``) when the run stops earlier, as early stopping does."""
    cli = build(pair.config, [f"--data.init_args.batch_size={batch_size}", *pair.overrides])
    model, dm = cli.model, cli.datamodule
    torch.manual_seed(cli.config.get("seed_everything") or 0)
    dm.setup("fit")
    device = torch.device("cpu")
    train, val, test = (
        {k: tuple(t.to(device) for t in v) for k, v in dm.splits.items()}[s] for s in ("train", "val", "test")
    )
    net = model.net.to(device)
    optimizer = model.optimizer(net.parameters())
    # What the config's training adds to each step, done by hand too: weight averaging (EMA, as
    # Lightning's callback: every step, validation on the averaged copy) and feature mixup.
    averaging = next((c for c in cli.trainer.callbacks if isinstance(c, WeightAveraging)), None)
    averaged = (
        AveragedModel(net, use_buffers=averaging._use_buffers, **averaging._kwargs) if averaging else None
    )
    mixup_alpha = getattr(model, "mixup_alpha", 0.0)
    steps_per_epoch = math.ceil(len(train[0]) / batch_size)
    scheduler, per_step = None, False
    if model.lr_scheduler is not None:
        kwargs = {}
        if _accepts_unset(model.lr_scheduler, "total_steps"):
            kwargs, per_step = {"total_steps": (schedule_epochs or epochs) * steps_per_epoch}, True
        scheduler = model.lr_scheduler(optimizer, **kwargs)
    n = len(train[0])
    clock = Clock(target)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch), device=device)
        shuffled = tuple(t[perm] for t in train)
        for start in range(0, n, batch_size):
            batch = dm.transform_batch(
                dm.collate(tuple(t[start : start + batch_size] for t in shuffled)), True
            )
            if mixup_alpha > 0:
                loss = mixup_step(net, batch[0], batch[1], mixup_alpha, model.label_smoothing)[0]
            else:
                loss = F.cross_entropy(net(batch[0]), batch[1], label_smoothing=model.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if per_step:
                scheduler.step()
            if averaged is not None:
                averaged.update_parameters(net)
        # validation pass, as the Trainer runs it every epoch (loss and accuracy on the device)
        evaluated = averaged.module if averaged is not None else net
        evaluated.eval()
        with torch.no_grad():
            val_loss = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            for start in range(0, len(val[0]), dm.eval_batch_size):
                batch = dm.transform_batch(
                    dm.collate(tuple(t[start : start + dm.eval_batch_size] for t in val)), False
                )
                logits = evaluated(batch[0])
                val_loss += F.cross_entropy(logits, batch[1], reduction="sum")
                correct += (logits.argmax(-1) == batch[1]).sum()
        if scheduler is not None and not per_step:
            scheduler.step(float(val_loss) / len(val[0])) if isinstance(
                scheduler, ReduceLROnPlateau
            ) else scheduler.step()
        clock.epoch_end(lambda: accuracy(net, dm, test) if evaluate else 0.0)  # raw weights, as (a)
    return clock


class PerSample(Dataset):
    """A map-style dataset returning one sample at a time, as the seed notebooks build them."""

    def __init__(self, tensors: tuple[Tensor, ...]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return tuple(t[i] for t in self.tensors)


def run_seed_loop(pair: Pair, target: float) -> Clock:
    """(c): the seed's loop: DataLoader over a per-sample Dataset, batch 32, the seed's optimiser,
    ``loss.item()`` every step, no augmentation and no schedule; the same network architecture."""
    cli = build(pair.config, list(pair.overrides))
    model, dm = cli.model, cli.datamodule
    torch.manual_seed(cli.config.get("seed_everything") or 0)
    dm.setup("fit")
    net = model.net
    optimizer = pair.seed_optimizer(net.parameters())
    loader = DataLoader(PerSample(dm.splits["train"]), batch_size=pair.seed_batch_size, shuffle=True)
    clock = Clock(target)
    for _ in range(pair.seed_epochs):
        net.train()
        total = 0.0
        for batch in loader:
            batch = dm.transform_batch(dm.collate(tuple(batch)), False)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(batch[0]), batch[1])
            loss.backward()
            optimizer.step()
            total += loss.item()
        clock.epoch_end(lambda: accuracy(net, dm, dm.splits["test"]))
    return clock


# ---------------------------------------------------------------------------------------- report
def short_runs(
    pair: Pair, batch_size: int, epochs: int, repeats: int, save_dir: str, compile_model: bool
) -> dict:
    """Median epoch time of (a) and (b) over short runs (``epochs``, first dropped), alternating."""
    extra = [f"--data.init_args.batch_size={batch_size}", f"--trainer.max_epochs={epochs}"]
    if compile_model:
        extra.append("--model.init_args.compile_model=true")
    times: dict[str, list[float]] = {"a": [], "b": [], "a_cpu": [], "b_cpu": []}
    for _ in range(repeats):
        for key, clock in (
            ("a", run_project(pair, extra, 1.0, evaluate=False, save_dir=save_dir)),
            ("b", run_hand_loop(pair, batch_size, epochs, 1.0, evaluate=False)),
        ):
            times[key] += clock.epoch_times()[1:]
            times[f"{key}_cpu"] += clock.epoch_times(cpu=True)[1:]
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_ttt(clocks: list[Clock]) -> str:
    times = [c.time_to_target for c in clocks]
    if any(t is None for t in times):
        return f"not reached in {sum(t is None for t in times)}/{len(times)} runs"
    return f"{statistics.median(times):.1f}"


def median_ttt(clocks: list[Clock]) -> float | None:
    times = [c.time_to_target for c in clocks]
    return None if any(t is None for t in times) else statistics.median(times)


def report_pair(name: str, pair: Pair, args: argparse.Namespace, save_dir: str) -> None:
    cli = build(pair.config, pair.overrides)
    default_bs, max_epochs = cli.datamodule.batch_size, cli.trainer.max_epochs
    cli.datamodule.setup("fit")
    n_train = len(cli.datamodule.splits["train"][0])
    print(
        f"\n## {name} ({pair.config}): {n_train} training samples, {torch.get_num_threads()} torch thread(s), cpu"
    )

    # Full default runs, (a) and (b) alternating: epoch times and time to the target accuracy.
    a_runs, b_runs = [], []
    for _ in range(args.full_repeats):
        a = run_project(pair, [], pair.target, evaluate=True, save_dir=save_dir)
        b = run_hand_loop(
            pair, default_bs, len(a.accs), pair.target, evaluate=True, schedule_epochs=max_epochs
        )
        a_runs.append(a)
        b_runs.append(b)
    full = {
        key: statistics.median(t for c in runs for t in c.epoch_times(cpu=cpu))
        for key, runs, cpu in (
            ("a", a_runs, False),
            ("b", b_runs, False),
            ("a_cpu", a_runs, True),
            ("b_cpu", b_runs, True),
        )
    }
    print(
        "\nPer epoch (median over every epoch of the full runs; train + validation + the config's callbacks)"
    )
    print(
        "| batch | (a) project s/epoch | (b) hand loop s/epoch | a/b | (a) CPU s/epoch | (b) CPU s/epoch "
        "| a/b CPU | (a) samples/s | (b) samples/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")

    def row(label: str, r: dict[str, float], b_note: str = "") -> None:
        print(
            f"| {label} | {r['a']:.4f} | {r['b']:.4f}{b_note} | {r['a'] / r['b']:.3f} | {r['a_cpu']:.4f} | "
            f"{r['b_cpu']:.4f} | {r['a_cpu'] / r['b_cpu']:.3f} | {n_train / r['a']:,.0f} | {n_train / r['b']:,.0f} |",
            flush=True,
        )

    row(f"{default_bs} (default, full runs)", full)
    for bs in dict.fromkeys(args.batch_sizes):
        row(
            f"{bs} (first {args.epochs} epochs)",
            short_runs(pair, bs, args.epochs, args.repeats, save_dir, False),
        )
    if args.compile:
        r = short_runs(pair, default_bs, args.epochs, args.repeats, save_dir, compile_model=True)
        row(f"{default_bs}, compile_model=true (first {args.epochs} epochs)", r, " (eager)")

    c = run_seed_loop(pair, pair.target)
    print(
        f"\nTime to test accuracy {pair.target} (evaluation after every epoch, not counted); (c): {pair.note}"
    )
    print("| run | startup (s) | epochs | time to target (s) | total (s) | final test acc | best test acc |")
    print("|---|---|---|---|---|---|---|")
    rows = (
        ("(a) project, default config", a_runs),
        ("(b) hand loop, same settings", b_runs),
        (f"(c) seed loop, batch {pair.seed_batch_size}", [c]),
    )
    for label, clocks in rows:
        starts = [k.train_start or 0.0 for k in clocks]
        print(
            f"| {label} | {statistics.median(starts):.1f} | {statistics.median(len(k.accs) for k in clocks)} | "
            f"{fmt_ttt(clocks)} | "
            f"{statistics.median(k.epoch_ends[-1] for k in clocks):.1f} | "
            f"{statistics.median(k.accs[-1] for k in clocks):.4f} | {statistics.median(max(k.accs) for k in clocks):.4f} |"
        )
    ta, tc = median_ttt(a_runs), median_ttt([c])
    a_final = statistics.median(k.accs[-1] for k in a_runs)
    ratio = full["a"] / full["b"]
    print(
        f"Goal a/b <= 1.10 per epoch at batch {default_bs}: {ratio:.3f} -> {'met' if ratio <= 1.10 else 'NOT met'}"
    )
    if ta and tc:
        met = tc / ta >= 5 and a_final >= c.accs[-1]
        print(
            f"Goal (c)/(a) >= 5 in time to {pair.target} at equal or better final accuracy: {tc / ta:.1f}x "
            f"(final {a_final:.4f} vs {c.accs[-1]:.4f}) -> {'met' if met else 'NOT met'}",
            flush=True,
        )
    else:
        print(
            f"Goal (c)/(a) >= 5 in time to {pair.target}: target not reached by every run -> NOT met",
            flush=True,
        )


def compare_threads(pair: Pair, name: str, epochs: int, repeats: int, save_dir: str) -> None:
    """(a) short runs at the config's batch size with 1 and 2 torch threads, alternating."""
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for threads in times:
            os.environ["BN_NUM_THREADS"] = str(threads)
            extra = [f"--trainer.max_epochs={epochs}"]
            times[threads] += run_project(pair, extra, 1.0, evaluate=False, save_dir=save_dir).epoch_times()[
                1:
            ]
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"| {name} | {one:.4f} | {two:.4f} | {two / one:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BN_NUM_THREADS", 1)))
    parser.add_argument("--full-repeats", type=int, default=2, help="full default runs of (a) and of (b)")
    parser.add_argument("--repeats", type=int, default=2, help="short runs per extra batch size")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of a short run (the first is dropped)")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[32, 100])
    parser.add_argument("--compile", action="store_true", help="also time (a) with compile_model=true")
    parser.add_argument(
        "--compare-threads", action="store_true", help="only: (a) epoch time with 1 vs 2 torch threads"
    )
    args = parser.parse_args()
    if args.compare_threads:
        save_dir = tempfile.mkdtemp(prefix="bench_threads_")
        print(
            f"(a) s/epoch, config batch size, median of {args.repeats} x {args.epochs - 1} epochs per setting"
        )
        print("| pair | 1 thread | 2 threads | 2/1 |\n|---|---|---|---|")
        for name in args.pairs:
            compare_threads(PAIRS[name], name, args.epochs, args.repeats, save_dir)
        return
    os.environ["BN_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    save_dir = tempfile.mkdtemp(prefix="bench_speed_")
    for name in args.pairs:
        report_pair(name, PAIRS[name], args, save_dir)


if __name__ == "__main__":
    main()
