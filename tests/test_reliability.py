"""Fault tolerance: a killed run resumes exactly, checkpoints are never half-written, a diverged
run stops cleanly, concurrent runs keep apart, and checkpoints load without running code."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, run_cli

MNIST1D_CONFIG = ROOT / "configs" / "mnist1d_resnet_bn.yaml"
# 600 samples → 480 train − 60 val = 420 → 14 batches of 32 per epoch; 3 epochs = 42 steps.
STEPS_PER_EPOCH, EPOCHS, CKPT_EVERY = 14, 3, 3


def resumable_config(tmp_path: Path) -> Path:
    """The MNIST-1D config with a `last.ckpt` every 3 training steps (mid-epoch: 14 % 3 != 0)."""
    cfg = yaml.safe_load(MNIST1D_CONFIG.read_text())
    callbacks = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("ProgressBar")]
    for c in callbacks:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"]["save_last"] = False
    callbacks.append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": CKPT_EVERY, "save_top_k": 0, "save_last": True},
        }
    )
    cfg["trainer"]["callbacks"] = callbacks
    path = tmp_path / "resumable.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit_args(config: Path, tmp_path: Path, save_dir: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        "--seed_everything=7",
        "--trainer.deterministic=true",
        "--trainer.accelerator=cpu",
        f"--trainer.max_epochs={EPOCHS}",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.num_samples=600",
        "--data.init_args.val_size=60",
        "--data.init_args.batch_size=32",
    ]


def start_cli(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    """Start ``python -m src.cli ARGS`` in a subprocess, as a user would (not waiting for it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BN_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "src.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    """Every scalar in a TensorBoard run folder, keyed by (tag, step); later files win."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = {}
    for f in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else float(torch.tensor(0.0))
                if v.HasField("tensor") and v.tensor.float_val:
                    value = v.tensor.float_val[0]
                out[(v.tag, event.step)] = value
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6


def test_sigkilled_fit_resumes_with_ckpt_path_last_to_identical_results(tmp_path: Path):
    config = resumable_config(tmp_path)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    run_cli(*fit_args(config, tmp_path, ref_dir), cwd=tmp_path)

    # Start the same run, SIGKILL it as soon as it has written a checkpoint.
    proc = start_cli(*fit_args(config, tmp_path, run_dir))
    deadline = time.monotonic() + 240
    try:
        while not list(run_dir.rglob("last.ckpt")):
            assert proc.poll() is None, (
                f"the run ended before it was killed:\n{proc.communicate()[1][-3000:]}"
            )
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    last = next(run_dir.rglob("last.ckpt"))
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < STEPS_PER_EPOCH * EPOCHS and killed_at % STEPS_PER_EPOCH != 0, killed_at

    # Same command + --ckpt_path=last: continues in the same version folder from that checkpoint.
    resumed = run_cli(*fit_args(config, tmp_path, run_dir), "--ckpt_path=last", cwd=tmp_path)
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    assert "not resumable" not in resumed.stderr  # Lightning's warning for loaders that restart the epoch
    versions = sorted(p.name for p in (run_dir / "mnist1d_resnet_bn").iterdir())
    assert versions == ["version_0"], versions

    ref_last = next(ref_dir.rglob("last.ckpt"))
    a, b = torch.load(ref_last, weights_only=True), torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS_PER_EPOCH * EPOCHS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6, rtol=0), key
    # optimizer moments, the LR schedule, early stopping and best-checkpoint bookkeeping all resumed
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6, rtol=0) for k in sa)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]
    early_a, early_b = (
        next(v for k, v in c["callbacks"].items() if k.startswith("EarlyStopping")) for c in (a, b)
    )
    assert early_a["wait_count"] == early_b["wait_count"]
    assert same(float(early_a["best_score"]), float(early_b["best_score"]))

    # The metrics logged after the resume point are the uninterrupted run's, value for value.
    ref_scalars, res_scalars = scalars(ref_last.parents[1]), scalars(last.parents[1])
    after = {k: v for k, v in ref_scalars.items() if k[1] >= killed_at and not k[0].startswith("hp/")}
    assert {"train_loss", "val_loss", "val_acc", "train_acc"} <= {tag for tag, _ in after}
    for key, value in after.items():
        assert key in res_scalars and same(value, res_scalars[key]), (key, value, res_scalars.get(key))


