"""A fourth dataset/model pair, added as README's "Add your own dataset/model pair" says, kept under
tests/ (not shipped): generated Gaussian blobs (:mod:`tests.pair.toy_data`), a small BN network
(:mod:`tests.pair.toy_model`) and its config ``tests/pair/toy.yaml``. ``tests/test_pair.py`` runs
every command and tool on it."""

from pathlib import Path

CONFIG = Path(__file__).with_name("toy.yaml")
"""The pair's config (``class_path`` by full import path; logs under ``lightning_logs/toy_blobs_mlp``)."""
