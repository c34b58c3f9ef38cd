"""MLP with batch norm and dropout after every hidden layer (seed 004), for Fashion-MNIST.

python -m src.cli fit --config configs/fashion_mnist_mlp_bn.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from src.models.classifier import ClassifierModule
from src.models.layers import BNPosition, NormAct, he_init


class MLPBNDropoutNet(nn.Module):
    """``[Linear → BN → ReLU → Dropout] × len(hidden_sizes) → Linear``, on flattened inputs.

    ``bn_position="after_activation"`` gives ``Linear → ReLU → BN → Dropout`` (the seed's second
    case); ``batch_norm=False`` drops the BN layers.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (128, 64),
        dropout: float = 0.3,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not hidden_sizes or any(h < 1 for h in hidden_sizes):
            raise ValueError(
                f"hidden_sizes must be a non-empty list of positive widths, got {list(hidden_sizes)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = input_size
        for h in hidden_sizes:
            layers += [
                nn.Linear(width, h),
                NormAct(h, batch_norm, bn_position, bn_momentum, bn_eps),
                nn.Dropout(dropout),
            ]
            width = h
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.apply(he_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x.flatten(1)))


class MLPBNDropout(ClassifierModule):
    """MLP-BN-dropout classifier (seed 004's network) on the shared training logic.

    Args:
        input_size: features per input, e.g. 784 for 28×28 images (linked from the DataModule).
        hidden_sizes: width of each hidden layer (the seed uses ``[128, 64]``).
        dropout: dropout probability after every hidden layer.
        batch_norm: BatchNorm in every hidden layer (off = the plain MLP for comparison).
        bn_position: BN before the ReLU (``before_activation``) or after it (``after_activation``).
        bn_momentum: BatchNorm running-statistics momentum.
        bn_eps: BatchNorm epsilon.
        **kwargs: training options of :class:`ClassifierModule` (classes, optimizer, scheduler).
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (128, 64),
        dropout: float = 0.3,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.net = MLPBNDropoutNet(
            input_size,
            self.num_classes,
            list(hidden_sizes),
            dropout,
            batch_norm,
            bn_position,
            bn_momentum,
            bn_eps,
        )
        self.example_input_array = torch.zeros(2, input_size)
