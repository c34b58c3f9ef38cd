"""Provenance as a user meets it: a fit records the packages, the checkout's commit and the data's
fingerprint in its run folder and checkpoints (the test pair gets the fingerprint from the DataModule
base); a checkpoint-only command or a resume names in one line what differs from the checkpoint's
record, and says nothing for the same provenance or a checkpoint without one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy
import pytest
import torch

from src.runtime.provenance import CHECKPOINT_KEY, code_state, differences
from tests.helpers.cli import ROOT, run_cli
from tests.helpers.data import tiny_toy_blobs, write_blobs
from tests.pair import CONFIG

NOTE = "note: this checkpoint"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def fit_args(root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(CONFIG), *tiny_toy_blobs(root), *QUIET, "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}", "--test_after_fit=false",
        "--model.init_args.lr_scheduler=null", *extra,  # a schedule of its own length: a resume may extend it
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a one-epoch fit of the test pair."""
    root = tmp_path_factory.mktemp("provenance")
    run_cli(*fit_args(root, "--trainer.max_epochs=1"), cwd=root)
    (run,) = (root / "logs").glob("*/version_0")
    return run


def edited(run: Path, to: Path, **changes: dict) -> Path:
    """A copy of the run's last.ckpt whose provenance has ``changes`` merged in; without changes, no provenance."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in changes.items():
        ckpt[CHECKPOINT_KEY][key] = {**ckpt[CHECKPOINT_KEY][key], **value}
    if not changes:
        del ckpt[CHECKPOINT_KEY]
    torch.save(ckpt, to)
    return to


def notes(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(NOTE)]


@pytest.mark.slow
def test_a_fit_records_its_provenance_in_the_run_folder_and_checkpoints(fitted: Path):
    record = json.loads((fitted / "provenance.json").read_text())
    assert record["packages"]["lightning"] and record["packages"]["torch"] == torch.__version__
    assert {"python", "torchmetrics", "jsonargparse", "numpy"} <= set(record["packages"])
    assert record["code"]["commit"] == git("rev-parse", "HEAD").strip()
    assert record["code"]["dirty"] == bool(git("status", "--porcelain", "--untracked-files=no").strip())
    assert record["data_fingerprint"].startswith("sha256:")  # the test pair's, from the base's default
    for ckpt in (fitted / "checkpoints").glob("*.ckpt"):
        assert torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY] == record


@pytest.mark.slow
def test_a_checkpoint_only_command_names_what_differs_in_one_line(fitted: Path, tmp_path: Path):
    head = git("rev-parse", "HEAD").strip()[:7]
    same = run_cli("test", f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}", *QUIET, cwd=tmp_path)
    assert notes(same) == []

    other = edited(
        fitted,
        tmp_path / "other.ckpt",
        packages={"lightning": "2.5.0"},
        code={"commit": "1a2b3c4" * 6, "dirty": False},  # whether or not this checkout has local changes
    )
    (line,) = notes(run_cli("test", f"--ckpt_path={other}", *QUIET, cwd=tmp_path))
    assert "lightning 2.5.0 (now " in line and f"code 1a2b3c4 (now {head}" in line, line
    assert "data" not in line and "torch" not in line, line

    # written before provenance was recorded: nothing to compare, not even with other data
    older = edited(fitted, tmp_path / "older.ckpt")
    elsewhere = write_blobs(tmp_path / "other_blobs", seed=5)
    said = run_cli(
        "predict", f"--ckpt_path={older}", *QUIET, f"--data.init_args.data_root={elsewhere}", cwd=tmp_path
    )
    assert notes(said) == []


@pytest.mark.slow
def test_a_resume_names_what_differs_and_continues(fitted: Path, tmp_path: Path):
    """Resumed on other data too: the fingerprint is of the data the command is given."""
    root = fitted.parents[2]
    other = edited(fitted, tmp_path / "other.ckpt", packages={"numpy": "1.0.0"})
    elsewhere = write_blobs(tmp_path / "other_blobs", seed=5)
    out = run_cli(
        *fit_args(
            root, "--trainer.max_epochs=2", f"--ckpt_path={other}", f"--data.init_args.data_root={elsewhere}"
        ),
        cwd=tmp_path,
    )
    (line,) = notes(out)
    assert line == (
        f"note: this checkpoint was made with numpy 1.0.0 (now {numpy.__version__}); "
        "its data fingerprint differs from this data's."
    ), line


def test_outside_a_git_checkout_or_without_git_the_code_is_unknown(tmp_path: Path, monkeypatch):
    assert code_state(tmp_path) == {"commit": "unknown", "dirty": "unknown"}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the PATH
    assert code_state.__wrapped__(ROOT) == {"commit": "unknown", "dirty": "unknown"}


def test_what_a_notice_names():
    now = {
        "packages": {"python": "3.11.7", "lightning": "2.6.6"},
        "code": {"commit": "5d6e7f8" + "0" * 33, "dirty": True},
        "data_fingerprint": "sha256:b",
    }
    saved = {
        "packages": {"python": "3.11.7", "lightning": "2.6.5"},
        "code": {"commit": "1a2b3c4" + "0" * 33, "dirty": False},
        "data_fingerprint": "sha256:a",
    }
    assert differences(saved, now) == (
        "note: this checkpoint was made with lightning 2.6.5 (now 2.6.6) and code 1a2b3c4 "
        "(now 5d6e7f8, dirty); its data fingerprint differs from this data's."
    )
    assert differences(now, now) is None
    other_data = {**now, "data_fingerprint": "sha256:a"}
    assert (
        differences(other_data, now) == "note: this checkpoint's data fingerprint differs from this data's."
    )
    assert differences(None, now) is None and differences("foreign", now) is None
    unknown = {**saved, "code": {"commit": "unknown", "dirty": "unknown"}, "data_fingerprint": None}
    assert differences(unknown, now) == "note: this checkpoint was made with lightning 2.6.5 (now 2.6.6)."
