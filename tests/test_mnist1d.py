"""MNIST-1D DataModule: generation, cache, splits, batches and augmentation."""

from __future__ import annotations

import pytest
import torch

from src.data import MNIST1D
from src.data.mnist1d import random_circular_shift


def tiny_data(tmp_path, **kwargs) -> MNIST1D:
    args = {"cache_dir": str(tmp_path / "cache"), "num_samples": 600, "val_size": 60, "batch_size": 32}
    return MNIST1D(**{**args, **kwargs})


def test_datamodule_splits_and_links(tmp_path):
    dm = tiny_data(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    (xt, yt), (xv, _yv), (xs, _ys) = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert xt.shape == (480 - 60, 40) and xv.shape == (60, 40) and xs.shape == (120, 40)
    assert xt.dtype == torch.float32 and yt.dtype == torch.long
    assert (dm.num_classes, dm.input_size) == (10, 40)
    # the validation split is carved with a fixed seed: the same samples every time
    dm2 = tiny_data(tmp_path)
    dm2.setup("fit")
    assert torch.equal(dm2.splits["val"][0], xv)


def test_cache_is_reused(tmp_path, monkeypatch):
    tiny_data(tmp_path).prepare_data()

    def fail(*args, **kwargs):
        raise AssertionError("the dataset was generated again instead of read from the cache")

    monkeypatch.setattr("mnist1d.data.make_dataset", fail)
    dm = tiny_data(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.splits["test"][0]) == 120


def test_a_truncated_cache_is_rebuilt_with_a_warning(tmp_path):
    dm = tiny_data(tmp_path)
    dm.prepare_data()
    good = dm.cache_file.read_bytes()
    dm.cache_file.write_bytes(good[: len(good) // 2])
    fresh = tiny_data(tmp_path)
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        fresh.setup("fit")
    assert len(fresh.splits["test"][0]) == 120
    assert torch.load(dm.cache_file, weights_only=True)["x"].shape == (480, 40)


def test_circular_shift_is_a_per_sample_roll():
    x = torch.arange(40.0).repeat(50, 1)
    shifted = random_circular_shift(x, 3)
    shifts = set()
    for row in shifted:
        matches = [s for s in range(-3, 4) if torch.equal(row, torch.roll(x[0], s))]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 1  # offsets differ between samples
