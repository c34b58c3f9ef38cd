"""Checkpoints and resume, as a user meets them on the command line.

``last.ckpt`` is the newest state; any chain of SIGKILLs (mid-epoch, at an epoch's last step, between
training and validation, before the epoch-end save, in the middle of a save) resumes to the weights of
an uninterrupted run; SIGTERM/SIGINT save and exit non-zero; ``--ckpt_path=last`` resumes only the
run the command describes and never one in use; a full disk or read-only folder is a one-line error.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint

from src.callbacks import LastCheckpoint
from src.data import TensorBatches
from tests.helpers.cli import config, env, read_only, refused, run_cli, start_cli
from tests.helpers.data import tiny_ag_news, tiny_mnist1d
from tests.helpers.faults import assert_same_state
from tests.helpers.models import quiet_trainer
from tests.helpers.tensorboard import scalars

pytestmark = pytest.mark.slow

MNIST1D = config("mnist1d_resnet_bn")
DROPOUT = yaml.safe_load(Path(MNIST1D).read_text())["model"]["init_args"]["dropout"]  # the config's
STEPS_PER_EPOCH, EPOCHS = 14, 3  # tiny MNIST-1D: 420 training signals in batches of 32


# ---------------------------------------------------------------------------------- what last.ckpt holds
class _WorseEveryEpoch(LightningModule):
    """Validation accuracy falls every epoch, so the best epoch is the first."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", -float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_save_last_follows_the_best_checkpoint_and_last_checkpoint_does_not(tmp_path: Path):
    """Pins Lightning >= 2.6.0: ``ModelCheckpoint(save_last=True)`` writes last.ckpt only when it saves a
    top-k checkpoint, so beside a monitored best it holds the best epoch. LastCheckpoint keeps the newest."""
    data = TensorBatches((torch.randn(8, 2),), batch_size=4)
    trainer = quiet_trainer(
        max_epochs=3,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "lightning", monitor="val_acc", mode="max", save_last=True),
            LastCheckpoint(filename="newest.ckpt"),
        ],
    )
    trainer.fit(_WorseEveryEpoch(), data, data)
    assert torch.load(tmp_path / "lightning" / "last.ckpt", weights_only=True)["epoch"] == 0  # the best
    assert torch.load(tmp_path / "checkpoints" / "newest.ckpt", weights_only=True)["epoch"] == 2


# ---------------------------------------------------------------------------------- kill chains
def fit_args(tmp_path: Path, save_dir: Path, every_n_train_steps: int = 0, cfg: str = MNIST1D) -> list[str]:
    """A deterministic tiny run of ``cfg``, saving last.ckpt every N steps too (0: epoch ends only)."""
    data = tiny_mnist1d(tmp_path) if cfg == MNIST1D else tiny_ag_news(tmp_path)
    return [
        "fit",
        "--config",
        _with_step_saves(cfg, tmp_path, every_n_train_steps),
        "--seed_everything=7",
        "--trainer.deterministic=true",
        "--trainer.accelerator=cpu",
        f"--trainer.max_epochs={EPOCHS}",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        *data,
    ]


def _with_step_saves(cfg: str, folder: Path, every_n_train_steps: int) -> str:
    """A copy of the config whose LastCheckpoint also saves every N steps."""
    settings = yaml.safe_load(Path(cfg).read_text())
    for callback in settings["trainer"]["callbacks"]:
        if callback["class_path"] == "LastCheckpoint":
            callback["init_args"]["every_n_train_steps"] = every_n_train_steps
    path = folder / f"{Path(cfg).stem}_every_{every_n_train_steps}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def kill(step: int, where: str, signum: int = signal.SIGKILL) -> list[str]:
    return [
        "--trainer.callbacks+=tests.helpers.faults.KillAt",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.where={where}",
        f"--trainer.callbacks.signum={int(signum)}",
    ]


def last_state(save_dir: Path) -> dict:
    return torch.load(next(save_dir.rglob("last.ckpt")), weights_only=True)


