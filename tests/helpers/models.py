"""Models that exist only for tests, importable by the CLI subprocesses (``--model=tests.helpers.models.X``),
and a quiet Trainer for in-process tests."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from torch import Tensor, nn

from src.models import ResidualBN


class _Broken(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("boom inside the network")


class BrokenResidualBN(ResidualBN):
    """A correctly paired model whose network fails: the error must surface as itself."""

    def build_network(self) -> nn.Module:
        net = super().build_network()
        net.head = _Broken()
        return net


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A Trainer with no logger, checkpointing, progress bar or model summary unless ``kwargs`` ask for one."""
    settings: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(**{**settings, **kwargs})
