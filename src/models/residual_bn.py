"""Residual MLP with batch norm before each residual branch (seed 003), for MNIST-1D.

python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from src.models.classifier import ClassifierModule
from src.models.layers import BNPosition, NormAct, he_init


class ResidualBlock(nn.Module):
    """``x + Linear(Dropout(ReLU(BN(x))))``: the pre-activation residual branch."""

    # Marks the output as the residual stream for ActivationStats (found by this flag, any model).
    residual = True

    def __init__(
        self,
        width: int,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        dropout: float = 0.0,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm_act = NormAct(width, batch_norm, bn_position, bn_momentum, bn_eps)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.linear(self.dropout(self.norm_act(x)))


class ResidualBNNet(nn.Module):
    """``Linear(in → hidden)``, ``num_blocks`` residual blocks, ``Linear(hidden → classes)``."""

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        hidden_size: int = 100,
        num_blocks: int = 5,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        dropout: float = 0.0,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(input_size, hidden_size)
        self.blocks = nn.Sequential(
            *(
                ResidualBlock(hidden_size, batch_norm, bn_position, dropout, bn_momentum, bn_eps)
                for _ in range(num_blocks)
            )
        )
        self.head = nn.Linear(hidden_size, num_classes)
        self.apply(he_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x.flatten(1))))


class ResidualBN(ClassifierModule):
    """Residual-BN classifier (seed 003's network) on the shared training logic.

    Args:
        input_size: signal length (linked from the DataModule).
        hidden_size: width of the residual stream.
        num_blocks: number of residual blocks.
        batch_norm: BatchNorm at the start of every residual branch (off = the seed's plain net).
        bn_position: BN before or after the ReLU inside each branch.
        dropout: dropout inside each residual branch.
        bn_momentum: BatchNorm momentum.
        bn_eps: BatchNorm epsilon.
        **kwargs: training options of :class:`ClassifierModule` (classes, optimizer, scheduler).
    """

    def __init__(
        self,
        input_size: int = 40,
        hidden_size: int = 100,
        num_blocks: int = 5,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        dropout: float = 0.0,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.net = ResidualBNNet(
            input_size,
            self.num_classes,
            hidden_size,
            num_blocks,
            batch_norm,
            bn_position,
            dropout,
            bn_momentum,
            bn_eps,
        )
        self.example_input_array = torch.zeros(2, input_size)
