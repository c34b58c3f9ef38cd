"""Callbacks usable by short name in YAML (``class_path: PredictionWriter``)."""

from src.callbacks.fault_tolerance import FaultTolerance
from src.callbacks.predictions import PredictionWriter

__all__ = ["FaultTolerance", "PredictionWriter"]
