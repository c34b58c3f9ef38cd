"""Hyperparameter search with Optuna, where every trial is a normal CLI run: ``python -m src.tools.search``
(docs/search.md). ``space``: the ``--space``/``--pruner`` specs; ``study``: the storage, the study's
contract (what defines its trials), the budget, dead workers; ``run``: the objective, ``Study.optimize``
and what follows it (the tables, the best config); ``pruning``: each trial's callback.
"""
