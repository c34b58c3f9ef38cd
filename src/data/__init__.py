"""LightningDataModules, one per dataset, on the shared :class:`ClassificationDataModule` base."""

from src.data.ag_news import AGNews
from src.data.base import ClassificationDataModule, DataError, TensorBatches
from src.data.fashion_mnist import FashionMNIST
from src.data.hub import DataSourceError, HubDataModule
from src.data.mnist1d import MNIST1D
from src.data.raw_inputs import RawInputError

__all__ = [
    "AGNews",
    "ClassificationDataModule",
    "DataError",
    "DataSourceError",
    "FashionMNIST",
    "HubDataModule",
    "MNIST1D",
    "RawInputError",
    "TensorBatches",
]
