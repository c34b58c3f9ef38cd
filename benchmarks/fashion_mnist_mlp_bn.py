"""Fashion-MNIST × MLP-BN-dropout: test accuracy (BN on/off, seed's sizes) and Trainer-vs-plain-loop speed.

    python -m benchmarks.fashion_mnist_mlp_bn --data-dir ../shared/data/fashion_mnist
    python -m benchmarks.fashion_mnist_mlp_bn --skip-accuracy --repeats 5      # speed only
    python -m benchmarks.fashion_mnist_mlp_bn --skip-speed -- --trainer.max_epochs=5

Accuracy: trains configs/fashion_mnist_mlp_bn.yaml through the real CLI on the local parquet files,
tests the best checkpoint on the official 10,000-image test split, and prints test accuracy and
wall time for the default config, the same with ``batch_norm=false``, and with the seed's hidden
sizes ``[128, 64]`` (BN on and off), and with BN after the ReLU (the seed's second case).

Speed: one training epoch over the 55,000 training images through the Lightning Trainer (the
config's model, optimiser, scheduler, metrics and logger; validation switched off) against a plain
PyTorch loop over the same on-device tensors, model, optimiser, scheduler and batch size. The two
are measured in the same process, interleaved, ``--repeats`` times; the medians and the median of
the per-pair ratios are printed, by wall time and by CPU time (``time.process_time``: on a shared
machine the wall time also counts other jobs' load, the CPU time much less). ``--with-callbacks`` adds a third side: the Trainer with the
config's training-time callbacks (activation statistics every 50 steps, LR monitor, ...).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar

from benchmarks.common import fit_and_test, mean_std

CONFIG = "configs/fashion_mnist_mlp_bn.yaml"
VARIANTS = {
    "default": [],
    "bn_off": ["--model.init_args.batch_norm=false"],
    "bn_after": ["--model.init_args.bn_position=after_activation"],
    "seed_sizes": ["--model.init_args.hidden_sizes=[128, 64]"],
    "seed_sizes_bn_off": [
        "--model.init_args.hidden_sizes=[128, 64]",
        "--model.init_args.batch_norm=false",
    ],
}


class EpochTimer(Callback):
    """Wall and CPU time from the start to the end of each training epoch (hooks run on the main process)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu)


def build_from_config(data_dir: str, extra: list[str]) -> tuple[Any, Any, list[Callback]]:
    """The config's model, DataModule and training-time callbacks, built by the CLI without
    running anything (checkpointing, early stopping and the progress bar left out)."""
    from src.cli import main

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = main(["--config", CONFIG, f"--data.init_args.data_dir={data_dir}", *extra], run=False)
    finally:
        sys.argv = argv
    skip = (ProgressBar, ModelCheckpoint, EarlyStopping)
    callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, skip)]
    return cli.model, cli.datamodule, callbacks


def trainer_epoch(
    model: Any, datamodule: Any, log_dir: str, callbacks: list[Callback] = ()
) -> tuple[float, float, float]:
    """One training epoch through ``Trainer.fit``: (epoch wall time, whole fit() call wall time, epoch CPU time)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(log_dir, name="speed", default_hp_metric=False),
        callbacks=[timer, *copy.deepcopy(list(callbacks))],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return timer.times[0], time.perf_counter() - start, timer.cpu_times[0]


def plain_epoch(model: Any, datamodule: Any, seed: int) -> tuple[float, float]:
    """(wall time, CPU time) of one epoch of a hand-written loop: the same tensors, network, optimiser, scheduler, batch size
    and loss, with the per-epoch permutation, on-device normalisation, and loss/accuracy tracked on
    the device like the Trainer's metrics."""
    net = model.net
    net.train()
    optimizer = model.optimizer(net.parameters())
    x_all, y_all = datamodule.splits["train"]
    bs = datamodule.batch_size
    steps = -(-len(x_all) // bs)
    scheduler = model.lr_scheduler(optimizer, total_steps=steps) if model.lr_scheduler else None
    mean, std, smoothing = datamodule.mean, datamodule.std, model.label_smoothing
    start, cpu = time.perf_counter(), time.process_time()
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))
    x_all, y_all = x_all[perm], y_all[perm]
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    for i in range(0, len(x_all), bs):
        x = (x_all[i : i + bs].float() - mean) / std
        y = y_all[i : i + bs]
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
    float(loss_sum), int(correct)  # noqa: B018  (one sync at the end, as the Trainer's epoch-end logging)
    return time.perf_counter() - start, time.process_time() - cpu


