"""Networks (``nn.Module``) and their LightningModules on the shared :class:`ClassifierModule`."""

from src.models.bn_cnn import BNCNN, BNCNNNet
from src.models.classifier import ClassifierModule
from src.models.mlp_bn_dropout import MLPBNDropout, MLPBNDropoutNet
from src.models.residual_bn import ResidualBN, ResidualBNNet

__all__ = [
    "BNCNN",
    "BNCNNNet",
    "ClassifierModule",
    "MLPBNDropout",
    "MLPBNDropoutNet",
    "ResidualBN",
    "ResidualBNNet",
]
