"""The normalisation/activation block every model shares, so batch norm can be switched or moved."""

from __future__ import annotations

from typing import Literal

from torch import nn

BNPosition = Literal["before_activation", "after_activation"]


class NormAct(nn.Sequential):
    """ReLU with an optional BatchNorm1d before or after it.

    ``before_activation`` (BN → ReLU) is the usual placement; ``after_activation`` (ReLU → BN)
    is the alternative that seed 004 compares. Works on ``(N, C)`` and ``(N, C, L)`` inputs.

    Args:
        num_features: channels/features normalised.
        batch_norm: include the BatchNorm layer at all.
        bn_position: where the BatchNorm goes relative to the ReLU.
        momentum: BatchNorm running-statistics momentum.
        eps: BatchNorm epsilon.
    """

    def __init__(
        self,
        num_features: int,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        if bn_position not in ("before_activation", "after_activation"):
            raise ValueError(
                f"bn_position must be 'before_activation' or 'after_activation', got {bn_position!r}"
            )
        act = nn.ReLU()
        if not batch_norm:
            super().__init__(act)
        else:
            bn = nn.BatchNorm1d(num_features, momentum=momentum, eps=eps)
            super().__init__(*((bn, act) if bn_position == "before_activation" else (act, bn)))


def he_init(module: nn.Module) -> None:
    """He (Kaiming) uniform weights and zero biases for linear and conv layers (as in seed 003)."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
