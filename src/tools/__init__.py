"""Optional programs over the CLI: ``python -m src.tools.search`` (Optuna), ``src.tools.ablate``
(grid × seeds sweeps), ``src.tools.export`` (ONNX, ``.pt2``) and ``src.tools.serve`` (LitServe)."""
