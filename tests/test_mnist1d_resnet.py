"""MNIST-1D DataModule and the residual-BN model."""

from __future__ import annotations

import torch
from torch import nn

from src.data import MNIST1D, TensorBatches
from src.data.mnist1d import random_circular_shift
from src.models import ResidualBN, ResidualBNNet


def tiny_data(tmp_path, **kwargs) -> MNIST1D:
    args = {"cache_dir": str(tmp_path / "cache"), "num_samples": 600, "val_size": 60, "batch_size": 32}
    return MNIST1D(**{**args, **kwargs})


def test_network_shapes_and_parameter_count():
    net = ResidualBNNet(input_size=40, num_classes=10, hidden_size=100, num_blocks=5)
    assert net(torch.randn(8, 40)).shape == (8, 10)
    linear = lambda i, o: i * o + o  # noqa: E731
    expected = linear(40, 100) + 5 * (linear(100, 100) + 2 * 100) + linear(100, 10)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_batch_norm_off_removes_every_batchnorm_layer():
    on = ResidualBNNet(40, 10, batch_norm=True)
    off = ResidualBNNet(40, 10, batch_norm=False)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in on.modules()) == 5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in off.modules())


def test_bn_position_orders_layers():
    after = ResidualBNNet(40, 10, bn_position="after_activation")
    assert isinstance(after.blocks[0].norm_act[0], nn.ReLU)
    assert isinstance(after.blocks[0].norm_act[1], nn.BatchNorm1d)


def test_overfits_one_fixed_batch():
    torch.manual_seed(0)
    model = ResidualBN(input_size=40, num_classes=10)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 1.5
    assert loss.item() < 0.05


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


def test_corrupt_cache_gives_clear_error(tmp_path):
    dm = tiny_data(tmp_path)
    dm.cache_file.parent.mkdir(parents=True)
    dm.cache_file.write_bytes(b"not a tensor file")
    try:
        dm.setup("fit")
    except RuntimeError as err:
        assert "Delete the file" in str(err)
    else:
        raise AssertionError("a corrupt cache must raise")


def test_tensor_batches_cover_every_sample_once_and_replay_per_epoch():
    x = torch.arange(103)
    loader = TensorBatches((x, x), batch_size=10, shuffle=True, seed=7)
    assert len(loader) == 11
    loader.set_epoch(0)
    epoch0 = torch.cat([b[0] for b in loader])
    assert sorted(epoch0.tolist()) == list(range(103))
    loader.set_epoch(1)
    epoch1 = torch.cat([b[0] for b in loader])
    assert not torch.equal(epoch0, epoch1)
    loader.set_epoch(0)
    assert torch.equal(torch.cat([b[0] for b in loader]), epoch0)  # a resumed run replays epoch 0
    ordered = TensorBatches((x, x), batch_size=10)
    assert torch.equal(torch.cat([b[0] for b in ordered]), x)


def test_circular_shift_is_a_per_sample_roll():
    x = torch.arange(40.0).repeat(50, 1)
    shifted = random_circular_shift(x, 3)
    shifts = set()
    for row in shifted:
        matches = [s for s in range(-3, 4) if torch.equal(row, torch.roll(x[0], s))]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 1  # offsets differ between samples
