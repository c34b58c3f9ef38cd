"""A small BN network for the toy blobs: ``Linear → BatchNorm/ReLU → Dropout → Linear``.

python -m src.cli fit --config tests/pair/toy.yaml
"""

from __future__ import annotations

from typing import Any

from torch import nn

from src.models.classifier import BNClassifier
from src.models.layers import he_init
from src.runtime.value_types import PositiveInt, Rate


class ToyMLP(BNClassifier):
    """One hidden layer with the shared BatchNorm/ReLU block.

    Args:
        hidden_size: width of the hidden layer.
        dropout: dropout after the hidden layer.
        **kwargs: batch-norm and training options of :class:`~src.models.classifier.BNClassifier`.
    """

    def __init__(self, hidden_size: PositiveInt = 32, dropout: Rate = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        net = nn.Sequential(
            nn.Linear(hp.input_size, hp.hidden_size),
            self.norm_act(hp.hidden_size),
            nn.Dropout(hp.dropout),
            nn.Linear(hp.hidden_size, hp.num_classes),
        )
        net.apply(he_init)
        return net
