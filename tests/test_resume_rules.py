"""What ``fit --ckpt_path`` continues, as a user meets it: a schedule laid out over the run's length
resumes only with that length, a finished run is not continued, a run with a schedule of its own
length may be extended, the start line shows the learning rate restored, a run folder continues
where it lies now with its best-checkpoint record, and a DataModule's own resumable options."""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.cli import config, refused, run_cli
from tests.helpers.data import tiny_mnist1d
from tests.helpers.tensorboard import scalars

pytestmark = pytest.mark.slow

MNIST1D = config("mnist1d_resnet_bn")
SHIPPED = yaml.safe_load(Path(MNIST1D).read_text())
PEAK, EPOCHS = SHIPPED["model"]["init_args"]["lr"], SHIPPED["trainer"]["max_epochs"]  # the config's
LENGTH_FREE = ["--model.init_args.lr_scheduler=null"]
STOP_AT_20 = [  # SIGTERM at step 20 (epoch 1 of tiny MNIST-1D's 14 steps per epoch): last.ckpt, exit 143
    "--trainer.callbacks+=tests.helpers.faults.KillAt",
    "--trainer.callbacks.step=20",
    f"--trainer.callbacks.signum={int(signal.SIGTERM)}",
]


def fit(data: Path, *extra: str, save_dir: Path | str | None = None, cfg: str = MNIST1D) -> list[str]:
    return [
        "fit", "--config", cfg, *tiny_mnist1d(data), "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--test_after_fit=false",
        f"--trainer.logger.init_args.save_dir={save_dir or data / 'logs'}", *extra,
    ]  # fmt: skip


def stopped(args: list[str], cwd: Path) -> None:
    out = run_cli(*args, *STOP_AT_20, cwd=cwd, check=False)
    assert out.returncode == 143, out.stderr[-3000:]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def start_lr(output: str) -> tuple[float, float]:
    """The learning rate now and the peak from the start line (``Learning rate: AdamW lr X now, peak Y``)."""
    found = re.search(r"Learning rate: \w+ lr (\S+) now, peak (\S+) ", output)
    assert found, output[-3000:]
    return float(found.group(1)), float(found.group(2))


@pytest.fixture(scope="module")
def stopped_at_20(tmp_path_factory) -> Path:
    """A three-epoch run stopped by SIGTERM at step 20 (data cache and logs), made once for the module."""
    root = tmp_path_factory.mktemp("stopped")
    stopped(fit(root, "--trainer.max_epochs=3"), root)
    return root


def copy_of(stopped_at_20: Path, folder: Path) -> Path:
    """The stopped run copied into ``folder`` (``folder/logs``, ``folder/cache``); its run folder."""
    shutil.copytree(stopped_at_20, folder, dirs_exist_ok=True)
    return folder / "logs" / "mnist1d_resnet_bn" / "version_0"


