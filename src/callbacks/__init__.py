"""Callbacks usable by short name in YAML (``class_path: PredictionWriter``)."""

from src.callbacks.predictions import PredictionWriter
from src.callbacks.scaling import ScalingSetup

__all__ = ["PredictionWriter", "ScalingSetup"]
