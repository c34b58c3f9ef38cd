"""Tiny trained checkpoints of every config, for tests/test_export.py and tests/test_serve.py.

Each config is fitted once per test session (on tiny data, 2 epochs, as a user runs the CLI) into
the ``runs_root`` folder; later calls, from any pytest-xdist worker, reuse the checkpoint.
:func:`held_checkpoint` is an MNIST-1D one with a DataModule whose reading of an input can be held
(:class:`HeldSignals`), to see what the server does meanwhile.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from src.data.mnist1d import MNIST1D
from tests.helpers.cli import ROOT, run_cli, run_module
from tests.helpers.data import tiny_fashion_dir, write_tiny_ag_news

CONFIG_NAMES = ("mnist1d_resnet_bn", "mnist1d_resconv_bn", "fashion_mnist_mlp_bn", "ag_news_cnn_bn")


def _data_args(name: str, root: Path) -> list[str]:
    """CLI flags that point a config at tiny local data under ``root``."""
    cache = f"--data.init_args.cache_dir={root / 'cache' / name}"
    if name.startswith("mnist1d"):
        return [
            cache,
            "--data.init_args.num_samples=600",
            "--data.init_args.val_size=60",
            "--data.init_args.batch_size=32",
        ]
    if name.startswith("fashion"):
        return [
            f"--data.init_args.data_dir={tiny_fashion_dir(root, n_train=80, n_test=24)}",
            cache,
            f"--data.init_args.hf_cache_dir={root / 'hf'}",
            "--data.init_args.val_size=16",
            "--data.init_args.batch_size=16",
        ]
    files = (
        write_tiny_ag_news(root / "ag_news")
        if not (root / "ag_news").is_dir()
        else {s: str(root / "ag_news" / f"{s}.parquet") for s in ("train", "test")}
    )
    return [
        f"--data.init_args.data_files={{train: {files['train']}, test: {files['test']}}}",
        cache,
        "--data.init_args.batch_size=16",
        "--data.init_args.max_vocab=200",
        "--data.init_args.max_length=30",
    ]


def tiny_checkpoint(name: str, root: Path) -> Path:
    """The ``last.ckpt`` of a 2-epoch fit of ``configs/<name>.yaml`` on tiny data (fitted on first use)."""
    logs = root / "logs"
    with FileLock(root / f"{name}.lock"):  # another worker may be fitting it now
        found = sorted((logs / name).rglob("last.ckpt"))
        if not found:
            _fit(name, root, logs)
    return next((logs / name).rglob("last.ckpt"))


def _fit(name: str, root: Path, logs: Path) -> None:
    run_cli(
        "fit",
        "--config",
        str(ROOT / "configs" / f"{name}.yaml"),
        "--seed_everything=3",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
        f"--trainer.logger.init_args.save_dir={logs}",
        *_data_args(name, root),
        cwd=root,
    )


def cli_predictions(ckpt: Path, workdir: Path, *extra: str) -> list[dict[str, object]]:
    """Rows of ``predictions.csv`` from ``python -m src.cli predict --ckpt_path CKPT`` (run in ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_cli(
        "predict",
        "--ckpt_path",
        str(ckpt),
        "--trainer.callbacks.print_limit=0",
        f"--trainer.callbacks.output={workdir / 'predictions.csv'}",
        "--trainer.enable_progress_bar=false",
        *extra,
        cwd=workdir,
    )
    return read_predictions(workdir / "predictions.csv")


def tiny_predictions(name: str, root: Path) -> tuple[Path, str]:
    """``predictions.csv`` of ``python -m src.cli predict --ckpt_path <tiny checkpoint of name>`` (on
    its test split, its run under ``root/predicted/<name>``) and the command's stderr; run on first use
    in the session."""
    folder = root / "predicted" / name
    with FileLock(root / f"{name}.predict.lock"):
        if not (folder / "stderr.txt").is_file():
            ckpt = tiny_checkpoint(name, root)
            save_dir = f"--trainer.logger.init_args.save_dir={folder}"
            proc = run_cli("predict", "--ckpt_path", str(ckpt), save_dir, cwd=root)
            (folder / "stderr.txt").write_text(proc.stderr, encoding="utf-8")
    (path,) = folder.rglob("predictions.csv")
    return path, (folder / "stderr.txt").read_text(encoding="utf-8")


def read_predictions(path: Path) -> list[dict[str, object]]:
    """The rows of a ``predictions.csv``: predicted class name, probabilities by class (and the text)."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        {
            "predicted": row["predicted_name"],
            "probabilities": {k[2:]: float(v) for k, v in row.items() if k.startswith("p_")},
            **({"text": row["text"]} if "text" in row else {}),
        }
        for row in rows
    ]


HOLD = "hold until "
FAULT = "fault"


class HeldSignals(MNIST1D):
    """MNIST-1D whose raw input ``"hold until <path>"`` is read only once ``<path>`` exists (an all-zero
    signal then); while it waits, ``<path>.waiting`` exists. The input ``"fault"`` raises an error no
    DataModule should (a bug). Other inputs are read as MNIST1D reads them."""

    def parse_raw_input(self, value: Any) -> np.ndarray:
        if value == FAULT:
            raise ZeroDivisionError("a bug in parse_raw_input")
        if isinstance(value, str) and value.startswith(HOLD):
            release = Path(value[len(HOLD) :])
            release.with_name(release.name + ".waiting").touch()
            deadline = time.monotonic() + 120
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return np.zeros(self.input_size, dtype=np.float32)
        return super().parse_raw_input(value)


def held_checkpoint(root: Path, name: str = "mnist1d_resnet_bn") -> Path:
    """The tiny checkpoint of MNIST-1D config ``name`` with :class:`HeldSignals` as its DataModule class."""
    path = root / "held" / name / "last.ckpt"
    with FileLock(root / "held.lock"):
        if not path.is_file():
            ckpt = torch.load(tiny_checkpoint(name, root), weights_only=True)
            ckpt["datamodule_hyper_parameters"]["_class_path"] = f"{__name__}.{HeldSignals.__qualname__}"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ckpt, path)
    return path


__all__ = [
    "CONFIG_NAMES",
    "FAULT",
    "HOLD",
    "cli_predictions",
    "held_checkpoint",
    "read_predictions",
    "run_module",
    "tiny_checkpoint",
    "tiny_predictions",
]
