"""Residual-BN with ``block: conv``: shapes, BN switch, and that it learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.callbacks.activation_stats import collect_activation_stats
from src.models import ResidualBN, ResidualBNNet


def test_conv_blocks_keep_the_length_and_pool_before_the_head():
    net = ResidualBNNet(40, 10, hidden_size=16, num_blocks=3, block="conv", kernel_size=5)
    assert net(torch.randn(8, 40)).shape == (8, 10)
    assert net.blocks(net.stem(torch.randn(8, 1, 40))).shape == (8, 16, 40)
    assert isinstance(net.blocks[0].conv, nn.Conv1d) and net.blocks[0].conv.kernel_size == (5,)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in net.modules()) == 3
    off = ResidualBNNet(40, 10, hidden_size=16, num_blocks=3, block="conv", batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in off.modules())
    # a conv branch without BN keeps its bias; before BN the bias would be cancelled, so none
    assert off.blocks[0].conv.bias is not None and net.blocks[0].conv.bias is None


def test_conv_blocks_are_tracked_as_residual_blocks():
    net = ResidualBNNet(40, 10, hidden_size=16, num_blocks=2, block="conv")
    stats = collect_activation_stats(net, torch.randn(32, 40))
    assert {"blocks.0", "blocks.1", "blocks.0.norm_act"} <= set(stats)


def test_unknown_block_is_refused():
    with pytest.raises(ValueError, match="block"):
        ResidualBNNet(40, 10, block="attention")


def test_conv_model_overfits_one_batch():
    torch.manual_seed(0)
    model = ResidualBN(input_size=40, num_classes=10, block="conv", hidden_size=16, num_blocks=2)
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
