"""Models that exist only for tests, importable by the CLI subprocesses (``--model=tests.helpers.models.X``)."""

from __future__ import annotations

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
