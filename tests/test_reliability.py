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


def start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BN_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "src.cli", *args],
        cwd=ROOT,
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
