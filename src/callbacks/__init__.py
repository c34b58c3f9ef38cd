"""Callbacks a config lists, usable by short name in YAML (``class_path: PredictionWriter``).

The callbacks every run gets (fault tolerance, the run's config, the HPARAMS tab, the batch-size
report) are machinery, in :mod:`src.runtime`.
"""

from src.callbacks.activation_stats import ActivationStats
from src.callbacks.averaging import EMAWeights
from src.callbacks.checkpointing import LastCheckpoint
from src.callbacks.per_class import PerClassReport
from src.callbacks.predictions import PredictionWriter
from src.callbacks.token_heatmap import TokenHeatmap

__all__ = [
    "ActivationStats",
    "EMAWeights",
    "LastCheckpoint",
    "PerClassReport",
    "PredictionWriter",
    "TokenHeatmap",
]
