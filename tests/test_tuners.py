"""The tuners through the CLI: the value a tuner picks is the value that trains (the optimiser's rate,
the one-cycle peak, the schedule's step count), the one the start line, ``config.yaml`` and the
checkpoint show; a learning-rate pick that would not train is refused and leaves nothing behind; a
resumed run keeps what it was tuned to."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

from src.runtime.checkpoints import CONFIG_KEY
from tests.helpers.cli import ROOT, config, refused, run_cli
from tests.helpers.data import tiny_mnist1d

pytestmark = pytest.mark.slow

MNIST1D = config("mnist1d_resnet_bn")
# Tiny MNIST-1D has 14 steps per epoch; in 2 epochs the finder gets its 20 steps and a usable curve.
FINDER = ["--trainer.callbacks+=LearningRateFinder", "--trainer.callbacks.num_training_steps=20"]


def fit(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", MNIST1D, *tiny_mnist1d(tmp_path), "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--test_after_fit=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", *extra,
    ]  # fmt: skip


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "mnist1d_resnet_bn" / "version_0"


def recorded(tmp_path: Path) -> tuple[dict, dict]:
    """The run's config.yaml settings and its last.ckpt."""
    folder = run_dir(tmp_path)
    settings = yaml.safe_load((folder / "config.yaml").read_text())
    return settings, torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)


def peak(output: str) -> float:
    found = re.search(r"Learning rate: \w+ lr \S+ now, peak (\S+) ", output)
    assert found, output[-3000:]
    return float(found.group(1))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run tuned by the learning-rate finder, stopped by SIGTERM at step 20 and resumed by the same
    command: each command's output, and the run's config.yaml settings and last.ckpt after each."""
    root = tmp_path_factory.mktemp("tuned")
    stop = ["--trainer.callbacks+=tests.helpers.faults.KillAt", "--trainer.callbacks.step=20",
            f"--trainer.callbacks.signum={int(signal.SIGTERM)}"]  # fmt: skip
    first = run_cli(*fit(root, *FINDER, *stop), cwd=root, check=False)
    assert first.returncode == 143, first.stderr[-3000:]
    stopped = recorded(root)
    resumed = run_cli(*fit(root, *FINDER, "--ckpt_path=last"), cwd=root)  # the same command resumes it
    return {"stopped": (first, *stopped), "resumed": (resumed, *recorded(root))}


def test_the_learning_rate_finders_pick_is_what_trains_and_what_is_recorded(tuned: dict):
    out, settings, ckpt = tuned["stopped"]  # the checkpoint written where SIGTERM stopped the run
    lr = settings["model"]["init_args"]["lr"]
    assert lr != 0.01 and ckpt["hyper_parameters"]["lr"] == lr
    # the finder saves (and restores) a checkpoint before the tuned value is known
    assert yaml.safe_load(ckpt[CONFIG_KEY])["model"]["init_args"]["lr"] == lr
    assert "The tuner chose model.init_args.lr=" in out.stdout + out.stderr
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["max_lr"] == pytest.approx(lr)  # the one-cycle peak
    assert group["initial_lr"] == pytest.approx(lr / 25)  # its start (div_factor 25)
    assert peak(out.stdout + out.stderr) == pytest.approx(lr, rel=1e-3)  # the start line says it
    assert ckpt["lr_schedulers"][0]["total_steps"] == 28  # the 2 epochs' steps


# A run with TensorBoard and CSV stacked: neither logger leaves a folder (TensorBoard alone is the
# first of them).
@pytest.mark.parametrize("preset", [["--config", str(ROOT / "configs" / "presets" / "csv.yaml")]],
                         ids=["csv-stacked"])  # fmt: skip
def test_a_learning_rate_pick_that_would_not_train_is_refused(tmp_path: Path, preset: list[str]):
    # 3 epochs give the finder 42 of its 100 steps before its loss diverges: its pick is from part
    # of its range
    out = run_cli(*fit(tmp_path, *preset, "--trainer.callbacks+=LearningRateFinder", "--trainer.max_epochs=3"),
                  cwd=tmp_path, check=False)  # fmt: skip
    refused(
        out, "the learning-rate finder found no learning rate", "42 of 100 steps", "--model.init_args.lr="
    )
    # no run folder, no config.yaml recording a rate that never trained
    assert not (tmp_path / "logs").exists() and not list(tmp_path.rglob("version_*"))


def test_the_batch_size_finders_pick_sets_the_schedules_length(tmp_path: Path):
    run_cli(*fit(tmp_path, "--trainer.callbacks+=BatchSizeFinder"), cwd=tmp_path)
    settings, ckpt = recorded(tmp_path)
    batch_size = settings["data"]["init_args"]["batch_size"]
    assert batch_size != 32 and batch_size <= 1024
    assert ckpt["datamodule_hyper_parameters"]["batch_size"] == batch_size
    assert yaml.safe_load(ckpt[CONFIG_KEY])["data"]["init_args"]["batch_size"] == batch_size
    schedule = ckpt["lr_schedulers"][0]
    assert schedule["total_steps"] == schedule["last_epoch"] == ckpt["global_step"]  # it ended with the run


def test_a_resumed_run_keeps_what_it_was_tuned_to(tuned: dict):
    tuned_lr = tuned["stopped"][1]["model"]["init_args"]["lr"]
    out, settings, ckpt = tuned["resumed"]
    said = out.stdout + out.stderr
    assert "LearningRateFinder left out: a resumed run keeps the values its checkpoint holds" in said
    assert "Finding best initial lr" not in said and "The tuner chose" not in said
    assert settings["model"]["init_args"]["lr"] == ckpt["hyper_parameters"]["lr"] == tuned_lr
    assert ckpt["optimizer_states"][0]["param_groups"][0]["max_lr"] == pytest.approx(tuned_lr)
    assert ckpt["lr_schedulers"][0]["total_steps"] == ckpt["global_step"] == 28
