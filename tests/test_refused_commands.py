"""A refused command says why in one line, exits 2 and leaves nothing behind: every kind of bad
``--ckpt_path`` (each on a subcommand, so that every subcommand meets it with and without ``--config``:
one check refuses them all, before a subcommand does anything), a checkpoint without the data's fitted
state, and bad data settings."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import config, refused, run_cli
from tests.helpers.data import quiet, tiny_mnist1d, tiny_toy_blobs
from tests.helpers.serving import tiny_checkpoint
from tests.pair import CONFIG as TOY

pytestmark = pytest.mark.slow

MNIST1D = config("mnist1d_resnet_bn")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# What each kind of path is, and a fragment of what the command must say about it.
KINDS = {
    "random-bytes": "it is not a PyTorch Lightning checkpoint",
    "text": "it is not a PyTorch Lightning checkpoint",
    "truncated": "it is truncated or corrupt",
    "folder": "is a folder",
    "missing": "is not a file",
    "best": "--ckpt_path=best names the best checkpoint of a fit in the same command",
    "hpc": "which this project does not write",
    "registry": "online model registry, which this project does not use",
}


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def snapshot(root: Path) -> dict[str, str]:
    """Each path under ``root`` and what it holds (a file's digest; ``folder`` for a folder)."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in root.rglob("*")
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, runs_root: Path) -> Path:
    """A folder holding a copy of a tiny MNIST-1D run's checkpoints (its best and last.ckpt), a
    truncated copy of the best beside them, a file of random bytes, a text file (settings, not a
    checkpoint) and a folder named like a checkpoint."""
    folder = tmp_path_factory.mktemp("run") / "ckpts"
    shutil.copytree(tiny_checkpoint("mnist1d_resnet_bn", runs_root).parent, folder)
    best = next(folder.glob("epoch*.ckpt"))
    (folder / "truncated.ckpt").write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    (folder / "random.ckpt").write_bytes(bytes(range(256)) * 40)
    (folder / "notes.ckpt").write_text("trainer:\n  max_epochs: 3\n")
    (folder / "folder.ckpt").mkdir()
    return folder


def path_of(kind: str, folder: Path) -> str:
    named = {
        "random-bytes": "random.ckpt",
        "text": "notes.ckpt",
        "truncated": "truncated.ckpt",
        "folder": "folder.ckpt",
    }
    if kind in named:
        return str(folder / named[kind])
    return str(folder / "nowhere" / "last.ckpt") if kind == "missing" else kind


# Each kind once, on one subcommand; the eight cases hold every subcommand with and without --config.
CASES = [
    ("random-bytes", "fit", True), ("hpc", "fit", False), ("registry", "validate", True),
    ("truncated", "validate", False), ("best", "test", True), ("missing", "test", False),
    ("folder", "predict", True), ("text", "predict", False),
]  # fmt: skip
assert {k for k, _, _ in CASES} == set(KINDS) and {(s, c) for _, s, c in CASES} == {
    (s, c) for s in SUBCOMMANDS for c in (True, False)
}


@pytest.mark.parametrize(
    ("kind", "subcommand", "with_config"),
    CASES,
    ids=[f"{k}-{s}-{'config' if c else 'no-config'}" for k, s, c in CASES],
)
def test_a_bad_checkpoint_path_is_refused_before_anything_reads_it(
    checkpoints: Path, tmp_path: Path, kind: str, subcommand: str, with_config: bool
):
    before = snapshot(checkpoints)
    settings = (
        ["--config", MNIST1D, f"--data.init_args.cache_dir={tmp_path / 'cache'}"] if with_config else []
    )
    out = run_cli(
        subcommand, *settings, f"--ckpt_path={path_of(kind, checkpoints)}", cwd=tmp_path, check=False
    )
    said = refused(out, KINDS[kind])
    assert "weights_only" not in said and "pickled" not in said and len(said.strip().splitlines()) == 1, said
    assert files(tmp_path) == set(), f"a refused command left {files(tmp_path)}"  # no run folder, no cache
    assert snapshot(checkpoints) == before  # no file read is changed, none added
    if kind == "truncated":  # it names the checkpoints beside it that look whole
        assert "Other checkpoints in its folder: " in said and "last.ckpt" in said, said
        assert next(checkpoints.glob("epoch*.ckpt")).name in said
        assert "random.ckpt" not in said and "notes.ckpt" not in said
        assert said.rstrip().endswith("pass one of those."), said  # PyTorch's reason quoted whole, not cut


@pytest.fixture(scope="module")
def stateless(tmp_path_factory) -> tuple[Path, Path]:
    """A fit of the test pair (its normalisation is fitted on the training part), and copies of its
    last.ckpt without that state: all of it removed, or one of its two statistics."""
    root = tmp_path_factory.mktemp("pair")
    run_cli(
        "fit",
        "--config",
        str(TOY),
        *tiny_toy_blobs(root),
        *quiet(root),
        "--trainer.accelerator=cpu",
        cwd=root,
    )
    ckpt = torch.load(next(root.rglob("last.ckpt")), weights_only=True)
    state = ckpt.pop("ToyBlobs")
    torch.save(ckpt, root / "no_state.ckpt")
    torch.save({**ckpt, "ToyBlobs": {"mean": state["mean"]}}, root / "half_state.ckpt")
    return root, root / "blobs"


@pytest.mark.parametrize(
    ("subcommand", "ckpt", "with_config"),
    [("validate", "half_state", False), ("test", "no_state", True), ("predict", "no_state", False)],
)  # fmt: skip
def test_a_checkpoint_without_the_fitted_data_state_is_refused_not_refitted(
    stateless: tuple[Path, Path], tmp_path: Path, subcommand: str, ckpt: str, with_config: bool
):
    root, data = stateless
    settings = ["--config", str(TOY)] if with_config else []
    inputs = ["--data.init_args.predict_inputs=[[1, 2, 3, 4, 5, 6]]"] if subcommand == "predict" else []
    out = run_cli(
        subcommand, *settings, f"--data.init_args.data_root={data}", *inputs,
        f"--ckpt_path={root / f'{ckpt}.ckpt'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    said = refused(
        out, "lacks the data's fitted state", "ToyBlobs has no feature normalisation", "as `fit` wrote it"
    )
    assert len(said.strip().splitlines()) == 1 + said.count("Seed set to"), said
    assert files(tmp_path) == set(), f"a refused command left {files(tmp_path)}"


def test_a_data_error_leaves_no_run_folder_and_no_log_folder(tmp_path: Path):
    logs = tmp_path / "new" / "logs"
    out = run_cli(
        "fit", "--config", MNIST1D, *tiny_mnist1d(tmp_path), *quiet(tmp_path),
        "--data.init_args.val_size=100000", f"--trainer.logger.init_args.save_dir={logs}", cwd=tmp_path, check=False,
    )  # fmt: skip
    refused(out, "val_size=100000 leaves no training or no validation data")
    assert not (tmp_path / "new").exists(), files(tmp_path / "new")
