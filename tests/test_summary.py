"""``summary.json``, the logger-independent record of a run, as the CLI writes it: per epoch, best and
test figures; across a kill and resume; without validation; for a checkpoint-only test."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from src.runtime.summary import read_summary
from tests.helpers.cli import config, run_cli
from tests.helpers.data import tiny_mnist1d

pytestmark = pytest.mark.slow

FIGURES = {"train_acc", "train_loss", "train_f1", "val_acc", "val_loss", "val_f1"}


def fit(root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", config("mnist1d_resnet_bn"), *tiny_mnist1d(root),
        f"--trainer.logger.init_args.save_dir={root / 'logs'}", "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=3", *extra,
    ]  # fmt: skip


def kill_at(step: int, signum: int = signal.SIGKILL) -> list[str]:
    return ["--trainer.callbacks+=tests.helpers.faults.KillAt", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.signum={int(signum)}"]  # fmt: skip


def test_a_stopped_and_resumed_run_records_each_epoch_once_with_its_best_and_test(tmp_path: Path):
    run = tmp_path / "logs" / "mnist1d_resnet_bn" / "version_0"
    # SIGTERM: last.ckpt is written at step 15, where the run stops
    stopped = run_cli(*fit(tmp_path, "--test_after_fit=true"), *kill_at(15, signal.SIGTERM), cwd=tmp_path,
                      check=False)  # fmt: skip
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert [e["epoch"] for e in read_summary(run)["epochs"]] == [0]
    step15 = run / "step15.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", step15)

    run_cli(*fit(tmp_path, "--test_after_fit=true", "--ckpt_path=last"), cwd=tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    epochs = summary["epochs"]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(0, 14), (1, 28), (2, 42)]
    assert all(set(e) >= FIGURES for e in epochs), epochs
    assert [e["time"] for e in epochs] == sorted(e["time"] for e in epochs)
    accs = [e["val_acc"] for e in epochs]
    best = accs.index(max(accs))  # the first of equal values, as ModelCheckpoint keeps it
    assert summary["best"] == {"monitor": "val_acc", "mode": "max", "value": accs[best], "epoch": best}
    [best_file] = [p.name for p in (run / "checkpoints").glob("epoch*.ckpt")]
    assert best_file.startswith(f"epoch{best:03d}-")
    report = json.loads((run / "per_class_report.json").read_text())
    assert summary["test"]["test_acc"] == pytest.approx(report["accuracy"], abs=1e-6)
    assert {"test_loss", "test_f1", "time"} <= set(summary["test"])

    # Resumed from step 15 again and killed in epoch 2: the entries after the checkpoint are
    # replaced as they are done again, and the test of the earlier fit is dropped.
    shutil.copy(step15, run / "checkpoints" / "last.ckpt")
    again = run_cli(*fit(tmp_path, "--test_after_fit=true", "--ckpt_path=last"), *kill_at(30), cwd=tmp_path,
                    check=False)  # fmt: skip
    assert again.returncode == -signal.SIGKILL
    redone = read_summary(run)
    assert [e["epoch"] for e in redone["epochs"]] == [0, 1]
    assert redone["epochs"][0] == epochs[0]
    assert redone["epochs"][1]["time"] > epochs[2]["time"]
    assert redone["epochs"][1]["val_acc"] == pytest.approx(epochs[1]["val_acc"], abs=1e-6)  # the same epoch
    assert "test" not in redone
    assert not list(run.glob(".summary.json.tmp*"))


def test_without_validation_and_for_a_checkpoint_only_test(tmp_path: Path):
    run_cli(*fit(tmp_path, "--data.init_args.val_size=0", "--trainer.max_epochs=2", "--test_after_fit=false"),
            cwd=tmp_path)  # fmt: skip
    root = tmp_path / "logs" / "mnist1d_resnet_bn"
    summary = read_summary(root / "version_0")
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1]
    assert not any(k.startswith("val_") for e in summary["epochs"] for k in e)
    assert "best" not in summary and "test" not in summary  # nothing was validated or tested

    ckpt = next((root / "version_0" / "checkpoints").glob("epoch*.ckpt"))
    run_cli("test", "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar=false", cwd=tmp_path)
    tested = read_summary(root / "version_1")
    assert tested["epochs"] == [] and "best" not in tested
    assert 0 <= tested["test"]["test_acc"] <= 1