def test_a_run_whose_schedule_spans_its_length_resumes_only_with_that_length_in_its_own_folder(
    tmp_path: Path, stopped_at_20: Path
):
    run_dir = copy_of(stopped_at_20, tmp_path)
    before, restored_lr = snapshot(run_dir), state(run_dir)["lr_schedulers"][0]["_last_lr"][0]

    # the config's max_epochs: the one-cycle schedule of the 3-epoch run would be spent for the rest
    longer = run_cli(*fit(tmp_path, "--ckpt_path=last"), cwd=tmp_path, check=False)
    refused(longer, "OneCycleLR learning-rate schedule was laid out over its length (max_epochs=3)",
            f"max_epochs={EPOCHS} would train past the schedule's end", "Resume it with --trainer.max_epochs=3")  # fmt: skip
    best = next(run_dir.glob("checkpoints/epoch*.ckpt"))
    from_file = run_cli(
        *fit(tmp_path, "--trainer.max_epochs=5", f"--ckpt_path={best}"), cwd=tmp_path, check=False
    )
    refused(from_file, "laid out over its length (max_epochs=3)")
    assert snapshot(run_dir) == before and sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]

    # its own length, by its path from another directory with a relative save_dir (resolved there, it
    # names no folder of this run): it continues in its own folder, a copy, with its best-checkpoint
    # record, and the start line gives the rate restored, not a fresh schedule's
    elsewhere, original = tmp_path / "elsewhere", snapshot(stopped_at_20 / "logs")
    elsewhere.mkdir()
    last = run_dir / "checkpoints" / "last.ckpt"
    out = run_cli(
        *fit(
            tmp_path,
            "--trainer.max_epochs=3",
            f"--ckpt_path={last}",
            "--test_after_fit=true",
            save_dir="logs",
        ),
        cwd=elsewhere,
    )
    now, peak = start_lr(out.stdout + out.stderr)
    assert now == pytest.approx(restored_lr, rel=1e-3) and peak == pytest.approx(PEAK, rel=1e-3)
    assert state(run_dir)["epoch"] == 2 and state(run_dir)["global_step"] == 42
    assert not list(elsewhere.iterdir())  # no new run folder where the command ran
    assert [p.name for p in run_dir.parent.iterdir()] == ["version_0"]
    assert "dirpath has changed" not in out.stderr
    bests = list(run_dir.glob("checkpoints/epoch*.ckpt"))
    assert len(bests) == 1, bests  # top-1: the epoch before the copy was compared, not forgotten
    record = next(v for k, v in state(run_dir)["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert Path(record["best_model_path"]) == bests[0] and Path(record["dirpath"]) == run_dir / "checkpoints"
    val_acc = [v for (tag, _), v in scalars(run_dir).items() if tag == "val_acc"]
    assert len(val_acc) == 3 and float(record["best_model_score"]) == pytest.approx(max(val_acc))
    # the test after fit tests that file
    assert f"Restoring states from the checkpoint path at {bests[0]}" in out.stdout + out.stderr
    assert snapshot(stopped_at_20 / "logs") == original  # the folder it was copied from is untouched

    # finished: nothing left to train, and the command says what to do instead
    again = run_cli(*fit(tmp_path, "--trainer.max_epochs=3", "--ckpt_path=last"), cwd=tmp_path, check=False)
    refused(
        again,
        "that run is finished: it trained its 3 epochs (max_epochs=3)",
        "python -m src.cli test --ckpt_path",
    )


def test_a_length_free_schedule_may_be_extended_but_a_finished_run_is_not_continued(tmp_path: Path):
    run_cli(*fit(tmp_path, *LENGTH_FREE, "--trainer.max_epochs=1"), cwd=tmp_path)
    resumed = run_cli(
        *fit(tmp_path, *LENGTH_FREE, "--trainer.max_epochs=2", "--ckpt_path=last"), cwd=tmp_path
    )
    assert "exists and is not empty" not in resumed.stderr  # its own folder is not a warning
    run_dir = tmp_path / "logs" / "mnist1d_resnet_bn" / "version_0"
    assert state(run_dir)["epoch"] == 1
    before = snapshot(run_dir)
    again = run_cli(
        *fit(tmp_path, *LENGTH_FREE, "--trainer.max_epochs=2", "--ckpt_path=last"), cwd=tmp_path, check=False
    )
    refused(
        again,
        "that run is finished: it trained 2 epochs (max_epochs=2)",
        "pass a larger --trainer.max_epochs",
    )
    assert snapshot(run_dir) == before


def test_a_run_that_early_stopping_ended_is_not_continued(tmp_path: Path):
    settings = yaml.safe_load(Path(MNIST1D).read_text())
    for callback in settings["trainer"]["callbacks"]:
        if callback["class_path"].endswith("EarlyStopping"):  # stops after the first validation
            callback["init_args"] = {"monitor": "val_acc", "mode": "max", "stopping_threshold": 0.0}
    cfg = tmp_path / "stops_at_once.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    run_cli(*fit(tmp_path, "--trainer.max_epochs=5", cfg=str(cfg)), cwd=tmp_path)
    out = run_cli(
        *fit(tmp_path, "--trainer.max_epochs=5", "--ckpt_path=last", cfg=str(cfg)), cwd=tmp_path, check=False
    )
    refused(
        out,
        "that run is finished: EarlyStopping ended it after epoch 0",
        "start a new run without --ckpt_path",
    )


def test_a_datamodule_declares_the_options_a_resume_may_change(tmp_path: Path, stopped_at_20: Path):
    run_dir = copy_of(stopped_at_20, tmp_path)
    shutil.copytree(tmp_path / "cache", tmp_path / "moved_cache")
    moved = [f"--data.init_args.cache_dir={tmp_path / 'moved_cache'}"]

    # MNIST1D lists cache_dir (where its data is read from) in its resumable_options
    resumed = fit(tmp_path, "--trainer.max_epochs=3", "--ckpt_path=last", *moved)
    other = run_cli(*resumed, "--data.init_args.shift_augment=1", cwd=tmp_path, check=False)
    refused(other, "version_0: data.init_args.shift_augment: 3 -> 1")  # what the data is
    run_cli(*resumed, cwd=tmp_path)
    assert state(run_dir)["epoch"] == 2

    own_cache, logs = "--data=tests.helpers.datamodules.MNIST1DOwnCache", tmp_path / "own_cache"
    stopped(fit(tmp_path, own_cache, "--trainer.max_epochs=2", save_dir=logs), tmp_path)
    out = run_cli(
        *fit(tmp_path, own_cache, "--trainer.max_epochs=2", "--ckpt_path=last", *moved, save_dir=logs),
        cwd=tmp_path,
        check=False,
    )
    refused(out, "version_0: data.init_args.cache_dir: ")
