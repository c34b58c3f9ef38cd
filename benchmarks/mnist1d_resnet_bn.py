"""MNIST-1D × residual-BN: test accuracy with and without batch norm over several seeds.

    python -m benchmarks.mnist1d_resnet_bn            # 3 seeds, BN on and off
    python -m benchmarks.mnist1d_resnet_bn --seeds 1 -- --trainer.max_epochs=20

Trains from configs/mnist1d_resnet_bn.yaml through the real CLI, tests the best checkpoint, and
prints test accuracy (mean ± std over seeds), the wall time and the CPU time of every run.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import fit_and_test, mean_std

VARIANTS = {"BN on": ["--model.init_args.batch_norm=true"], "BN off": ["--model.init_args.batch_norm=false"]}


def bn_on_off(config: str, title: str, save_dir: str, doc: str | None = None) -> None:
    """Parse the command line, train ``config`` with BN on and off over the seeds, print the table."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)"
    )
    parser.add_argument("extra", nargs="*", help="extra CLI overrides for every run (after --)")
    args = parser.parse_args()
    if args.seeds < 1 or args.threads < 1:
        parser.error("--seeds and --threads must be at least 1")
    torch.set_num_threads(args.threads)

    results: dict[str, list[dict]] = {}
    for name, overrides in VARIANTS.items():
        for seed in range(args.seeds):
            cpu = time.process_time()
            r = fit_and_test(config, [*overrides, *args.extra], seed, save_dir=save_dir)
            # CPU time of this process (torch runs on --threads threads): on a shared machine it is
            # the honest measure of training cost, where wall time also counts other users' load.
            r["cpu_s"] = time.process_time() - cpu
            results.setdefault(name, []).append(r)
            print(
                f"{name:7s} seed {seed}: test_acc {r['test_acc']:.4f}  best val_acc {r['best_val_acc']:.4f}  "
                f"epochs {r['epochs']:3d}  wall {r['wall_s']:.1f}s  CPU {r['cpu_s']:.1f}s",
                flush=True,
            )

    print(f"\n{title} ({config}), {args.seeds} seeds, {args.threads} torch thread(s)")
    print(
        "| variant | test acc (mean ± std) | test macro-F1 | test acc per seed | wall time per run (s) | CPU time per run (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        cpus = ", ".join(f"{r['cpu_s']:.1f}" for r in runs)
        accs = ", ".join(f"{r['test_acc']:.4f}" for r in runs)
        print(
            f"| {name} | {mean_std([r['test_acc'] for r in runs])} | {mean_std([r['test_f1'] for r in runs])} | "
            f"{accs} | {walls} | {cpus} |"
        )


def main() -> None:
    bn_on_off(
        "configs/mnist1d_resnet_bn.yaml", "MNIST-1D residual-BN", "lightning_logs/bench_mnist1d", __doc__
    )


if __name__ == "__main__":
    main()
