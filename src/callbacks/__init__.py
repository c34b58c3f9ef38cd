"""Callbacks usable by short name in YAML (``class_path: PredictionWriter``)."""

from src.callbacks.activation_stats import ActivationStats
from src.callbacks.per_class import PerClassReport
from src.callbacks.predictions import PredictionWriter
from src.callbacks.scaling import ScalingSetup
from src.callbacks.token_heatmap import TokenHeatmap

__all__ = ["ActivationStats", "PerClassReport", "PredictionWriter", "ScalingSetup", "TokenHeatmap"]
