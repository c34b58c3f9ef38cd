"""Hyperparameter search with Optuna, where every trial is a normal CLI run (``python -m src.tools.search``).

    python -m src.tools.search --config configs/fashion_mnist_mlp_bn.yaml \\
        --space 'model.init_args.dropout=float(0.0,0.5)' --space 'model.init_args.lr=float(1e-3,3e-2,log)' \\
        --trials 20 --output lightning_logs/search/fmnist -- --data.init_args.data_dir=../shared/data/fashion_mnist

Each trial is ``python -m src.cli fit --config ... <overrides after --> <the trial's values>`` in a
child process, its files under ``OUTPUT/runs/trial_NNNN`` (its console output ``trial.log`` and
the run folder its loggers make there), with :class:`~src.tools.search.pruning.OptunaPruning`
reporting the metric to the study after every validation epoch and stopping the run when the
pruner says so. ``Study.optimize`` runs the trials: a budget of ``--trials`` shared by every worker
of the study (``MaxTrialsCallback``), Optuna's heartbeat and ``RetryHeartbeatStaleTrialCallback``
for trials whose worker died. The study records what defines its trials (the resolved config,
the space, the metric and its direction): the same command resumes it, another one is refused.
Modules: ``space`` (``--space``/``--pruner``), ``study`` (storage, contract, budget), ``trial``
(a trial's command and the objective), ``report`` (tables, best config, plots), ``pruning``.
"""
