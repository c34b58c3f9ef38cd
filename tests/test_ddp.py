"""Multi-process runs through the real entry point, on CPU (gloo), as a user launches them.

``--trainer.devices=2 --trainer.strategy=ddp`` makes Lightning re-launch ``python -m src.cli`` for
rank 1; the two-"node" test starts two ``torchrun --nnodes=2`` agents on localhost. Each run is
tiny (one short epoch), so the time goes into starting the processes.
"""

from __future__ import annotations

import csv
import importlib
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.data import TensorBatches
from src.runtime.summary import read_summary
from tests.helpers.cli import CONFIGS, ROOT, config, data_class, env, run_cli
from tests.helpers.data import TINY_DATA

pytestmark = pytest.mark.slow
MNIST1D_CONFIG = config("mnist1d_resnet_bn")


def logs(tmp_path: Path) -> list[str]:
    return [f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]


DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
# the same through the overlay preset (strategy and sync_batchnorm come from it)
DDP_PRESET = [
    "--config",
    str(ROOT / "configs" / "presets" / "ddp.yaml"),
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
]
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--test_after_fit=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
CPU_BN_NOTE = "each process normalises with its own batch statistics"


def _class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def load_run(ckpt: Path):
    """The model and DataModule of a checkpoint, rebuilt in this process (on CPU)."""
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    model = _class(state["hyper_parameters"]["_class_path"]).load_from_checkpoint(ckpt, map_location="cpu")
    data = _class(state["datamodule_hyper_parameters"]["_class_path"]).load_from_checkpoint(ckpt)
    data.setup("validate")
    return model.eval(), data


@torch.no_grad()
def val_loss_over(model, data, split: tuple) -> float:
    """Validation loss of ``model`` over the samples of ``split``, through the model's own step."""
    model.metrics("val").reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        for i, batch in enumerate(TensorBatches(split, data.eval_batch_size, collate=data.collate)):
            model.validation_step(data.transform_batch(batch, training=False), i)
    return float(model.metrics("val").compute()["loss"])


def single_run_dir(save_dir: Path) -> Path:
    runs = [p for p in save_dir.rglob("version_*") if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder (rank 0 only), got {runs}"
    return runs[0]


def assert_one_checkpoint_set(run_dir: Path) -> list[Path]:
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    names = [p.name for p in ckpts]
    assert "last.ckpt" in names, names
    # a second writer would leave `last-v1.ckpt` / `...-v1.ckpt` beside the first
    assert not [n for n in names if "-v1" in n], names
    assert len(list(run_dir.parent.parent.rglob("config.yaml"))) == 1
    return ckpts


def logged_scalar(run_dir: Path, tag: str) -> float:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag)[-1].value


# The first config of each DataModule: what DDP changes (each rank's shard of the data, the metrics
# summed over both ranks) is the DataModule's; configs sharing one differ only in the network (the
# MNIST-1D residual network runs on two processes in the two-node test below).
ONE_PER_DATA = [c for i, c in enumerate(CONFIGS) if data_class(c) not in map(data_class, CONFIGS[:i])]


@pytest.mark.parametrize("config", ONE_PER_DATA, ids=[c.stem for c in ONE_PER_DATA])
def test_ddp_fit_on_two_cpu_processes(config: Path, tmp_path: Path):
    data = TINY_DATA[data_class(config)](tmp_path)
    # float32 whatever the config's precision: the check below recomputes the loss in float32
    flags = [*DDP_PRESET, *QUICK, "--trainer.precision=32-true", *data, *logs(tmp_path)]
    out = run_cli("fit", "--config", str(config), *flags, cwd=tmp_path)
    said = out.stdout + out.stderr
    assert "Starting with 2 processes" in said and "Traceback" not in said
    assert said.count(CPU_BN_NOTE) == 1  # said once, not once per rank
    assert "Effective batch size" in said

    run_dir = single_run_dir(tmp_path / "logs")
    assert_one_checkpoint_set(run_dir)

    # The logged val_loss is the mean over the WHOLE validation split (each rank saw half of
    # it; torchmetrics summed both halves), computed here again in one process from last.ckpt.
    model, dm = load_run(run_dir / "checkpoints" / "last.ckpt")
    val = dm.splits["val"]
    full = val_loss_over(model, dm, val)
    half = val_loss_over(model, dm, tuple(t[0::2] for t in val))  # what rank 0 alone saw
    logged = logged_scalar(run_dir, "val_loss")
    assert logged == pytest.approx(full, rel=1e-4)
    summary = read_summary(run_dir)  # rank 0 alone writes it
    assert [e["epoch"] for e in summary["epochs"]] == [0]
    assert summary["epochs"][0]["val_loss"] == pytest.approx(full, rel=1e-4)
    assert abs(full - half) > 1e-3 * abs(full), "test data too uniform to tell a shard from the split"


def assert_predictions_in_order(save_dir: Path, ckpt: Path) -> None:
    files = list(save_dir.rglob("predictions.csv"))
    assert len(files) == 1, files
    with files[0].open() as f:
        rows = list(csv.DictReader(f))
    model, dm = load_run(ckpt)
    x = dm.transform_batch(dm.splits["test"], training=False)
    with torch.no_grad():
        expected = model.predict_step(x, 0).argmax(-1).tolist()
    assert [int(r["index"]) for r in rows] == list(range(len(expected)))
    assert [int(r["predicted"]) for r in rows] == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_fit_then_ddp_predict(tmp_path: Path):
    config = Path(MNIST1D_CONFIG)
    data = TINY_DATA[data_class(config)](tmp_path)
    port = _free_port()
    # Both nodes generate the data into the same folder: the cache is written atomically.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=bn-test",
        "-m",
        "src.cli",
        "fit",
        "--config",
        str(config),
        "--trainer.accelerator=cpu",
        "--trainer.num_nodes=2",
        "--trainer.devices=1",
        "--trainer.strategy=ddp",
        *QUICK,
        *data,
        f"--trainer.logger.init_args.save_dir={tmp_path / 'nodes'}",
    ]
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env={**env(), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
    joined = "".join(outputs)
    assert "2 process(es) (2 node(s) × 1 device(s))" in joined
    run_dir = single_run_dir(tmp_path / "nodes")
    assert_one_checkpoint_set(run_dir)

    # predict on two processes from that checkpoint: rank 0 writes every sample, in order
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run_cli(
        "predict",
        "--config",
        str(config),
        "--ckpt_path",
        str(ckpt),
        *DDP,
        *data,
        *logs(tmp_path),
        cwd=tmp_path,
    )
    assert_predictions_in_order(tmp_path / "logs", ckpt)