def speed(data_dir: str, repeats: int, extra: list[str], with_callbacks: bool) -> None:
    model0, dm, callbacks = build_from_config(data_dir, extra)
    dm.setup("fit")
    print(
        f"\nSpeed: one epoch over {len(dm.splits['train'][0]):,} training images, batch {dm.batch_size}, "
        f"{torch.get_num_threads()} torch thread(s), {repeats} interleaved repeats",
        flush=True,
    )
    tr, fits, pl, cb = [], [], [], []
    tr_cpu, pl_cpu = [], []
    with tempfile.TemporaryDirectory() as log_dir:
        for r in range(repeats):
            # Fresh copies of the same initial model for every side; rotate which goes first.
            sides = ["trainer", "plain", *(["callbacks"] if with_callbacks else [])]
            for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
                model = copy.deepcopy(model0)
                if side == "trainer":
                    epoch_s, fit_s, cpu_s = trainer_epoch(model, dm, log_dir)
                    tr.append(epoch_s)
                    fits.append(fit_s)
                    tr_cpu.append(cpu_s)
                elif side == "callbacks":
                    cb.append(trainer_epoch(model, dm, log_dir, callbacks)[0])
                else:
                    wall_s, cpu_s = plain_epoch(model, dm, seed=r)
                    pl.append(wall_s)
                    pl_cpu.append(cpu_s)
            print(
                f"  repeat {r}: Trainer epoch {tr[-1]:.2f}s (whole fit() call {fits[-1]:.2f}s), "
                f"plain loop {pl[-1]:.2f}s, ratio {tr[-1] / pl[-1]:.3f}; CPU time Trainer {tr_cpu[-1]:.2f}s, "
                f"plain {pl_cpu[-1]:.2f}s, ratio {tr_cpu[-1] / pl_cpu[-1]:.3f}"
                + (f"; with the config's callbacks {cb[-1]:.2f}s, ratio {cb[-1] / pl[-1]:.3f}" if cb else ""),
                flush=True,
            )
    if cb:
        names = ", ".join(type(c).__name__ for c in callbacks)
        print(
            f"with the config's training callbacks ({names}): median epoch {statistics.median(cb):.2f}s, "
            f"ratio to plain (median of pairs) {statistics.median([c / p for c, p in zip(cb, pl, strict=True)]):.3f}"
        )
    ratios = [t / p for t, p in zip(tr, pl, strict=True)]
    print(
        f"median: Trainer epoch {statistics.median(tr):.2f}s, whole fit() {statistics.median(fits):.2f}s, "
        f"plain loop {statistics.median(pl):.2f}s; Trainer/plain ratio (median of pairs) "
        f"{statistics.median(ratios):.3f} (goal <= 1.10); whole fit()/plain "
        f"{statistics.median([f / p for f, p in zip(fits, pl, strict=True)]):.3f}"
    )
    cpu_ratios = [t / p for t, p in zip(tr_cpu, pl_cpu, strict=True)]
    print(
        f"median CPU time: Trainer epoch {statistics.median(tr_cpu):.2f}s, plain loop "
        f"{statistics.median(pl_cpu):.2f}s; Trainer/plain CPU-time ratio (median of pairs) "
        f"{statistics.median(cpu_ratios):.3f} (goal <= 1.10)"
    )


def accuracy(data_dir: str, seeds: int, variants: list[str], extra: list[str]) -> None:
    results: dict[str, list[dict]] = {}
    for name in variants:
        for seed in range(seeds):
            overrides = [f"--data.init_args.data_dir={data_dir}", *VARIANTS[name], *extra]
            r = fit_and_test(CONFIG, overrides, seed, save_dir="lightning_logs/bench_fashion_mnist")
            results.setdefault(name, []).append(r)
            print(
                f"{name:18s} seed {seed}: test_acc {r['test_acc']:.4f}  best val_acc {r['best_val_acc']:.4f}  "
                f"epochs {r['epochs']:3d}  wall {r['wall_s']:.1f}s",
                flush=True,
            )
    print(
        f"\nFashion-MNIST MLP-BN-dropout ({CONFIG}), {seeds} seed(s), {torch.get_num_threads()} torch thread(s)"
    )
    print("| variant | test acc | test macro-F1 | wall time per run (s) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        print(
            f"| {name} | {mean_std([r['test_acc'] for r in runs])} | "
            f"{mean_std([r['test_f1'] for r in runs])} | {walls} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", default="../shared/data/fashion_mnist", help="folder with the parquet files"
    )
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the speed comparison")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)"
    )
    parser.add_argument(
        "--with-callbacks",
        action="store_true",
        help="also time the Trainer with the config's training callbacks (activation statistics, LR monitor, ...)",
    )
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("extra", nargs="*", help="extra CLI overrides for every run (after --)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_speed:
        speed(args.data_dir, args.repeats, args.extra, args.with_callbacks)
    if not args.skip_accuracy:
        accuracy(args.data_dir, args.seeds, args.variants, args.extra)


if __name__ == "__main__":
    main()
