"""MLP with batch norm and dropout after every hidden layer, for Fashion-MNIST.

python -m src.cli fit --config configs/fashion_mnist_mlp_bn.yaml
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from src.models.classifier import BNClassifier
from src.models.layers import he_init
from src.runtime.value_types import PositiveInt, Rate


class MLPBNDropout(BNClassifier):
    """``[Linear → BN → ReLU → Dropout] × len(hidden_sizes) → Linear`` on flattened inputs.

    ``bn_position: after_activation`` gives ``Linear → ReLU → BN → Dropout``; ``batch_norm: false``
    drops the BatchNorm layers.

    Args:
        hidden_sizes: width of each hidden layer.
        dropout: dropout after every hidden layer.
        **kwargs: batch-norm and training options of :class:`~src.models.classifier.BNClassifier`.
    """

    def __init__(
        self,
        hidden_sizes: list[PositiveInt] = [128, 64],  # noqa: B006  (jsonargparse shows list defaults)
        dropout: Rate = 0.3,
        **kwargs: Any,
    ) -> None:
        if not hidden_sizes:
            raise ValueError("hidden_sizes must list at least one hidden layer width, e.g. [512, 256]")
        super().__init__(**kwargs)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        layers: list[nn.Module] = [nn.Flatten()]
        width = hp.input_size
        for size in hp.hidden_sizes:
            layers += [nn.Linear(width, size), self.norm_act(size), nn.Dropout(hp.dropout)]
            width = size
        net = nn.Sequential(OrderedDict(hidden=nn.Sequential(*layers), head=nn.Linear(width, hp.num_classes)))
        net.apply(he_init)
        return net
