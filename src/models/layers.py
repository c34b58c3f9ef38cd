"""Building blocks the networks share: the switchable BatchNorm/ReLU block and the residual wrapper."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

BNPosition = Literal["before_activation", "after_activation"]


class NormAct(nn.Sequential):
    """ReLU with an optional BatchNorm1d before it (``before_activation``, the usual place) or after it.

    Works on ``(N, C)`` and ``(N, C, L)`` inputs.

    Args:
        num_features: channels/features normalised.
        batch_norm: include the BatchNorm layer at all.
        position: where the BatchNorm goes relative to the ReLU.
        momentum: BatchNorm running-statistics momentum.
        eps: BatchNorm epsilon.
    """

    def __init__(
        self,
        num_features: int,
        batch_norm: bool = True,
        position: BNPosition = "before_activation",
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        if position not in ("before_activation", "after_activation"):
            raise ValueError(f"position must be 'before_activation' or 'after_activation', got {position!r}")
        layers: list[nn.Module] = [nn.ReLU()]
        if batch_norm:
            bn = nn.BatchNorm1d(num_features, momentum=momentum, eps=eps)
            layers.insert(0 if position == "before_activation" else 1, bn)
        super().__init__(*layers)


class Residual(nn.Module):
    """``x + branch(x)``. Its output is the residual stream, which :class:`~src.callbacks.ActivationStats`
    tracks in any model through the ``residual`` flag."""

    residual = True

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class Unsqueeze(nn.Module):
    """Insert a dimension: ``(N, L)`` signals become ``(N, 1, L)`` one-channel sequences for Conv1d."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(self.dim)


def he_init(module: nn.Module) -> None:
    """He (Kaiming) uniform weights and zero biases for linear and conv layers that feed ReLUs."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
