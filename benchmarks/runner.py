"""The benchmark runner: a config through the real command line, over variants × seeds.

    python -m benchmarks.runner --pair mnist1d_resnet_bn --seeds 2 -- --trainer.max_epochs=20

Each run is ``python -m src.cli fit --config <yaml> --test_after_fit=true`` in a subprocess, as a
user runs it, in a run folder of its own; its figures are read back from what the run wrote (the
TensorBoard events): test accuracy and macro-F1 of the tested checkpoint, best validation accuracy,
epochs trained, and the wall and CPU time of the whole command (the subprocess's user + system time,
from ``getrusage(RUSAGE_CHILDREN)``).

:data:`PAIRS` names each dataset/model pair once (config, local data, the notebooks' loop and a
target accuracy) for every benchmark script; :func:`build` builds a config's model, data and
trainer in this process exactly as the CLI does, without running it.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    """Local copies of the Hub datasets (parquet), so benchmarks never need the network:
    ``$BN_DATA_DIR``, default ``../shared/data`` beside the repository."""
    return Path(os.environ.get("BN_DATA_DIR") or ROOT.parent / "shared" / "data")


@dataclass
class Pair:
    """One dataset/model pair: its config, the notebooks' training loop for it, and a target accuracy."""

    config: str
    seed_optimizer: Any  # callable(params) -> optimiser: the notebook's, for loop (c)
    seed_epochs: int
    target: float  # test accuracy the loops are timed to
    note: str = ""
    speed_epochs: int = 6  # epochs of a speed.py measurement run (the first is dropped)
    extra_targets: list[float] = field(default_factory=list)
    # Flags pointing the config's data at the local copies, ``{data}`` the shared data folder (none
    # for generated data).
    local_data: tuple[str, ...] = ()


PAIRS = {
    "mnist1d_resnet_bn": Pair(
        config="configs/mnist1d_resnet_bn.yaml",
        seed_optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        seed_epochs=60,
        target=0.60,  # about the best the notebook's loop reaches (0.58-0.62 in 60 epochs)
        note="notebook loop: SGD(0.05, momentum 0.9), batch 32",
        speed_epochs=25,
        extra_targets=[0.80],
    ),
    "mnist1d_resconv_bn": Pair(
        config="configs/mnist1d_resconv_bn.yaml",
        seed_optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        seed_epochs=60,
        target=0.98,
        note="notebook loop (SGD 0.05, momentum 0.9, batch 32) on the conv network",
        speed_epochs=8,
    ),
    "fashion_mnist_mlp_bn": Pair(
        config="configs/fashion_mnist_mlp_bn.yaml",
        seed_optimizer=partial(torch.optim.SGD, lr=0.1),
        seed_epochs=10,
        target=0.85,
        note="notebook loop: SGD(0.1), batch 32",
        speed_epochs=5,
        extra_targets=[0.90],
        local_data=("--data.init_args.data_dir={data}/fashion_mnist",),
    ),
    "ag_news_cnn_bn": Pair(
        config="configs/ag_news_cnn_bn.yaml",
        seed_optimizer=partial(torch.optim.Adam, lr=1e-3),
        seed_epochs=10,
        target=0.70,  # the notebook's own test figure: weighted F1 0.693
        note="notebook loop: Adam(1e-3), batch 32, no schedule",
        speed_epochs=4,
        extra_targets=[0.85],
        local_data=(
            "--data.init_args.data_files={{train: {data}/ag_news/train_first_10429_rows.parquet, "
            "test: {data}/ag_news/test.parquet}}",
        ),
    ),
}


def data_class(config: str) -> str:
    """The short class name of a config's DataModule."""
    return yaml.safe_load((ROOT / config).read_text())["data"]["class_path"].rsplit(".", 1)[-1]


def local_data(config: str, data_dir: Path | str | None = None) -> list[str]:
    """Flags that point a pair's data at the local parquet copies (:attr:`Pair.local_data`)."""
    folder = Path(data_dir or default_data_dir()).resolve()
    flags = next((p.local_data for p in PAIRS.values() if p.config == config), ())
    return [flag.format(data=folder) for flag in flags]


def build(config: str, overrides: list[str] = (), data_dir: Path | str | None = None) -> Any:
    """The CLI object of ``--config <config> <overrides>``, built in this process without running
    (``src.cli.main(args, run=False)``): ``.model``, ``.datamodule``, ``.trainer``, ``.config``."""
    from src.cli import main

    argv, sys.argv = sys.argv, sys.argv[:1]  # the script's own flags are not the CLI's
    try:
        return main(["--config", str(ROOT / config), *local_data(config, data_dir), *overrides], run=False)
    finally:
        sys.argv = argv


def build_data(config: str, overrides: list[str] = ()) -> Any:
    """A config's DataModule as the CLI builds it (local data applied); ``fast_dev_run`` keeps the
    build from claiming a run folder."""
    return build(config, [*overrides, "--trainer.fast_dev_run=true"]).datamodule