# ---------------------------------------------------------------------------------- atomic saves
def _half_then(action):
    """A stand-in for torch.save that writes half of the real bytes, then crashes via ``action``."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        action()

    return save


def test_failed_checkpoint_write_leaves_previous_file_and_no_temp(tmp_path: Path, monkeypatch):
    from src.reliability import SafeCheckpointIO

    io_ = SafeCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, target)

    def crash():
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", _half_then(crash))
    with pytest.raises(OSError, match="disk full"):
        io_.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, target)
    monkeypatch.undo()
    assert io_.load_checkpoint(target)["global_step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_background_fsync_keeps_save_and_remove_order_and_reports_failures(tmp_path: Path, monkeypatch):
    from src.reliability import SafeCheckpointIO

    io_ = SafeCheckpointIO()
    for step in range(3):  # best-k file, then last, then the previous best goes: as ModelCheckpoint does
        io_.save_checkpoint({"global_step": step}, tmp_path / f"best{step}.ckpt")
        io_.save_checkpoint({"global_step": step, "w": torch.full((1000,), step)}, tmp_path / "last.ckpt")
        if step:
            io_.remove_checkpoint(tmp_path / f"best{step - 1}.ckpt")
    assert io_.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2  # loading waits for the writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best2.ckpt", "last.ckpt"]

    def no_disk(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", no_disk)
    io_.save_checkpoint({"global_step": 3}, tmp_path / "last.ckpt")
    with pytest.raises(OSError, match="disk gone"):
        io_.teardown()
    monkeypatch.undo()
    assert io_.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best2.ckpt", "last.ckpt"]


def test_sigkill_in_the_middle_of_a_checkpoint_write_leaves_previous_last_ckpt_loadable(tmp_path: Path):
    target = tmp_path / "last.ckpt"
    script = f"""
import os, signal, torch
from src.reliability import SafeCheckpointIO
from tests.test_reliability import _half_then
io_ = SafeCheckpointIO()
io_.save_checkpoint({{"state_dict": {{"w": torch.ones(100_000)}}, "global_step": 1}}, {str(target)!r})
torch.save = _half_then(lambda: os.kill(os.getpid(), signal.SIGKILL))
io_.save_checkpoint({{"state_dict": {{"w": torch.zeros(100_000)}}, "global_step": 2}}, {str(target)!r})
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.ones(100_000))
    # the half-written temporary file is hidden and does not end in .ckpt: `--ckpt_path last` ignores it
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftovers and all(n.startswith(".last.ckpt.tmp") for n in leftovers)


def test_cli_trainer_uses_safe_checkpoint_io_and_fault_tolerance(tmp_path: Path):
    from src.callbacks import FaultTolerance
    from src.cli import main
    from src.reliability import SafeCheckpointIO

    cli = main(
        ["--config", str(MNIST1D_CONFIG), f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    assert sum(isinstance(c, FaultTolerance) for c in cli.trainer.callbacks) == 1
    # the version folder exists before the run writes anything into it
    assert (tmp_path / "mnist1d_resnet_bn" / f"version_{cli.trainer.logger.version}").is_dir()


# ---------------------------------------------------------------------------------- NaN loss
def test_nonfinite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    config = resumable_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"][-1]["init_args"]["every_n_train_steps"] = 1
    config.write_text(yaml.safe_dump(cfg))
    save_dir = tmp_path / "logs"
    out = run_cli(
        *fit_args(config, tmp_path, save_dir),
        "--model.init_args.optimizer.init_args.lr=1e30",
        "--model.init_args.lr_scheduler=null",
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode != 0
    assert "non-finite (NaN or inf) at training step" in out.stderr and "Traceback" not in out.stderr
    bad_step = int(out.stderr.split("at training step ")[1].split()[0])
    ckpt = torch.load(next(save_dir.rglob("last.ckpt")), weights_only=True)
    assert 1 <= ckpt["global_step"] < bad_step
    weights = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    assert weights and all(torch.isfinite(v.float()).all() for v in weights.values())


# ---------------------------------------------------------------------------------- concurrency
def _claim(root: str, start, out) -> None:
    from src.reliability import claim_version

    start.wait()
    out.put(claim_version(Path(root)))


def test_processes_claiming_a_version_at_the_same_moment_get_different_folders(tmp_path: Path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), start, out)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(out.get(timeout=5) for _ in procs) == list(range(6))


def test_two_fits_started_at_once_log_into_separate_version_folders(tmp_path: Path):
    args = [
        "fit",
        "--config",
        str(MNIST1D_CONFIG),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.num_samples=600",
        "--data.init_args.val_size=60",
    ]
    from src.data import MNIST1D

    MNIST1D(cache_dir=str(tmp_path / "cache"), num_samples=600).prepare_data()  # the data cache first
    # Two real processes, as two users' commands would be (forking this process, whose torch thread
    # pool is already running, can deadlock).
    procs = [start_cli(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    runs = sorted((tmp_path / "logs" / "mnist1d_resnet_bn").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    for run in runs:  # each run has its own config, events and checkpoint
        assert (run / "config.yaml").is_file() and len(list(run.glob("events.out.tfevents.*"))) == 1
        assert [p.name for p in (run / "checkpoints").glob("last.ckpt")] == ["last.ckpt"]


# ---------------------------------------------------------------------------------- no code on load
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_needing_arbitrary_unpickling_is_refused_and_runs_nothing(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _RunsCode(marker)}, evil)
    from src.cli import main

    for sub in ("test", "fit"):  # in-process: the message is the exit status, no traceback
        with pytest.raises(SystemExit, match="refused to load checkpoint"):
            main([sub, "--config", str(MNIST1D_CONFIG), "--ckpt_path", str(evil)])
    assert not marker.exists()

    from src.reliability import CheckpointError, SafeCheckpointIO

    with pytest.raises(CheckpointError, match="arbitrary code"):
        SafeCheckpointIO().load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="refused"):
        SafeCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists()
