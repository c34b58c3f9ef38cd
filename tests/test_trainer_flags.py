"""The common Trainer flags, replayed through ``python -m src.cli fit`` on tiny MNIST-1D: each works
as Lightning documents it, through the shipped config, with no traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import ROOT, config, run_cli
from tests.helpers.data import tiny_mnist1d
from tests.helpers.tensorboard import scalars

pytestmark = pytest.mark.slow

MNIST1D = config("mnist1d_resnet_bn")
STEPS = 14  # per epoch


def run_folder(tmp_path: Path) -> Path:
    folders = sorted((tmp_path / "logs").rglob("version_*"))
    assert len(folders) == 1, folders
    return folders[0]


def last(tmp_path: Path) -> dict:
    return torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)


def logged(tmp_path: Path, tag: str) -> list[tuple[int, float]]:
    return sorted((step, v) for (t, step), v in scalars(run_folder(tmp_path)).items() if t == tag)


def check_overfit(tmp_path: Path, out) -> None:
    assert logged(tmp_path, "train_loss")[-1][1] < 0.05  # the same batch every epoch


def check_val_twice_per_epoch(tmp_path: Path, out) -> None:
    assert len(logged(tmp_path, "val_loss")) == 4  # 2 epochs × 2 validations


def check_val_every_other_epoch(tmp_path: Path, out) -> None:
    assert [s // STEPS for s, _ in logged(tmp_path, "val_loss")] == [1, 3]  # in epochs 1 and 3 only
    assert last(tmp_path)["epoch"] == 3  # last.ckpt also after the epochs without validation


def check_accumulation(tmp_path: Path, out) -> None:
    assert last(tmp_path)["global_step"] == 2 * 7  # 14 batches → 7 optimiser steps per epoch


def check_max_steps(tmp_path: Path, out) -> None:
    assert last(tmp_path)["global_step"] == 5


def check_profiler_and_summary(tmp_path: Path, out) -> None:
    said = out.stdout + out.stderr
    assert "FIT Profiler Report" in said and "Trainable params" in said


def check_csv_logger(tmp_path: Path, out) -> None:
    assert (run_folder(tmp_path) / "metrics.csv").is_file()


def check_two_loggers(tmp_path: Path, out) -> None:
    assert list((tmp_path / "logs").rglob("metrics.csv")) and list((tmp_path / "logs").rglob("events.out.*"))


def check_left_out(flag_text: str, *names: str) -> Callable:
    def check(tmp_path: Path, out) -> None:
        said = out.stdout + out.stderr
        assert "Left out: " in said and f"{', '.join(names)} ({flag_text})" in said, said[-3000:]

    return check


def check_no_logger(tmp_path: Path, out) -> None:
    check_left_out("--trainer.logger=false", "LearningRateMonitor")(tmp_path, out)
    assert list(
        (tmp_path / "lightning_logs").rglob("last.ckpt")
    )  # in a run folder of its own, not ./checkpoints
    assert not (tmp_path / "checkpoints").exists()


def check_no_logger_in_a_root_dir(tmp_path: Path, out) -> None:
    # the best checkpoint and last.ckpt side by side in the run folder under default_root_dir
    (folder,) = (tmp_path / "logs" / "root").glob("lightning_logs/version_*/checkpoints")
    assert (folder / "last.ckpt").is_file() and list(folder.glob("epoch*.ckpt"))
    assert not (tmp_path / "logs" / "root" / "checkpoints").exists()


def check_no_checkpoints(tmp_path: Path, out) -> None:
    check_left_out("--trainer.enable_checkpointing=false", "ModelCheckpoint", "LastCheckpoint")(tmp_path, out)
    assert not list(tmp_path.rglob("*.ckpt"))


def both(*checks: Callable) -> Callable:
    def check(tmp_path: Path, out) -> None:
        for one in checks:
            one(tmp_path, out)

    return check


def check_one_process_preset(tmp_path: Path, out) -> None:
    assert "SyncBatchNorm" not in out.stderr or "Traceback" not in out.stderr


# The learning-rate and batch-size finders are tuners: tests/test_tuners.py runs them through the CLI.
FLAGS = {
    "overfit_batches": (
        ["--trainer.overfit_batches=1", "--trainer.max_epochs=30", "--data.init_args.shift_augment=0",
         "--model.init_args.dropout=0", "--model.init_args.label_smoothing=0", "--model.init_args.lr=0.01",
         "--model.init_args.lr_scheduler=null"], check_overfit),
    # The DDP preset on one CPU process (per-process BatchNorm) counts validations like any other run.
    "val_check_interval+ddp_preset_one_process": (
        ["--trainer.val_check_interval=0.5", "--trainer.max_epochs=2", "--config", str(ROOT / "configs" / "presets" / "ddp.yaml"),
         "--trainer.accelerator=cpu", "--trainer.devices=1"], both(check_val_twice_per_epoch, check_one_process_preset)),
    "check_val_every_n_epoch": (["--trainer.check_val_every_n_epoch=2", "--trainer.max_epochs=4"], check_val_every_other_epoch),
    # Flags with checks of their own that cannot interfere share a run too.
    "accumulate_grad_batches+no_logger": (["--trainer.accumulate_grad_batches=2", "--trainer.max_epochs=2",
                                           "--trainer.logger=false"], both(check_accumulation, check_no_logger)),
    # Flags that only need to run cleanly share a run (each group is a common combination).
    "gradient_clip_val+bf16-mixed+swa": (["--trainer.gradient_clip_val=0.5", "--trainer.gradient_clip_algorithm=norm",
                                          "--trainer.precision=bf16-mixed", "--trainer.callbacks+=StochasticWeightAveraging",
                                          "--trainer.callbacks.swa_lrs=0.005", "--trainer.callbacks.swa_epoch_start=1",
                                          "--trainer.max_epochs=2"], None),
    "detect_anomaly+profiler+model_summary+max_time+two_loggers+no_checkpointing": (
        ["--trainer.detect_anomaly=true", "--trainer.profiler=simple", "--trainer.callbacks+=ModelSummary",
         "--trainer.callbacks.max_depth=3", "--trainer.max_time=00:00:00:02", "--trainer.max_epochs=1000",
         "--trainer.logger+=CSVLogger", "--trainer.logger.init_args.save_dir=LOGS", "--trainer.logger.init_args.name=csv",
         "--trainer.enable_checkpointing=false", "--test_after_fit=true"],
        both(check_profiler_and_summary, check_two_loggers, check_no_checkpoints)),
    "ddp_spawn+csv_logger+max_steps": (["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp_spawn",
                                        "--trainer.logger=CSVLogger", "--trainer.logger.init_args.save_dir=LOGS",
                                        "--trainer.max_steps=5"], both(check_csv_logger, check_max_steps)),
    # --trainer.logger=false with a default_root_dir: test_deterministic_runs_repeat_to_the_bit
}  # fmt: skip


@pytest.mark.parametrize("flag", list(FLAGS))
def test_trainer_flag_through_the_cli(flag: str, tmp_path: Path):
    extra, check = FLAGS[flag]
    extra = [e.replace("LOGS", str(tmp_path / "logs")) for e in extra]
    args = [
        "fit", "--config", MNIST1D, *tiny_mnist1d(tmp_path), f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--test_after_fit=false", *extra,
    ]  # fmt: skip
    out = run_cli(*args, cwd=tmp_path)
    assert "Traceback" not in out.stderr
    if check is not None:
        check(tmp_path, out)


def test_deterministic_runs_repeat_to_the_bit(tmp_path: Path):
    """Two deterministic runs, the second without a logger (logging only observes, so it changes no
    weight) and with a default_root_dir, which holds its run folder."""
    a_then_b = (
        [f"--trainer.logger.init_args.save_dir={tmp_path / 'a'}"],
        ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'logs' / 'root'}"],
    )
    for extra in a_then_b:
        out = run_cli("fit", "--config", MNIST1D, *tiny_mnist1d(tmp_path), "--trainer.deterministic=true",
                      "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--test_after_fit=false", *extra,
                      cwd=tmp_path)  # fmt: skip
        assert "Traceback" not in out.stderr
    check_no_logger_in_a_root_dir(tmp_path, out)
    a, b = (
        torch.load(next(p.rglob("last.ckpt")), weights_only=True)["state_dict"]
        for p in (tmp_path / "a", tmp_path / "logs")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
