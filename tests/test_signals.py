"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) in every phase of every command, as a user
meets them: exit 143 / 130 (never 0), no traceback, one line saying what was finished, what was not
and the command that redoes the rest, and the files that line names.

The signal is sent by ``tests.helpers.faults.SignalAt`` at a seeded random point of each phase (a
few points, not dozens), and from outside the process at a point the run prints. One handler takes
both signals, so each phase meets one of them and the two alternate over the phases (each several
times); validation meets both, as their points fall in different epochs.
"""

from __future__ import annotations

import random
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import config, env, refused, run_cli
from tests.helpers.data import tiny_mnist1d

pytestmark = pytest.mark.slow

MNIST1D = config("mnist1d_resnet_bn")
CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
SIGNALS = pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])

# Tiny MNIST-1D in batches of 32 (420 training signals: 14 steps an epoch), 2 epochs; evaluation in
# batches of 16: validation 4 batches (60 signals), test and predict 8 (120), the sanity check 2.
STEPS, EPOCHS, VAL_BATCHES, TEST_BATCHES = 14, 2, 4, 8
SAVE_EVERY = 4  # LastCheckpoint's step saves in the save-phase runs


def fit_args(root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", MNIST1D, *tiny_mnist1d(root), "--data.init_args.eval_batch_size=16",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}", f"--trainer.max_epochs={EPOCHS}",
        "--trainer.enable_progress_bar=false", "--test_after_fit=true", *extra,
    ]  # fmt: skip


def signal_at(phase: str, at: int, signum: int, *extra: str) -> list[str]:
    return [
        "--trainer.callbacks+=tests.helpers.faults.SignalAt", f"--trainer.callbacks.phase={phase}",
        f"--trainer.callbacks.at={at}", f"--trainer.callbacks.signum={int(signum)}", *extra,
    ]  # fmt: skip


def stopped(out: subprocess.CompletedProcess, signum: int, *fragments: str) -> str:
    """The exit status of the signal, no traceback, and the one line (the last on stderr) that says
    what happened, holding every fragment."""
    refused(out, code=CODES[signum])
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Stopped by {signal.Signals(signum).name}") or "at once" in line, line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def last_step(root: Path) -> int:
    return torch.load(next(root.rglob("last.ckpt")), weights_only=True)["global_step"]


def point(phase: str, signum: int, low: int, high: int) -> int:
    """A seeded random point in [low, high] for this phase and signal."""
    return random.Random(f"{phase}-{int(signum)}").randint(low, high)


def with_signal(signum: signal.Signals) -> pytest.MarkDecorator:
    """The one signal a phase meets (the test's id names it)."""
    return pytest.mark.parametrize("signum", [signum], ids=[signum.name])


# ---------------------------------------------------------------------------------- fit, phase by phase
@with_signal(signal.SIGTERM)
def test_a_signal_during_the_sanity_check_stops_before_training(tmp_path: Path, signum: int):
    at = point("sanity", signum, 0, 1)
    out = run_cli(*fit_args(tmp_path, *signal_at("sanity", at, signum)), cwd=tmp_path, check=False)
    stopped(
        out, signum, "during the sanity check, before training step 0.",
        "No checkpoint to resume from was written; run the command again: python -m src.cli fit --config",
    )  # fmt: skip
    assert not list(tmp_path.rglob("*.ckpt"))


@with_signal(signal.SIGINT)
def test_a_signal_during_training_saves_the_step_and_says_how_to_resume(tmp_path: Path, signum: int):
    step = point("train", signum, 1, EPOCHS * STEPS - 1)
    out = run_cli(*fit_args(tmp_path, *signal_at("train", step, signum)), cwd=tmp_path, check=False)
    line = stopped(out, signum, f"at training step {step}.", f"last.ckpt holds step {step};", "Resume with: ")
    assert last_step(tmp_path) == step
    resume = shlex.split(line.split("Resume with: ", 1)[1])
    assert resume[:4] == ["python", "-m", "src.cli", "fit"] and resume[-1] == "--ckpt_path=last"


@SIGNALS  # SIGTERM's point is in the last epoch, SIGINT's in the first
def test_a_signal_during_validation_finishes_it_saves_the_epoch_and_stops(tmp_path: Path, signum: int):
    at = point("validation", signum, 0, EPOCHS * VAL_BATCHES - 1)  # in the first or the last epoch
    out = run_cli(*fit_args(tmp_path, *signal_at("validation", at, signum)), cwd=tmp_path, check=False)
    epoch_end = (at // VAL_BATCHES + 1) * STEPS
    if epoch_end < EPOCHS * STEPS:  # stops before the next epoch
        stopped(out, signum, f"at training step {epoch_end}.", f"last.ckpt holds step {epoch_end};")
    else:  # the fit is done: the test after fit does not start
        stopped(
            out, signum, "during the test after fit, before its first batch", "the fit finished at step 28"
        )
    assert last_step(tmp_path) == epoch_end
    assert not list(tmp_path.rglob("per_class_report.json"))


@with_signal(signal.SIGTERM)
def test_a_signal_during_a_checkpoint_save_lets_the_save_finish(tmp_path: Path, signum: int):
    at = point("save", signum, 1, EPOCHS * STEPS - 1)
    every = f"--callbacks.LastCheckpoint.every_n_train_steps={SAVE_EVERY}"
    out = run_cli(*fit_args(tmp_path, every, *signal_at("save", at, signum)), cwd=tmp_path, check=False)
    # The first save at or after `at`: a step save, or both checkpoints at an epoch's end.
    saves = sorted(
        {s for s in range(SAVE_EVERY, EPOCHS * STEPS, SAVE_EVERY) if s % STEPS} | {STEPS, 2 * STEPS}
    )
    step = next(s for s in saves if s >= at)
    if step < EPOCHS * STEPS:
        stopped(out, signum, f"at training step {step}.", f"last.ckpt holds step {step};")
    else:
        stopped(out, signum, "during the test after fit", "the fit finished at step 28")
    assert last_step(tmp_path) == step  # the interrupted save is whole
    assert not list(tmp_path.rglob(".*.tmp*"))


@with_signal(signal.SIGINT)
def test_a_signal_during_the_test_after_fit_names_the_test_command(tmp_path: Path, signum: int):
    at = point("test", signum, 0, TEST_BATCHES - 2)
    out = run_cli(*fit_args(tmp_path, *signal_at("test", at, signum)), cwd=tmp_path, check=False)
    line = stopped(
        out, signum, f"during the test after fit, after {at + 1} of {TEST_BATCHES} batch(es)",
        "the fit finished at step 28; no test results were reported.", "Test it with: python -m src.cli test",
    )  # fmt: skip
    assert not list(tmp_path.rglob("per_class_report.json")) and last_step(tmp_path) == 28
    command = shlex.split(line.split("Test it with: ", 1)[1])
    tested = Path(command[-1].split("=", 1)[1])
    assert tested.is_file() and re.fullmatch(r"epoch\d{3}-val_acc[\d.]+\.ckpt", tested.name), tested
    if signum == signal.SIGINT:  # the command it names does the test (the run's SignalAt moved past its end)
        run_cli(*command[3:], "--callbacks.SignalAt.at=1000", cwd=tmp_path)
        assert list(tmp_path.rglob("per_class_report.json"))


@with_signal(signal.SIGTERM)
def test_a_signal_while_the_run_is_built_stops_at_once_and_leaves_nothing(tmp_path: Path, signum: int):
    out = run_cli(*fit_args(tmp_path, *signal_at("init", 0, signum)), cwd=tmp_path, check=False)
    stopped(out, signum, "before the run started: nothing was run. Run it again: python -m src.cli fit")
    assert not list((tmp_path / "logs").rglob("version_*"))


# A second Ctrl-C stops at once and keeps the last save: tests/test_cli.py's stopped_fit (two Ctrl-C at
# step 7 of a run saving every 5 steps).


# ---------------------------------------------------------------------------------- validate, test, predict
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny fit: its folder and last.ckpt."""
    root = tmp_path_factory.mktemp("finished")
    run_cli(*fit_args(root, "--test_after_fit=false"), cwd=root)
    return root, next(root.rglob("last.ckpt"))


@pytest.mark.parametrize(
    ("command", "phase", "batches", "output", "signum"),
    [
        ("validate", "validation", VAL_BATCHES, None, signal.SIGTERM),
        ("test", "test", TEST_BATCHES, "per_class_report.json", signal.SIGINT),
        ("predict", "predict", TEST_BATCHES, "predictions.csv", signal.SIGTERM),
    ],
    ids=["validate-SIGTERM", "test-SIGINT", "predict-SIGTERM"],
)  # predict meets SIGINT from outside, below
def test_a_signal_stops_a_checkpoint_command_after_the_current_batch(
    finished, tmp_path: Path, command: str, phase: str, batches: int, output: str | None, signum: int
):
    root, ckpt = finished
    at = point(command, signum, 0, batches - 2)
    out = run_cli(command, "--ckpt_path", str(ckpt), *signal_at(phase, at, signum), cwd=tmp_path, check=False)
    line = stopped(
        out, signum, f"during {command}, after {at + 1} of {batches} batch(es): no results were reported",
        f"Run it again: python -m src.cli {command} --ckpt_path {ckpt}",
    )  # fmt: skip
    assert shlex.split(line.split("Run it again: ", 1)[1])[3:6] == [command, "--ckpt_path", str(ckpt)]
    if output:
        assert not [p for p in root.rglob(output) if "version_0" not in str(p)]


# ---------------------------------------------------------------------------------- from outside
@pytest.mark.parametrize(
    ("command", "phase", "signum"),
    [("fit", "test", signal.SIGTERM), ("predict", "predict", signal.SIGINT)],
    ids=["SIGTERM-test-after-fit", "Ctrl-C-predict"],
)
def test_a_signal_from_outside_stops_the_command(
    finished, tmp_path: Path, command: str, phase: str, signum: int
):
    """The two cases a probe saw end with exit 0 (the test after fit) and exit 1 (Ctrl-C in predict)."""
    root, ckpt = finished
    go = tmp_path / "go"
    pause = signal_at(phase, 2, signum, f"--trainer.callbacks.pause_until={go}")
    args = [*fit_args(tmp_path), *pause] if command == "fit" else [command, "--ckpt_path", str(ckpt), *pause]
    with (tmp_path / "stdout").open("w") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "src.cli", *args], cwd=tmp_path, env=env(),
            stdout=stdout, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        said = []
        for line in proc.stderr:  # the run prints `paused` at the chosen batch
            said.append(line)
            if line.strip() == "paused":
                break
        proc.send_signal(signum)
        go.touch()
        rest = proc.communicate(timeout=300)[1]
    out = subprocess.CompletedProcess(args, proc.returncode, "", "".join(said) + rest)
    where = "during the test after fit, after 3 of" if command == "fit" else "during predict, after 3 of"
    stopped(out, signum, where)
