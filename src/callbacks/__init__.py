"""Callbacks usable by short name in YAML (``class_path: PredictionWriter``)."""

from src.callbacks.predictions import PredictionWriter
from src.callbacks.token_heatmap import TokenHeatmap

__all__ = ["PredictionWriter", "TokenHeatmap"]
