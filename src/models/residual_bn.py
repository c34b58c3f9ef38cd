"""Residual network with batch norm in each residual branch (seed 003), for MNIST-1D.

``block: linear`` is the seed's residual MLP; ``block: conv`` makes each branch a 1-D convolution
over the signal (seed 000's building blocks), pooled before the head.

python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml
python -m src.cli fit --config configs/mnist1d_resconv_bn.yaml
"""

from __future__ import annotations

from typing import Any, Literal

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


class ConvResidualBlock(nn.Module):
    """``x + Dropout(ReLU(BN(Conv1d(x))))`` over ``(N, channels, length)``, length kept."""

    residual = True

    def __init__(
        self,
        channels: int,
        kernel_size: int = 5,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        dropout: float = 0.0,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        # A bias right before BatchNorm is cancelled by its mean subtraction.
        conv_bias = not (batch_norm and bn_position == "before_activation")
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding="same", bias=conv_bias)
        self.norm_act = NormAct(channels, batch_norm, bn_position, bn_momentum, bn_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.norm_act(self.conv(x)))


class ResidualBNNet(nn.Module):
    """Stem, ``num_blocks`` residual blocks, head.

    ``linear``: ``Linear(in → hidden)``, :class:`ResidualBlock` s, ``Linear(hidden → classes)``.
    ``conv``: ``Conv1d(1 → hidden)`` over the signal, :class:`ConvResidualBlock` s, global average
    pooling over the length, ``Linear(hidden → classes)``.
    """

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
        block: Literal["linear", "conv"] = "linear",
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if block not in ("linear", "conv"):
            raise ValueError(f"block must be 'linear' or 'conv', got {block!r}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.block = block
        bn = (batch_norm, bn_position, dropout, bn_momentum, bn_eps)
        if block == "linear":
            self.stem: nn.Module = nn.Linear(input_size, hidden_size)
            self.blocks = nn.Sequential(*(ResidualBlock(hidden_size, *bn) for _ in range(num_blocks)))
            self.head: nn.Module = nn.Linear(hidden_size, num_classes)
        else:
            self.stem = nn.Conv1d(1, hidden_size, kernel_size, padding="same")
            self.blocks = nn.Sequential(
                *(ConvResidualBlock(hidden_size, kernel_size, *bn) for _ in range(num_blocks))
            )
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(hidden_size, num_classes)
            )
        self.apply(he_init)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if self.block == "conv":
            x = x.unsqueeze(1)  # (N, length) → (N, 1 channel, length)
        return self.head(self.blocks(self.stem(x)))


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
        block: ``linear`` residual MLP blocks (the seed) or ``conv`` 1-D convolution blocks
            (``hidden_size`` channels over the signal, pooled before the head).
        kernel_size: convolution kernel size of ``conv`` blocks (ignored for ``linear``).
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
        block: Literal["linear", "conv"] = "linear",
        kernel_size: int = 5,
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
            block,
            kernel_size,
        )
        self.example_input_array = torch.zeros(2, input_size)
