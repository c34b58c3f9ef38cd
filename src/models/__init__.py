"""LightningModules on the shared :class:`ClassifierModule`, one file per network."""

from src.models.bn_cnn import BNCNN
from src.models.classifier import BNClassifier, ClassifierModule
from src.models.mlp_bn_dropout import MLPBNDropout
from src.models.residual_bn import ResidualBN
from src.models.schedules import OneCycleLR

__all__ = ["BNCNN", "BNClassifier", "ClassifierModule", "MLPBNDropout", "OneCycleLR", "ResidualBN"]