# ---------------------------------------------------------------------------------------- one run
def env() -> dict[str, str]:
    """A subprocess's environment: this checkout importable, no Hub, one torch thread unless set."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "BN_NUM_THREADS": os.environ.get("BN_NUM_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def run_command(args: list[str], timeout: float | None = None, log: Path | None = None) -> dict[str, Any]:
    """Run ``python -m src.cli ARGS``; its exit status, wall time and CPU time (user + system of the
    process and what it waited for). Output goes to ``log`` (or is kept in ``output``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") if log is None else open(log, "w+") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "src.cli", *args],
            cwd=ROOT,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        out.seek(0)
        output = out.read()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"returncode": proc.returncode, "wall_s": wall, "cpu_s": cpu, "output": output}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged, ``{tag: [(step, value), ...]}`` in the order written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name)):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
                elif v.HasField("tensor") and v.tensor.float_val:
                    out.setdefault(v.tag, []).append((event.step, v.tensor.float_val[0]))
    return out


def run_folder(save_dir: Path) -> Path:
    """The run folder a command wrote under ``save_dir`` (the one holding ``config.yaml``)."""
    found = sorted(p.parent for p in save_dir.rglob("config.yaml"))
    if len(found) != 1:
        raise RuntimeError(f"expected one run folder under {save_dir}, found {[str(p) for p in found]}")
    return found[0]


def figures(run_dir: Path) -> dict[str, Any]:
    """Test accuracy/F1, best validation accuracy and epochs of a finished run folder."""
    logged = scalars(run_dir)

    def last(tag: str) -> float:
        return logged[tag][-1][1] if tag in logged else float("nan")

    val = [v for _, v in logged.get("val_acc", [])]
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    return {
        "test_acc": last("test_acc"),
        "test_f1": last("test_f1"),
        "best_val_acc": max(val) if val else float("nan"),
        "epochs": len(logged.get("train_acc", [])),
        "val_acc_per_epoch": val,
        "checkpoints": [p.name for p in ckpts],
        "run_dir": str(run_dir),
    }


def fit(
    config: str,
    overrides: list[str] = (),
    seed: int = 0,
    save_dir: Path | str | None = None,
    data_dir: Path | str | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``fit --config <config> --test_after_fit=true`` in a subprocess with ``seed`` and ``overrides``;
    its figures (:func:`figures`) with the command's wall and CPU time."""
    save_dir = Path(save_dir or tempfile.mkdtemp(prefix="bench_run_"))
    save_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "fit",
        "--config",
        str(ROOT / config),
        *local_data(config, data_dir),
        f"--seed_everything={seed}",
        "--test_after_fit=true",
        f"--trainer.logger.init_args.save_dir={save_dir.resolve()}",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    ran = run_command(args, timeout=timeout, log=save_dir / "output.log")
    if ran["returncode"] != 0:
        raise RuntimeError(f"fit failed ({ran['returncode']}): {' '.join(args)}\n{ran['output'][-4000:]}")
    return {"seed": seed, **figures(run_folder(save_dir)), "wall_s": ran["wall_s"], "cpu_s": ran["cpu_s"]}


def grid(
    config: str,
    variants: dict[str, list[str]],
    seeds: int,
    extra: list[str] = (),
    save_dir: Path | str | None = None,
    data_dir: Path | str | None = None,
    echo: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """:func:`fit` for every variant × seed (``seeds`` seeds from 0); a line per run as it ends."""
    root = Path(save_dir or tempfile.mkdtemp(prefix="bench_grid_"))
    results: dict[str, list[dict[str, Any]]] = {}
    for name, overrides in variants.items():
        for seed in range(seeds):
            r = fit(config, [*overrides, *extra], seed, root / name / f"seed{seed}", data_dir)
            results.setdefault(name, []).append(r)
            if echo:
                print(
                    f"{name:22s} seed {seed}: test_acc {r['test_acc']:.4f}  test_f1 {r['test_f1']:.4f}  best val_acc "
                    f"{r['best_val_acc']:.4f}  epochs {r['epochs']:3d}  wall {r['wall_s']:.1f}s  CPU {r['cpu_s']:.1f}s",
                    flush=True,
                )
    return results


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]  # NaN: not measured (no validation, say)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", choices=list(PAIRS), required=True)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--save-dir", default=None, help="run folders go here (default: a new temporary folder)"
    )
    parser.add_argument("extra", nargs="*", help="CLI overrides for every run (after --)")
    args = parser.parse_args(argv)
    results = grid(PAIRS[args.pair].config, {"config": []}, args.seeds, args.extra, args.save_dir)
    runs = results["config"]
    print(
        f"test acc {mean_std([r['test_acc'] for r in runs])}, macro-F1 {mean_std([r['test_f1'] for r in runs])}, "
        f"best val acc {mean_std([r['best_val_acc'] for r in runs])}"
    )


if __name__ == "__main__":
    main()
