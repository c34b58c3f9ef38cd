"""Checkpoint files: atomic writes that leave the previous file and no temporary file behind on any
failure, loads that never run code, and errors that name the real cause."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.runtime.checkpoints import CheckpointError, CheckpointWriteError, SafeCheckpointIO, load_checkpoint
from tests.helpers.cli import ROOT


def _half_then(action):
    """A stand-in for torch.save that writes half of the real bytes, then fails via ``action``."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        action()

    return save


def ckpt(step: int, n: int = 1000) -> dict:
    return {"state_dict": {"w": torch.full((n,), float(step))}, "global_step": step}


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path: Path, monkeypatch):
    io_ = SafeCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint(ckpt(1), target)

    def crash():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", _half_then(crash))
    with pytest.raises(
        CheckpointWriteError, match="No space left on device. The previous checkpoints are intact"
    ):
        io_.save_checkpoint(ckpt(2), target)
    monkeypatch.undo()
    assert io_.load_checkpoint(target)["global_step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_a_full_disk_that_fails_again_on_close_still_removes_the_temporary_file(tmp_path: Path, monkeypatch):
    """Closing flushes the buffer, which fails a second time on a full disk: the file must go anyway."""
    io_ = SafeCheckpointIO(background_sync=False)
    target = tmp_path / "last.ckpt"
    io_.save_checkpoint(ckpt(1), target)
    real_open = open

    class FullDisk(io.BufferedWriter):
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            try:
                self.flush()
            finally:
                super().close()

    def full_open(path, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp" in str(path):
            return FullDisk(io.FileIO(path, "wb"))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        io_.save_checkpoint(ckpt(2), target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert load_checkpoint(target)["global_step"] == 1


def test_file_size_limit_in_a_real_process_is_a_write_error(tmp_path: Path):
    """The kernel refusing the write (RLIMIT_FSIZE: EFBIG, like ENOSPC) inside PyTorch's serialiser."""
    target = tmp_path / "ck" / "last.ckpt"
    script = f"""
import resource, signal, torch
from src.runtime.checkpoints import SafeCheckpointIO
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
io_ = SafeCheckpointIO()
io_.save_checkpoint({{"state_dict": {{"w": torch.ones(10)}}}}, {str(target)!r}); io_.flush()
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
io_.save_checkpoint({{"state_dict": {{"w": torch.ones(100_000)}}}}, {str(target)!r}); io_.flush()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "CheckpointWriteError" in proc.stderr and "File too large" in proc.stderr
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert load_checkpoint(target)["state_dict"]["w"].shape == (10,)


def test_background_sync_keeps_save_and_remove_order_and_reports_failures(tmp_path: Path, monkeypatch):
    io_ = SafeCheckpointIO()
    for step in range(3):  # best-k file, then last, then the previous best goes: as ModelCheckpoint does
        io_.save_checkpoint(ckpt(step), tmp_path / f"best{step}.ckpt")
        io_.save_checkpoint(ckpt(step), tmp_path / "last.ckpt")
        if step:
            io_.remove_checkpoint(tmp_path / f"best{step - 1}.ckpt")
    assert io_.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2  # loading waits for the writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best2.ckpt", "last.ckpt"]

    def no_disk(fd: int) -> None:
        raise OSError(errno.EIO, "disk gone")

    monkeypatch.setattr(os, "fsync", no_disk)
    io_.save_checkpoint(ckpt(3), tmp_path / "last.ckpt")
    with pytest.raises(CheckpointWriteError, match="disk gone"):
        io_.teardown()
    monkeypatch.undo()
    assert io_.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best2.ckpt", "last.ckpt"]


def test_sigkill_in_the_middle_of_a_write_leaves_the_previous_file_loadable(tmp_path: Path):
    target = tmp_path / "last.ckpt"
    script = f"""
import io, os, signal, torch
from src.runtime.checkpoints import SafeCheckpointIO
real_save = torch.save
def half_then_die(obj, f, *a, **k):
    buf = io.BytesIO(); real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
io_ = SafeCheckpointIO()
io_.save_checkpoint({{"state_dict": {{"w": torch.ones(100_000)}}, "global_step": 1}}, {str(target)!r})
torch.save = half_then_die
io_.save_checkpoint({{"state_dict": {{"w": torch.zeros(100_000)}}, "global_step": 2}}, {str(target)!r})
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(target)
    assert state["global_step"] == 1 and torch.equal(state["state_dict"]["w"], torch.ones(100_000))
    # the half-written temporary file is hidden and does not end in .ckpt: never taken for a checkpoint
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftovers and all(n.startswith(".last.ckpt.tmp") for n in leftovers)


# ---------------------------------------------------------------------------------- reading
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_needing_arbitrary_unpickling_is_refused_and_runs_nothing(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="pickled Python object") as info:
        load_checkpoint(evil)
    assert "weights_only=False" not in str(info.value)  # never advise loading untrusted pickles
    with pytest.raises(CheckpointError, match="refused"):
        SafeCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        (bytes(range(256)) * 8, "it is not a PyTorch Lightning checkpoint"),
        (b"trainer:\n  max_epochs: 3\n", "it is not a PyTorch Lightning checkpoint"),
        ("tensor", "a PyTorch file (a Tensor) but not a PyTorch Lightning checkpoint"),
        ("dict", "a PyTorch file (a dict without a state_dict) but not a PyTorch Lightning checkpoint"),
        ("truncated", "it is truncated or corrupt, e.g. a copy or a save that did not finish"),
    ],
    ids=["random-bytes", "yaml", "tensor", "plain-dict", "truncated"],
)
def test_a_file_that_is_not_a_checkpoint_says_so_and_what_to_pass(tmp_path: Path, content, cause: str):
    path = tmp_path / "thing.ckpt"
    if content == "tensor":
        torch.save(torch.ones(3), path)
    elif content == "dict":
        torch.save({"weights": torch.ones(3)}, path)
    elif content == "truncated":
        torch.save(ckpt(1, n=10_000), path)
        path.write_bytes(path.read_bytes()[:20_000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert cause in message and "Pass a .ckpt written by this project" in message
    assert "pickled" not in message


def test_an_unreadable_checkpoint_names_the_whole_ones_beside_it(tmp_path: Path):
    torch.save(ckpt(1), tmp_path / "last.ckpt")
    torch.save(ckpt(2), tmp_path / "epoch002.ckpt")
    (tmp_path / "broken.ckpt").write_bytes((tmp_path / "epoch002.ckpt").read_bytes()[:300])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "broken.ckpt")
    message = str(info.value)
    assert "Other checkpoints in its folder: " in message and message.endswith("pass one of those.")
    assert "last.ckpt" in message and "epoch002.ckpt" in message and "junk.ckpt" not in message


# ---------------------------------------------------------------------------------- one serialisation per state
def _state(w: torch.Tensor, step: int = 1) -> dict:
    """A fresh checkpoint dict over the live tensor ``w`` (as ``state_dict()`` detaches it) with a fresh
    small tensor of the same value each time (as metric and random-generator states are)."""
    return {"state_dict": {"w": w.detach()}, "rng": torch.tensor([7, 8, 9]), "global_step": step}


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls.append(obj["global_step"])
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return calls


@pytest.mark.parametrize("background_sync", [True, False])
def test_an_unchanged_state_is_linked_once_and_a_later_save_gets_its_own_inode(
    tmp_path: Path, monkeypatch, background_sync: bool
):
    calls = _counting(monkeypatch)
    io_ = SafeCheckpointIO(background_sync=background_sync)
    w = torch.zeros(1000)
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    io_.save_checkpoint(_state(w), best)
    with io_.reusing_the_last_save():
        io_.save_checkpoint(_state(w), last)
    io_.flush()
    assert calls == [1]  # serialised once
    assert best.stat().st_ino == last.stat().st_ino and best.read_bytes() == last.read_bytes()

    w.add_(1.0)  # a training step changes the weights in place; last.ckpt is saved again
    with io_.reusing_the_last_save():
        io_.save_checkpoint(_state(w, step=2), last)
    io_.teardown()
    assert calls == [1, 2]
    assert best.stat().st_ino != last.stat().st_ino  # the atomic replace made a new inode
    assert (load_checkpoint(best)["global_step"], load_checkpoint(best)["state_dict"]["w"][0]) == (1, 0.0)
    assert (load_checkpoint(last)["global_step"], load_checkpoint(last)["state_dict"]["w"][0]) == (2, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_any_difference_in_the_state_is_serialised(tmp_path: Path, monkeypatch):
    calls = _counting(monkeypatch)
    io_ = SafeCheckpointIO()
    w = torch.zeros(10)
    io_.save_checkpoint(_state(w), tmp_path / "a.ckpt")
    io_.save_checkpoint(_state(w), tmp_path / "b.ckpt")  # not asked to reuse
    with io_.reusing_the_last_save():
        # fresh tensors with other bytes, a value more, 1 where there was 1.0
        io_.save_checkpoint({**_state(w), "rng": torch.tensor([7, 8, 0])}, tmp_path / "c.ckpt")
        io_.save_checkpoint({**_state(w), "callbacks": {"x": 1.0}}, tmp_path / "d.ckpt")
        io_.save_checkpoint({**_state(w), "callbacks": {"x": 1}}, tmp_path / "e.ckpt")
        io_.save_checkpoint({**_state(w), "callbacks": {"x": 1}}, tmp_path / "f.ckpt")  # the same: linked
        io_.flush()
        assert (tmp_path / "e.ckpt").stat().st_ino == (tmp_path / "f.ckpt").stat().st_ino
        io_.remove_checkpoint(tmp_path / "f.ckpt")  # nothing may link to a file that goes
        io_.save_checkpoint({**_state(w), "callbacks": {"x": 1}}, tmp_path / "g.ckpt")
        io_.save_checkpoint({**_state(w), "x": float("nan")}, tmp_path / "h.ckpt")  # NaN: never vouched for
        io_.save_checkpoint({**_state(w), "x": float("nan")}, tmp_path / "i.ckpt")
    io_.teardown()
    assert len(calls) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{c}.ckpt" for c in "abcdeghi"]


def test_where_hard_links_fail_the_state_is_copied(tmp_path: Path, monkeypatch):
    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    io_ = SafeCheckpointIO()
    w = torch.zeros(10)
    io_.save_checkpoint(_state(w), tmp_path / "best.ckpt")
    with io_.reusing_the_last_save():
        io_.save_checkpoint(_state(w), tmp_path / "last.ckpt")
    io_.teardown()
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    assert best.stat().st_ino != last.stat().st_ino and best.read_bytes() == last.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_a_best_and_last_epoch_is_serialised_once_and_both_files_load_as_before(tmp_path: Path):
    """Epoch 0 is the best so far and the last: one serialisation, two names. Epoch 1 is serialised
    once too, as last.ckpt alone or as a new best that last.ckpt links to."""
    from tests.helpers.cli import config, run_cli
    from tests.helpers.data import quiet, tiny_mnist1d

    run_cli(
        "fit", "--config", config("mnist1d_resnet_bn"), *tiny_mnist1d(tmp_path), *quiet(tmp_path, max_epochs=2),
        "--trainer.callbacks+=tests.helpers.saves.CountSaves",
    )  # fmt: skip
    run = tmp_path / "logs" / "mnist1d_resnet_bn" / "version_0"
    assert json.loads((run / "serialised_steps.json").read_text()) == [14, 28]  # 14 steps an epoch
    last = run / "checkpoints" / "last.ckpt"
    (best,) = (run / "checkpoints").glob("epoch*.ckpt")
    a, b = load_checkpoint(best), load_checkpoint(last)
    assert b["epoch"] == 1 and a["epoch"] == int(best.name[5:8])
    assert (best.stat().st_ino == last.stat().st_ino) == (a["epoch"] == 1)
    for ckpt_ in (a, b):  # both carry the ModelCheckpoint bookkeeping naming the best file
        (bookkeeping,) = (v for k, v in ckpt_["callbacks"].items() if k.startswith("ModelCheckpoint"))
        assert Path(bookkeeping["best_model_path"]) == best
