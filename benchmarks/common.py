"""Helpers shared by the benchmark scripts: run the real CLI in-process and collect figures."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch


def fit_and_test(
    config: str, overrides: list[str], seed: int, save_dir: str = "lightning_logs/benchmarks"
) -> dict[str, Any]:
    """Train ``config`` with ``overrides`` through ``python -m src.cli fit`` (in-process), then test
    the best checkpoint; return test accuracy/F1, best validation accuracy, epochs and wall time."""
    from src.cli import main

    args = [
        "fit",
        "--config",
        config,
        f"--seed_everything={seed}",
        "--test_after_fit=true",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    start = time.perf_counter()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the script's own flags are not the CLI's
    try:
        cli = main(args)
    finally:
        sys.argv = argv
    wall = time.perf_counter() - start
    metrics = {
        k: float(v) for k, v in cli.trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    return {
        "seed": seed,
        "test_acc": metrics.get("test_acc", float("nan")),
        "test_f1": metrics.get("test_f1", float("nan")),
        "best_val_acc": _best_score(cli.trainer),
        "epochs": cli.trainer.current_epoch,
        "wall_s": wall,
        "log_dir": cli.trainer.log_dir,
    }


def _best_score(trainer: Any) -> float:
    score = getattr(trainer.checkpoint_callback, "best_model_score", None)
    return float(score) if score is not None else float("nan")


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
