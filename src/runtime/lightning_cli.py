"""What the project adds to LightningCLI, through its public hooks only.

- links: the data's ``num_classes``, ``input_size`` and ``class_names`` go into the model;
- checks before anything is built (:mod:`src.runtime.checks`): pairing, devices, settings that train
  nothing, a checkpoint of other data or model settings;
- run folders (:mod:`src.runtime.runs`): each run claims and locks its own ``version_N``;
- checkpoints (:mod:`src.runtime.resume`): every ``--ckpt_path`` checked before Lightning reads it;
  ``--ckpt_path=last`` resumes only an unfinished run whose saved config matches the command; a
  run's ``last.ckpt`` continues in its own folder;
- a checkpoint's fitted data state (vocabulary, normalisation) restored before the data → model links
  are read, so ``validate/test/predict --ckpt_path`` need no training data, and refused when missing
  (never refitted);
- the Trainer's callbacks fitted to the switches and the run (:mod:`src.runtime.trainer_callbacks`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from src.data import ClassificationDataModule, DataError
from src.runtime import checks, resume, runs
from src.runtime.checkpoints import check_ckpt_path, read_metadata
from src.runtime.command_line import (
    CommandLineParser,
    callback_option_args,
    check_config_files,
    split_callback_options,
)
from src.runtime.devices import placement, sync_batchnorm_applies
from src.runtime.errors import UsageError
from src.runtime.loggers import RunTrainer, checkpoints_into, place_loggers
from src.runtime.run_state import RunState
from src.runtime.trainer_callbacks import adapt_callbacks, checkpoint_plugins, with_fault_tolerance
from src.runtime.workarounds import instantiate_data_as_lightning_does


class ClassifierCLI(LightningCLI):
    """LightningCLI in subclass mode over :class:`ClassifierModule` and :class:`ClassificationDataModule`.

    ``run_state`` is the command's :class:`~src.runtime.run_state.RunState` (run folders it claimed
    and locked); the caller owns it and releases it when the command ends.
    """

    def __init__(self, *args: Any, run_state: RunState | None = None, **kwargs: Any) -> None:
        self.run_state = run_state if run_state is not None else RunState()
        # The project's parse errors (src.runtime.command_line); no abbreviated options: a misspelt
        # `--trainer.max_epoch` is refused, not taken for `--trainer.max_epochs`.
        kwargs.setdefault("parser_class", CommandLineParser)
        kwargs.setdefault("parser_kwargs", {"allow_abbrev": False})
        kwargs.setdefault("trainer_class", RunTrainer)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in checks.LINKED:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the best checkpoint (the last one without validation) in the same run folder.",
        )

    def settings(self, instantiated: bool = False) -> Any:
        """The settings of the subcommand being run (all of them with ``run=False``)."""
        config = self.config_init if instantiated else self.config
        sub = self.config.get("subcommand")
        return config[sub] if sub else config

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        check_config_files(argv)
        argv, by_name = split_callback_options(argv)
        if by_name:  # `--callbacks.NAME.OPTION=V`: the parsed list, rebuilt with the options applied
            first = parser.parse_args([a for a in argv if not a.startswith("--print_config")])
            argv += callback_option_args(parser, first, by_name)
        self.config = parser.parse_args(argv)
        # Before LightningCLI reads the checkpoint's hyperparameters (src.cli checks a --ckpt_path on
        # the command line before parsing; this one may come from a config file).
        check_ckpt_path(self.config.get("subcommand"), self.settings().get("ckpt_path"))
        # The model as the command gives it, before Lightning replaces it with a checkpoint's
        # hyperparameters (`--ckpt_path FILE`): what that drops is reported, never lost silently.
        model = self.settings().get("model")
        self.given_model = model.as_dict() if model is not None else {}

    def before_instantiate_classes(self) -> None:
        sub, cfg = self.config.get("subcommand"), self.settings()
        checks.check_given(cfg)
        logger = cfg.trainer.get("logger")
        version = (logger.get("init_args") or {}).get("version") if hasattr(logger, "get") else None
        command = yaml.safe_load(self.parser.dump(self.config, skip_unset=False)).get(sub, {})
        self.checkpoint, self.resume_dir = resume.resolve_checkpoint(
            sub,
            cfg.get("ckpt_path"),
            runs.logger_root(logger, cfg.trainer.get("default_root_dir")),
            command,
            version,
        )
        if self.checkpoint is not None:
            resumable = resume.resumable_keys(command)
            checks.check_checkpoint(sub, cfg, self.checkpoint, self.given_model, resumable)
            if sub == "fit":
                resume.keep_tuned_values(cfg, self.checkpoint)
        if self.resume_dir is not None:
            resume.continue_in(cfg.trainer, self.resume_dir)
            # ModelCheckpoint warns about any non-empty checkpoint folder; a resumed run's own always is.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        checks.check_command(sub, cfg, self.given_model)
        where = placement(
            cfg.trainer.get("accelerator"), cfg.trainer.get("devices"), cfg.trainer.get("num_nodes")
        )
        if cfg.trainer.get("sync_batchnorm") and not sync_batchnorm_applies(where):
            cfg.trainer.sync_batchnorm = False  # SyncBatchNorm needs several GPU processes

    def instantiate_classes(self) -> None:
        instantiators = None
        if self.checkpoint is not None:
            # Fitted data state (class names, vocabulary, normalisation) is needed before the data →
            # model links are read: the model gets the checkpoint's sizes without the training data.
            restore = partial(
                _with_state, cli=self, state=self._checkpoint_data_state(), check=self._check_fitted
            )
            instantiators = [(restore, ClassificationDataModule, True)]
        try:
            self.config_init = self.parser.instantiate(self.config, instantiators=instantiators)
        except (ValueError, MisconfigurationException) as err:
            refusal = _project_error(err)  # a class's own (e.g. a DataError), wrapped by jsonargparse
            raise refusal or UsageError(f"cannot build the run from these settings: {err}") from err
        self.datamodule, self.model = self.settings(True).get("data"), self.settings(True).get("model")
        try:
            self.trainer = self.instantiate_trainer()
        except ValueError as err:  # e.g. --trainer.accelerator=tpux
            raise UsageError(f"cannot build the Trainer from these settings: {err}") from err

    def _checkpoint_data_state(self) -> dict[str, Any]:
        data_class = checks.import_class(self.settings().data.class_path)
        return read_metadata(self.checkpoint).get(data_class.__qualname__) or {}

    def _check_fitted(self, datamodule: ClassificationDataModule) -> None:
        """validate/test/predict evaluate the model with the data state it was trained with, from the
        checkpoint: refitting it on today's training data could differ, so a checkpoint without it is
        refused. A resumed ``fit`` reads its training data anyway."""
        if self.subcommand == "fit":
            return
        try:
            datamodule.check_fitted()
        except DataError as err:
            raise UsageError(
                f"--ckpt_path {self.checkpoint} lacks the data's fitted state. {err} {self.subcommand} "
                "uses the state the model was trained with, never a refit: pass a checkpoint as `fit` wrote it."
            ) from err

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg, given = self.settings(True)["trainer"], self.settings().trainer
        validates = self.datamodule.has_validation or self.subcommand != "fit"
        callbacks = adapt_callbacks(list(cfg.get("callbacks") or []), cfg, validates)
        kwargs.setdefault("callbacks", with_fault_tolerance(callbacks, self.run_state))
        kwargs.setdefault("plugins", checkpoint_plugins(cfg.get("plugins")))
        folder = None
        if not cfg.get("fast_dev_run"):  # fast_dev_run logs nowhere: no run folder
            loggers, folder = self._placed_loggers(cfg, given)
            kwargs.setdefault("logger", loggers)
            if cfg.get("default_root_dir") is None:  # Lightning's other files go into the run folder too
                kwargs.setdefault("default_root_dir", None if folder is None else str(folder))
        trainer = super().instantiate_trainer(**kwargs)
        if not cfg.get("fast_dev_run"):
            trainer.fix_run_folder(folder)
            checkpoints_into(trainer.checkpoint_callbacks, trainer.loggers, folder)
        return trainer

    def _placed_loggers(self, cfg: Any, given: Any) -> tuple[list[Any], Path | None]:
        logger, config = cfg.get("logger"), given.get("logger")
        if logger is None or logger is True:  # Lightning's default: TensorBoard in lightning_logs
            root = cfg.get("default_root_dir") or "."
            logger, config = TensorBoardLogger(root), {"init_args": {"save_dir": root}}
        loggers = [] if logger is False else logger if isinstance(logger, list) else [logger]
        configs = config if isinstance(config, list) else [config] * len(loggers)
        resume = None
        if self.resume_dir is not None and self.checkpoint is not None:
            resume = (self.resume_dir, int(read_metadata(self.checkpoint).get("global_step", 0)))
        configs = [_init_args(c) for c in configs]
        return place_loggers(loggers, configs, cfg.get("default_root_dir"), resume, self.run_state)

    def after_instantiate_classes(self) -> None:
        if self.checkpoint is None:
            return
        if self.subcommand:  # `last` resolved to its file
            self.config_init[self.subcommand]["ckpt_path"] = str(self.checkpoint)
        checks.check_weights_fit(self.model, self.checkpoint)

    def before_fit(self) -> None:
        if not self.datamodule.has_validation:
            # Lightning's notice about the empty validation loader is what val_size=0 asked for.
            warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")

    def before_validate(self) -> None:
        if not self.datamodule.has_validation:
            raise UsageError(
                "val_size=0 leaves no validation split to validate on. Pass a val_size, or run test."
            )

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit") or self.trainer.fast_dev_run:
            return
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if not best:
            rank_zero_info("No checkpoint was written; testing the weights as they are.")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def _project_error(err: BaseException | None) -> UsageError | None:
    """The first :class:`UsageError` in ``err``'s chain of causes."""
    while err is not None and not isinstance(err, UsageError):
        err = err.__cause__
    return err


def _init_args(logger_config: Any) -> dict[str, Any]:
    config = logger_config.as_dict() if hasattr(logger_config, "as_dict") else logger_config
    return dict(config.get("init_args") or {}) if isinstance(config, dict) else {}


def _with_state(
    class_type: type,
    *args: Any,
    cli: LightningCLI,
    state: dict[str, Any],
    check: Callable[[ClassificationDataModule], None],
    applied_instantiation_links: dict,
    **kwargs: Any,
) -> Any:
    datamodule = instantiate_data_as_lightning_does(
        cli, class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs
    )
    if state:
        datamodule.load_state_dict(state)
    check(datamodule)
    return datamodule
