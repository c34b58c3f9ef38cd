"""ActivationStats: the variance trend of residual blocks with and without BN, and what it logs in a fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from src.callbacks.activation_stats import ActivationStats, collect_activation_stats, tracked_modules
from src.data.base import ClassificationDataModule
from src.models.layers import NormAct
from src.models.residual_bn import ResidualBN
from tests.helpers.models import quiet_trainer


def block_variances(batch_norm: bool, seed: int) -> list[float]:
    torch.manual_seed(seed)
    net = ResidualBN(num_classes=10, input_size=40, hidden_size=100, num_blocks=5, batch_norm=batch_norm).net
    stats = collect_activation_stats(net, torch.randn(200, 40))
    return [stats[f"blocks.{i}"][1] for i in range(5)]


def growth_per_block(variances: list[float]) -> float:
    return (variances[-1] / variances[0]) ** (1 / (len(variances) - 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_variance_doubles_per_block_without_bn_and_stays_tame_with_bn(seed: int):
    plain, with_bn = block_variances(False, seed), block_variances(True, seed)
    assert growth_per_block(plain) > 1.5, plain
    assert 20 < plain[-1] < 40, plain  # about 27 after five blocks (docs/provenance.md)
    assert growth_per_block(with_bn) < 1.3, with_bn
    assert with_bn[-1] < 8, with_bn


def test_collecting_stats_leaves_running_statistics_and_rng_alone():
    torch.manual_seed(0)
    net = ResidualBN(num_classes=10, input_size=40, batch_norm=True, dropout=0.2).net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(32, 40) * 5 + 3
    rng = torch.get_rng_state()
    collect_activation_stats(net, x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert not net.training  # mode restored


def test_collecting_stats_puts_each_module_mode_back():
    net = ResidualBN(num_classes=10, input_size=40, batch_norm=True, dropout=0.2).net.train()
    net.blocks[0].eval()  # e.g. a block deliberately kept in eval mode
    collect_activation_stats(net, torch.randn(8, 40))
    assert net.training and not net.blocks[0].training
    assert all(not m.training for m in net.blocks[0].modules())


def test_tracked_layers_are_found_by_type_in_any_model():
    model = nn.Sequential(
        nn.Conv1d(1, 4, 3),
        nn.BatchNorm1d(4),  # a bare norm layer: tracked
        nn.ReLU(),
        NormAct(4),  # tracked as a block; its inner BatchNorm is not tracked twice
        nn.Flatten(),
        nn.Linear(32, 2),
    )
    assert list(tracked_modules(model)) == ["1", "3"]
    stats = collect_activation_stats(model, torch.randn(8, 1, 10))
    assert stats["1"][0] == pytest.approx(0.0, abs=1e-5)  # BN output in train mode: mean 0, variance 1
    assert stats["1"][1] == pytest.approx(1.0, abs=1e-3)


class RandomData(ClassificationDataModule):
    def load_splits(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(200, 40, generator=g), torch.randint(0, 10, (200,), generator=g)
        return {"train": (x[:160], y[:160]), "val": (x[160:], y[160:]), "test": (x[160:], y[160:])}

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_size(self) -> int:
        return 40


def test_fit_logs_init_stats_then_every_n_steps(tmp_path: Path):
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=5,
        limit_val_batches=1,
        logger=logger,
        callbacks=[ActivationStats(every_n_steps=2, histogram_every_n_steps=4)],
    )
    trainer.fit(ResidualBN(num_classes=10, input_size=40, num_blocks=3), datamodule=RandomData(batch_size=16))
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    scalars, hists = events.Tags()["scalars"], events.Tags()["histograms"]
    for i in range(3):
        init = events.Scalars(f"activations_init/var/net.blocks.{i}")
        assert len(init) == 1 and init[0].step == 0 and math.isfinite(init[0].value)
        assert [e.step for e in events.Scalars(f"activations/var/net.blocks.{i}")] == [0, 2, 4]
        assert [e.step for e in events.Histograms(f"activations/hist/net.blocks.{i}")] == [0, 4]
    assert "activations/mean/net.blocks.0.branch.0" in scalars  # the block's BN/ReLU
    assert "activations/hist/net.blocks.0.branch.0" in hists
    assert "activations_init/variance_per_layer" in events.Tags()["images"]
