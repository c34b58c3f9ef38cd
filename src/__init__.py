"""Batch-normalised classifiers trained with PyTorch Lightning (``python -m src.cli``)."""
