"""Networks (``nn.Module``) and their LightningModules on the shared :class:`ClassifierModule`."""

from src.models.classifier import ClassifierModule
from src.models.residual_bn import ResidualBN, ResidualBNNet

__all__ = ["ClassifierModule", "ResidualBN", "ResidualBNNet"]
