"""Residual network with batch norm in each residual branch, for MNIST-1D.

python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml     # linear blocks (residual MLP)
python -m src.cli fit --config configs/mnist1d_resconv_bn.yaml    # convolutional blocks
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

from torch import nn

from src.models.classifier import BNClassifier
from src.models.layers import Residual, Unsqueeze, he_init
from src.runtime.value_types import PositiveInt, Rate


class ResidualBN(BNClassifier):
    """Residual-BN classifier: a stem, ``num_blocks`` residual blocks and a linear head.

    ``linear`` blocks: ``Linear(input → hidden)``, then ``x + Linear(Dropout(ReLU(BN(x))))`` per
    block (pre-activation residual MLP), then ``Linear(hidden → classes)``. ``conv`` blocks: the
    signal as one channel, ``Conv1d(1 → hidden)``, then ``x + Dropout(ReLU(BN(Conv1d(x))))`` per
    block (length kept), global average pooling and ``Linear(hidden → classes)``.

    Args:
        hidden_size: width of the residual stream (features, or channels of ``conv`` blocks).
        num_blocks: number of residual blocks.
        dropout: dropout inside each residual branch.
        block: ``linear`` (residual MLP) or ``conv`` (1-D convolutions over the signal).
        kernel_size: convolution width of ``conv`` blocks (unused by ``linear`` ones).
        **kwargs: batch-norm and training options of :class:`~src.models.classifier.BNClassifier`.
    """

    def __init__(
        self,
        hidden_size: PositiveInt = 100,
        num_blocks: PositiveInt = 5,
        dropout: Rate = 0.0,
        block: Literal["linear", "conv"] = "linear",
        kernel_size: PositiveInt = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        width = hp.hidden_size
        if hp.block == "linear":
            stem: list[nn.Module] = [nn.Flatten(), nn.Linear(hp.input_size, width)]
            branches = [
                nn.Sequential(self.norm_act(width), nn.Dropout(hp.dropout), nn.Linear(width, width))
                for _ in range(hp.num_blocks)
            ]
            head: nn.Module = nn.Linear(width, hp.num_classes)
        else:
            # A bias right before BatchNorm is cancelled by its mean subtraction.
            bias = not (hp.batch_norm and hp.bn_position == "before_activation")
            stem = [nn.Flatten(), Unsqueeze(1), nn.Conv1d(1, width, hp.kernel_size, padding="same")]
            branches = [
                nn.Sequential(
                    nn.Conv1d(width, width, hp.kernel_size, padding="same", bias=bias),
                    self.norm_act(width),
                    nn.Dropout(hp.dropout),
                )
                for _ in range(hp.num_blocks)
            ]
            head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, hp.num_classes))
        net = nn.Sequential(
            OrderedDict(
                stem=nn.Sequential(*stem),
                blocks=nn.Sequential(*(Residual(branch) for branch in branches)),
                head=head,
            )
        )
        net.apply(he_init)
        return net