def assert_same_run(reference: Path, resumed: Path, from_step: int) -> None:
    """Final weights, step and epoch equal (1e-6); optimiser moments and schedule too; the metrics
    logged after ``from_step`` value for value."""
    assert_same_state(next(reference.rglob("last.ckpt")), next(resumed.rglob("last.ckpt")))
    # A run killed before its first checkpoint restarts in a new folder; every resume goes into one.
    with_checkpoints = [p.parents[1] for p in resumed.rglob("last.ckpt")]
    assert len(with_checkpoints) == 1, f"the resumed runs went into several folders: {with_checkpoints}"
    ref, res = scalars(next(reference.rglob("last.ckpt")).parents[1]), scalars(with_checkpoints[0])
    after = {k: v for k, v in ref.items() if k[1] > from_step and not k[0].startswith("hp/")}
    assert {"train_loss", "val_loss", "val_acc"} <= {tag for tag, _ in after}
    for key, value in after.items():
        assert key in res and (math.isclose(value, res[key], abs_tol=1e-6) or value == res[key]), key


@pytest.fixture(scope="module")
def mnist1d_reference(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted run: checkpoint frequency does not change training, so every chain compares to it."""
    root = tmp_path_factory.mktemp("reference")
    run_cli(*fit_args(root, root / "logs"), cwd=root)
    return root, root / "logs"


def random_chain(
    seed: int, every_n_train_steps: int, at_boundaries: tuple[str, ...]
) -> list[tuple[int, str]]:
    """Kills at increasing seeded random steps: mid-epoch after an epoch boundary (and before the
    first one, with step saves), at boundaries (one of ``at_boundaries`` each, at distinct seeded epoch
    ends) and during a save."""
    rng = random.Random(seed)
    ends = [STEPS_PER_EPOCH * e for e in range(1, EPOCHS)]
    boundaries = sorted(rng.sample(ends, len(at_boundaries)))
    points = set(zip(boundaries, at_boundaries, strict=True))
    mid_epoch = [s for s in range(boundaries[0] + 1, STEPS_PER_EPOCH * EPOCHS - 1) if s not in ends]
    early, late = (rng.randrange(2, boundaries[0] - 1), "batch_end"), (rng.choice(mid_epoch), "batch_end")
    # Without step saves a kill before the first boundary finds no checkpoint: the next run starts
    # afresh, as after a kill during the first epoch-end save and the step-save chain's first kill.
    points |= {early, late} if every_n_train_steps else {late}
    if every_n_train_steps:
        save_step = every_n_train_steps * rng.randint(
            1, (STEPS_PER_EPOCH * EPOCHS - 2) // every_n_train_steps
        )
        points.add((save_step, "during_save"))
    else:
        points.add((STEPS_PER_EPOCH * rng.randint(1, EPOCHS - 1), "during_save"))
    return sorted(points)


# Between them the chains kill at every kind of point: mid-epoch, between training and validation,
# before the epoch-end save, at the start of the next epoch, and half-way through an epoch-end and a
# step save. Each chain is also stopped once by a signal (SIGTERM, a scheduler; SIGINT, Ctrl-C) at
# step STOP_AT, mid-epoch: the run saves, says so in one line, exits non-zero, and the chain resumes
# from that save to the uninterrupted run.
CHAINS = {
    "epoch-ends": (0, 7, ("before_epoch_save",), signal.SIGTERM),
    "every-3-steps": (3, 2, ("before_validation", "after_epoch_save"), signal.SIGINT),
}
STOP_AT, STOP_CODES = 20, {signal.SIGTERM: 143, signal.SIGINT: 130}


@pytest.mark.parametrize(
    ("every_n_train_steps", "seed", "at_boundaries", "stop"), list(CHAINS.values()), ids=list(CHAINS)
)
def test_any_chain_of_sigkills_and_stop_signals_resumes_to_the_uninterrupted_run(
    tmp_path: Path,
    mnist1d_reference,
    every_n_train_steps: int,
    seed: int,
    at_boundaries: tuple[str, ...],
    stop: signal.Signals,
):
    data_root, reference = mnist1d_reference
    run_dir = tmp_path / "logs"
    args = fit_args(data_root, run_dir, every_n_train_steps)
    kills = random_chain(seed, every_n_train_steps, at_boundaries)
    assert {where for _, where in kills} >= {"batch_end", "during_save", *at_boundaries}
    assert STOP_AT not in {step for step, _ in kills}
    chain = sorted([(step, where, signal.SIGKILL) for step, where in kills] + [(STOP_AT, "batch_end", stop)])
    for i, (step, where, signum) in enumerate(chain):
        out = run_cli(
            *args, *(["--ckpt_path=last"] if i else []), *kill(step, where, signum), cwd=tmp_path, check=False
        )
        if signum == signal.SIGKILL:
            assert out.returncode == -signal.SIGKILL, f"{(step, where)} did not die:\n{out.stderr[-3000:]}"
            continue
        said = refused(
            out,
            f"Stopped by {signum.name} at training step {step}.",
            "--ckpt_path=last",
            code=STOP_CODES[signum],
        )
        assert f"last.ckpt holds step {step}" in said
        assert last_state(run_dir)["global_step"] == step
    resumed_from = last_state(run_dir)["global_step"] if list(run_dir.rglob("last.ckpt")) else 0
    out = run_cli(*args, "--ckpt_path=last", cwd=tmp_path)
    assert "Traceback" not in out.stderr and "not available" not in out.stderr
    assert_same_run(reference, run_dir, resumed_from)


def test_a_kill_chain_on_ag_news_with_weight_averaging_and_mixup(tmp_path: Path):
    ag_news = config("ag_news_cnn_bn")  # EMA weights, feature mixup, word dropout: all random or stateful
    steps = 6  # 86 training texts in batches of 16
    reference, run_dir = tmp_path / "reference", tmp_path / "logs"
    run_cli(*fit_args(tmp_path, reference, 2, ag_news), cwd=tmp_path)
    # Mid-epoch (mixup, word dropout) and between training and validation (EMA swaps its weights in);
    # the mnist1d chains kill during saves.
    for i, (step, where) in enumerate([(3, "batch_end"), (steps, "before_validation")]):
        out = run_cli(
            *fit_args(tmp_path, run_dir, 2, ag_news),
            *(["--ckpt_path=last"] if i else []),
            *kill(step, where),
            cwd=tmp_path,
            check=False,
        )
        assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    resumed_from = last_state(run_dir)["global_step"]
    run_cli(*fit_args(tmp_path, run_dir, 2, ag_news), "--ckpt_path=last", cwd=tmp_path)
    assert_same_run(reference, run_dir, resumed_from)


# ---------------------------------------------------------------------------------- which run resumes
def short(tmp_path: Path, *extra: str) -> list[str]:
    """A tiny run without a schedule, so a resume may extend it (a one-cycle run keeps its length)."""
    return [
        "fit", "--config", MNIST1D, *tiny_mnist1d(tmp_path), "--trainer.enable_progress_bar=false",
        "--test_after_fit=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--model.init_args.lr_scheduler=null", *extra,
    ]  # fmt: skip


# Settings other than the config's (optimiser, rate), so a resume or a refusal shows it went by them.
SETTINGS = [
    "--model.init_args.lr=0.001",
    "--model.init_args.optimizer=RMSprop",
    "--model.init_args.optimizer.init_args.alpha=0.9",
]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A finished one-epoch run of :func:`short` with :data:`SETTINGS` (data cache and logs), fitted
    once for the module."""
    root = tmp_path_factory.mktemp("one_epoch")
    run_cli(*short(root, *SETTINGS, "--trainer.max_epochs=1"), cwd=root)
    return root


def copy_of(one_epoch: Path, tmp_path: Path) -> None:
    """The one-epoch run copied into ``tmp_path``, where :func:`short` (tmp_path) resumes it."""
    shutil.copytree(one_epoch, tmp_path, dirs_exist_ok=True)


def test_ckpt_path_last_resumes_only_the_run_the_command_describes(tmp_path: Path, one_epoch: Path):
    a = SETTINGS  # lr 0.001
    b = ["--model.init_args.lr=0.05", "--model.init_args.dropout=0.4"]
    copy_of(one_epoch, tmp_path)  # version_0
    run_cli(*short(tmp_path, *b, "--trainer.max_epochs=1"), cwd=tmp_path)  # version_1, the newest
    root = tmp_path / "logs" / "mnist1d_resnet_bn"

    out = run_cli(*short(tmp_path, *a, "--trainer.max_epochs=2", "--ckpt_path=last"), cwd=tmp_path)
    assert f"{root}/version_0/checkpoints/last.ckpt" in out.stdout + out.stderr
    assert torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert torch.load(root / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert (
        yaml.safe_load((root / "version_1" / "config.yaml").read_text())["model"]["init_args"]["lr"] == 0.05
    )

    # settings of no run: refused, naming the runs and what differs; nothing is written
    other = run_cli(
        *short(tmp_path, *a, "--model.init_args.lr=0.02", "--ckpt_path=last"), cwd=tmp_path, check=False
    )
    said = refused(other, "--ckpt_path=last: no run under", "version_0: model.init_args.lr: 0.001 -> 0.02")
    assert f"version_1: model.init_args.dropout: 0.4 -> {DROPOUT}" in said
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]

    # a run named explicitly: its folder, if the settings match
    named = ["--trainer.logger.init_args.version=1", "--ckpt_path=last", "--trainer.max_epochs=2"]
    run_cli(*short(tmp_path, *b, *named), cwd=tmp_path)
    assert torch.load(root / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    mismatch = run_cli(*short(tmp_path, *a, *named), cwd=tmp_path, check=False)
    refused(mismatch, f"version_1: model.init_args.dropout: 0.4 -> {DROPOUT}")


def test_a_run_being_resumed_cannot_be_resumed_twice_and_a_kill_frees_it_for_fit_from_its_file(
    tmp_path: Path, one_epoch: Path
):
    copy_of(one_epoch, tmp_path)
    first = start_cli(
        *short(tmp_path, *SETTINGS, "--trainer.max_epochs=100000", "--ckpt_path=last"), cwd=tmp_path
    )
    try:
        lock = tmp_path / "logs" / "mnist1d_resnet_bn" / "version_0" / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text() == f"process {first.pid}"):  # not the 1-epoch run's
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # Paused, it holds its lock however fast the machine: early stopping cannot end it meanwhile.
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before it could be paused"
        second = run_cli(
            *short(tmp_path, *SETTINGS, "--trainer.max_epochs=100000", "--ckpt_path=last"),
            cwd=tmp_path,
            check=False,
        )
        refused(second, "version_0 is in use by process", "Wait for it to finish")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # freed, it continues: here by its file, which keeps the configured optimizer (RMSprop's state)
    ckpt = lock.parent / "checkpoints" / "last.ckpt"
    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    again = run_cli(
        *short(tmp_path, *SETTINGS, f"--trainer.max_epochs={epoch + 2}", f"--ckpt_path={ckpt}"), cwd=tmp_path
    )
    assert "Restored all states" in again.stdout + again.stderr
    state = torch.load(ckpt, weights_only=True)  # the same run folder's last.ckpt, continued
    assert state["epoch"] == epoch + 1
    assert "square_avg" in next(iter(state["optimizer_states"][0]["state"].values()))
    saved = yaml.safe_load((ckpt.parents[1] / "config.yaml").read_text())["model"]["init_args"]
    assert saved["optimizer"]["class_path"] == "torch.optim.RMSprop" and saved["lr_scheduler"] is None


def test_fit_from_a_file_refuses_other_model_settings(tmp_path: Path, one_epoch: Path):
    copy_of(one_epoch, tmp_path)
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    other = run_cli(
        *short(tmp_path, *SETTINGS, "--model.init_args.dropout=0.4", f"--ckpt_path={ckpt}"),
        cwd=tmp_path,
        check=False,
    )
    refused(
        other,
        "was trained with other model settings",
        f"model.init_args.dropout: 0.4 -> {DROPOUT}",
        "start a new run",
    )


# ---------------------------------------------------------------------------------- disk faults
def _limit_file_size() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # events fit, a checkpoint does not


def test_a_full_disk_during_a_save_is_a_one_line_error_and_keeps_the_previous_checkpoint(
    tmp_path: Path, one_epoch: Path
):
    copy_of(one_epoch, tmp_path)
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    before = last.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "src.cli", *short(tmp_path, *SETTINGS, "--trainer.max_epochs=3", "--ckpt_path=last")],
        cwd=tmp_path, env=env(), capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300,
    )  # fmt: skip
    refused(proc, "error: could not write checkpoint", "The previous checkpoints are intact", code=1)
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if ".tmp" in p.name]


def test_a_read_only_checkpoint_folder_is_a_one_line_error(tmp_path: Path, one_epoch: Path):
    copy_of(one_epoch, tmp_path)
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    before = last.read_bytes()
    prefix = read_only(last.parent)
    if prefix is None:
        pytest.skip(
            "running as root without mount namespaces (unshare -m): no way to make a folder read-only"
        )
    last.parent.chmod(0o555)  # for a non-root user; root gets a read-only mount
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "src.cli", *short(tmp_path, *SETTINGS, "--trainer.max_epochs=3", "--ckpt_path=last")],
            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        last.parent.chmod(0o755)
    refused(proc, "error: could not write checkpoint", "The previous checkpoints are intact", code=1)
    assert any(reason in proc.stderr for reason in ("Read-only file system", "Permission denied"))
    assert last.read_bytes() == before


# A file that is not a checkpoint (settings text, random bytes): tests/test_refused_commands.py.
