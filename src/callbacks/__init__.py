"""Callbacks usable by short name in YAML (``class_path: PredictionWriter``)."""

from src.callbacks.activation_stats import ActivationStats
from src.callbacks.averaging import EMAWeights
from src.callbacks.checkpointing import LastCheckpoint
from src.callbacks.fault_tolerance import FaultTolerance
from src.callbacks.hparams import HParamsTab
from src.callbacks.per_class import PerClassReport
from src.callbacks.predictions import PredictionWriter
from src.callbacks.scaling import ScalingSetup
from src.callbacks.token_heatmap import TokenHeatmap

__all__ = [
    "ActivationStats",
    "EMAWeights",
    "FaultTolerance",
    "HParamsTab",
    "LastCheckpoint",
    "PerClassReport",
    "PredictionWriter",
    "ScalingSetup",
    "TokenHeatmap",
]
