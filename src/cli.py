"""The project's one entry point: LightningCLI over the project's model and data base classes.

    python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml
    python -m src.cli test --ckpt_path lightning_logs/mnist1d_resnet_bn/version_0/checkpoints/last.ckpt
    python -m src.cli predict --ckpt_path <ckpt> [--config <yaml>]
    python -m src.cli fit --config <yaml> --print_config    |    python -m src.cli fit --help

Any setting can be overridden on the command line (``--trainer.max_epochs=5``,
``--model.init_args.hidden_size=256``, ``--data.init_args.batch_size=512``). What this module adds
to LightningCLI, each through its public hooks:

- links: the data's ``num_classes``, ``input_size`` and ``class_names`` go into the model;
- checkpoint-only commands: ``validate|test|predict --ckpt_path X`` without ``--config`` run with
  the configuration stored in the checkpoint, as the run that wrote it did;
- run folders: each run claims its own ``version_N`` (also when runs start at the same moment)
  and locks it; ``fit --ckpt_path=last`` resumes only a run whose saved config matches;
- checks before anything is built: model/data pairing, devices, settings that train nothing;
- errors: ``error: <what to do>`` on stderr and a non-zero exit status, no traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

import src.callbacks  # noqa: F401  (registers the callbacks' short names for YAML)
from src import runs
from src.callbacks import FaultTolerance, HParamsTab, ScalingSetup
from src.callbacks.fault_tolerance import NonFiniteLossError, RunInterrupted
from src.checkpoints import CONFIG_KEY, CheckpointWriteError, SafeCheckpointIO, load_checkpoint
from src.data import ClassificationDataModule
from src.devices import cpu_threads, placement, sync_batchnorm_applies
from src.errors import UserError
from src.models import ClassifierModule

# Values the data knows and the model needs, linked at instantiation so they are never written twice.
LINKED = ("num_classes", "input_size", "class_names")
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class RunConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the run folder, also stored in every checkpoint (so a command
    given only the checkpoint runs with the same configuration) and kept in step with what the
    learning-rate and batch-size finders chose."""

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.parser.dump(self.config, skip_unset=False)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        tuned = {}
        if pl_module.hparams.get("lr") != self.config.model.init_args.get("lr"):
            tuned["model.init_args.lr"] = self.config.model.init_args.lr = pl_module.hparams.lr
        dm = trainer.datamodule
        if dm is not None and dm.hparams.get("batch_size") != self.config.data.init_args.get("batch_size"):
            tuned["data.init_args.batch_size"] = self.config.data.init_args.batch_size = dm.hparams.batch_size
        if tuned and trainer.is_global_zero and trainer.log_dir:
            self.parser.save(self.config, Path(trainer.log_dir) / self.config_filename, skip_unset=False, overwrite=True)
            chosen = ", ".join(f"{k}={v}" for k, v in tuned.items())
            rank_zero_info(f"The tuner chose {chosen}; config.yaml and the checkpoints record it.")


class CLI(LightningCLI):
    """LightningCLI in subclass mode over :class:`ClassifierModule` and :class:`ClassificationDataModule`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the best checkpoint (the last one without validation) in the same run folder.",
        )

    def _settings(self, initialised: bool = False) -> Any:
        """The parsed (or instantiated) settings of the subcommand being run (all of them with ``run=False``)."""
        config = self.config_init if initialised else self.config
        sub = self.config.get("subcommand")
        return config[sub] if sub else config

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        # The model as the command describes it, before Lightning replaces it with the checkpoint's
        # hyperparameters (`--ckpt_path FILE`): what it drops is reported, never silently lost.
        self._given_model = _as_dict(self._settings().get("model"))

    # ------------------------------------------------------------------ checks before building
    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self._settings()
        if cfg.get("data") is None or cfg.get("model") is None:
            raise UserError(
                f"no {'data' if cfg.get('data') is None else 'model'} given. Pass a config (--config "
                "configs/<name>.yaml), or --ckpt_path <checkpoint> for validate/test/predict."
            )
        self._ckpt_file, self._resume_dir = self._resolve_checkpoint(sub, cfg)
        self._check_checkpoint_data(cfg)
        self._check_pairing(cfg)
        self._check_model_against_checkpoint(sub, cfg)
        given = (self._given_model or {}).get("init_args") or {}  # not what a checkpoint filled in
        for name in LINKED:
            if given.get(name) is not None:
                rank_zero_warn(
                    f"model.init_args.{name} is set in the config, but it is linked from the data "
                    f"(data.{name}); the data's value is used. Remove it from the config."
                )
        where = placement(cfg.trainer.get("accelerator"), cfg.trainer.get("devices"), cfg.trainer.get("num_nodes"))
        if cfg.trainer.get("sync_batchnorm") and not sync_batchnorm_applies(where):
            cfg.trainer.sync_batchnorm = False  # SyncBatchNorm needs several GPU processes
        if sub == "fit":
            nothing = {"trainer.max_epochs": cfg.trainer.get("max_epochs"), "trainer.max_steps": cfg.trainer.get("max_steps")}
            nothing["trainer.limit_train_batches"] = cfg.trainer.get("limit_train_batches")
            for key, value in nothing.items():
                if value == 0:
                    raise UserError(f"--{key}=0 trains nothing. Pass a positive value, or run validate/test instead.")
        elif cfg.get("ckpt_path") == "best":
            raise UserError(
                f"--ckpt_path=best names the best checkpoint of a fit in the same command; {sub} runs on its "
                "own. Pass a checkpoint file (or last)."
            )

    def _check_checkpoint_data(self, cfg: Any) -> None:
        if self._ckpt_file is None:
            return
        stored = (_cached_checkpoint(self._ckpt_file).get("datamodule_hyper_parameters") or {}).get("_class_path", "")
        if stored and stored.rsplit(".", 1)[-1] != cfg.data.class_path.rsplit(".", 1)[-1]:
            raise UserError(
                f"--ckpt_path {self._ckpt_file} holds a {stored} data, but this run builds data "
                f"{cfg.data.class_path}. Use a checkpoint of the same model and data, or leave out --config "
                "(validate/test/predict rebuild both from the checkpoint)."
            )

    def _check_pairing(self, cfg: Any) -> None:
        model_cls, data_cls = _import(cfg.model.class_path), _import(cfg.data.class_path)
        model_kind = getattr(model_cls, "input_kind", None)
        data_kind = getattr(data_cls, "input_kind", None)
        if model_kind and data_kind and model_kind != data_kind:
            what = {"features": "feature vectors (signals, images)", "tokens": "token ids (text)"}
            raise UserError(
                f"{model_cls.__name__} reads {what[model_kind]}, but {data_cls.__name__} yields "
                f"{what[data_kind]}. Pair the model with data of its kind (see configs/)."
            )

    def _check_model_against_checkpoint(self, sub: str, cfg: Any) -> None:
        """Lightning re-reads the model's settings from a ``--ckpt_path`` file; name what that drops."""
        differences = runs.config_differences({"model": self._given_model or {}}, {"model": _as_dict(cfg.model)})
        differences = [d for d in differences if d.split(":")[0].rsplit(".", 1)[-1] not in LINKED]
        if not differences:
            return
        shown = "; ".join(differences[:8]) + (" ..." if len(differences) > 8 else "")
        if sub == "fit":
            raise UserError(
                f"--ckpt_path {cfg.ckpt_path} was trained with other model settings than this command gives "
                f"(command -> checkpoint: {shown}). A resumed run keeps its model: drop these options, or "
                "start a new run without --ckpt_path."
            )
        rank_zero_warn(f"The checkpoint's model settings are used, not the command's (command -> checkpoint): {shown}.")

    def _resolve_checkpoint(self, sub: str, cfg: Any) -> tuple[Path | None, Path | None]:
        """The checkpoint file this command loads, and for ``fit`` the run folder it continues."""
        ckpt = cfg.get("ckpt_path")
        root = _logger_root(cfg.trainer.get("logger"))
        if ckpt == "last":
            if root is None:
                raise UserError("--ckpt_path=last needs a logger with a save_dir (it looks for the run's folder).")
            version = (cfg.trainer.logger.get("init_args") or {}).get("version")
            config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))[sub]
            candidates = runs.resumable_runs(root, config, only_version=version)
            match = next((c for c in candidates if not c.differences), None)
            if match is None:
                if not candidates and version is None and sub == "fit":
                    rank_zero_info(f"--ckpt_path=last: no run under {root} has a last.ckpt yet; starting a new run.")
                    return None, None
                raise UserError(_no_matching_run(root, candidates, version))
            return match.checkpoint, match.checkpoint.parents[1] if sub == "fit" else None
        if ckpt in (None, "best", "hpc", "registry"):
            return None, None
        path = Path(ckpt)
        if not path.is_file():
            raise UserError(f"--ckpt_path {ckpt!r} is not a file. Pass the path of a .ckpt file (or last).")
        continues = sub == "fit" and path.name == "last.ckpt" and root is not None and path.parents[1].parent.resolve() == root.resolve()
        return path, path.parents[1] if continues else None

    # ------------------------------------------------------------------ building
    def instantiate_classes(self) -> None:
        sub = self.subcommand
        instantiators = None
        if self._ckpt_file is not None:
            data_class = _import(self._settings().data.class_path)
            data_state = _cached_checkpoint(self._ckpt_file).get(data_class.__qualname__)
            if data_state:
                # Fitted data state (class names, vocabulary, normalisation) is needed before the data →
                # model links are read, so the model gets the checkpoint's sizes without the training data.
                instantiators = [(partial(_with_state, state=data_state), ClassificationDataModule, True)]
        try:
            self.config_init = self.parser.instantiate(self.config, instantiators=instantiators)
        except (ValueError, MisconfigurationException) as err:
            raise UserError(f"cannot build the run from these settings: {err}") from err
        cfg = self._settings(initialised=True)
        self.datamodule, self.model = cfg.get("data"), cfg.get("model")
        self.trainer = self.instantiate_trainer()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        sub = self.subcommand
        trainer_cfg = self._settings(initialised=True)["trainer"]
        callbacks = list(trainer_cfg.get("callbacks") or [])
        dropped = []
        steps_aside = (
            (trainer_cfg.get("enable_progress_bar") is False, ProgressBar, "--trainer.enable_progress_bar=false"),
            (trainer_cfg.get("logger") is False, LearningRateMonitor, "--trainer.logger=false"),
            (trainer_cfg.get("enable_checkpointing") is False, Checkpoint, "--trainer.enable_checkpointing=false"),
        )
        for off, kind, flag in steps_aside:
            if off and any(isinstance(c, kind) for c in callbacks):
                dropped.append(f"{', '.join(type(c).__name__ for c in callbacks if isinstance(c, kind))} ({flag})")
                callbacks = [c for c in callbacks if not isinstance(c, kind)]
        if dropped:
            rank_zero_info(f"Left out: {'; '.join(dropped)}.")
        if self._no_validation() and sub == "fit":
            callbacks = self._without_validation(callbacks)
        # fast_dev_run replaces the loggers with a dummy: it gets no run folder.
        logger = trainer_cfg.get("logger") if trainer_cfg.get("fast_dev_run") else self._versioned(trainer_cfg.get("logger"))
        if trainer_cfg.get("default_root_dir") is None and not trainer_cfg.get("fast_dev_run"):
            # What Lightning writes beside the logs (tuner files; checkpoints without a logger) goes
            # into the run folder too.
            kwargs.setdefault("default_root_dir", self._run_folder(logger))
        plugins = trainer_cfg.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # atomic saves, code-free loads
            plugins.append(SafeCheckpointIO())
        return super().instantiate_trainer(callbacks=callbacks, logger=logger, plugins=plugins, **kwargs)

    def _versioned(self, logger: Any, config: Any = None) -> Any:
        """Give each versioned logger (TensorBoard, CSV) its run folder: the one named with
        ``--trainer.logger.init_args.version``, the resumed run's, or a new ``version_N`` claimed
        atomically. Rank 0 locks it for the life of the process."""
        if config is None:
            config = self._settings().trainer.get("logger")
        if isinstance(logger, (list, tuple)):
            return [self._versioned(lg, cf) for lg, cf in zip(logger, config, strict=True)]
        if not isinstance(logger, (TensorBoardLogger, CSVLogger)) or "://" in str(logger.root_dir):
            return logger
        init_args = _as_dict(config).get("init_args") or {}
        root = Path(logger.root_dir)
        claimed = self.__dict__.setdefault("_claimed", {})  # loggers sharing a root share the folder
        if root.resolve() in claimed:
            return type(logger)(**{**init_args, "version": claimed[root.resolve()]})
        if init_args.get("version") is not None:
            version = init_args["version"]
        elif self._resume_dir is not None and self._resume_dir.parent.resolve() == root.resolve():
            version = int(self._resume_dir.name.removeprefix("version_"))
        elif rank_zero_only.rank == 0:
            try:
                version = runs.claim_version(root)
            except OSError as err:
                raise UserError(
                    f"cannot write the log folder {root}: {err.strerror or err}. Pass a writable folder with "
                    "--trainer.logger.init_args.save_dir=<folder>."
                ) from err
        else:  # other ranks take rank 0's folder through Lightning's broadcasts
            return logger
        if rank_zero_only.rank == 0:
            runs.lock(root / (version if isinstance(version, str) else f"version_{version}"))
        claimed[root.resolve()] = version
        return type(logger)(**{**init_args, "version": version})

    def _run_folder(self, logger: Any) -> str | None:
        loggers = logger if isinstance(logger, (list, tuple)) else [logger]
        for lg in loggers:
            if isinstance(lg, (TensorBoardLogger, CSVLogger)) and lg.version is not None:
                return lg.log_dir
        if logger is False and rank_zero_only.rank == 0:  # no logger: a run folder of its own all the same
            root = Path("lightning_logs")
            version = runs.claim_version(root)
            runs.lock(root / f"version_{version}")
            return str(root / f"version_{version}")
        return None

    def _no_validation(self) -> bool:
        return not getattr(self.datamodule, "has_validation", True)

    @staticmethod
    def _without_validation(callbacks: list[Any]) -> list[Any]:
        """``val_size=0`` (the final fit): nothing is validated, so what watches a validation metric
        is adapted: early stopping is off and the "best" checkpoint keeps the last epoch."""
        kept, changes = [], []
        for cb in callbacks:
            monitor = getattr(cb, "monitor", None)
            if isinstance(cb, EarlyStopping) and str(monitor).startswith("val"):
                changes.append(f"EarlyStopping(monitor={monitor!r}) is off")
                continue
            if isinstance(cb, ModelCheckpoint) and str(monitor).startswith("val"):
                cb.monitor, cb.save_top_k, cb.filename = None, 1, "epoch{epoch:03d}"
                changes.append(f"ModelCheckpoint(monitor={monitor!r}) keeps the last epoch instead")
            kept.append(cb)
        rank_zero_info(
            "val_size=0: training on every training sample without validation"
            + (f"; {'; '.join(changes)}." if changes else ".")
        )
        return kept

    def after_instantiate_classes(self) -> None:
        if self._ckpt_file is None:
            return
        if self.subcommand:  # `last` resolved to a file, or the file itself
            self.config_init[self.subcommand]["ckpt_path"] = str(self._ckpt_file)
        stored = _cached_checkpoint(self._ckpt_file)["state_dict"]
        built = self.model.state_dict()
        problems = [f"{k}: missing in the checkpoint" for k in built if k not in stored]
        problems += [f"{k}: not in this model" for k in stored if k not in built]
        problems += [
            f"{k}: checkpoint {tuple(stored[k].shape)}, this model {tuple(v.shape)}"
            for k, v in built.items()
            if k in stored and tuple(stored[k].shape) != tuple(v.shape)
        ]
        if problems:
            raise UserError(
                f"the checkpoint {self._ckpt_file} does not fit the model this run builds ("
                + "; ".join(problems[:4])
                + (" ..." if len(problems) > 4 else "")
                + "). The model or data options differ from those it was trained with: leave out --config "
                "(validate/test/predict rebuild both from the checkpoint) or pass the options of its run."
            )

    # ------------------------------------------------------------------ running
    def before_fit(self) -> None:
        if self._no_validation():
            # Lightning's notice about the empty validation loader is what val_size=0 asked for.
            warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")

    def before_validate(self) -> None:
        if self._no_validation():
            raise UserError("val_size=0 leaves no validation split to validate on. Pass a val_size, or run test.")
        self._evaluating()

    def before_test(self) -> None:
        self._evaluating()

    def before_predict(self) -> None:
        self._evaluating()

    @staticmethod
    def _evaluating() -> None:
        # Restoring the checkpoint into a new run folder, Lightning notes that ModelCheckpoint's
        # bookkeeping of the old folder is not reloaded: true, and irrelevant outside fit.
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from")

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit") or self.trainer.fast_dev_run:
            return
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if not best:
            rank_zero_info("No checkpoint was written; testing the weights as they are.")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


# ---------------------------------------------------------------------------------- helpers
def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _with_state(class_type: type, *args: Any, state: dict[str, Any], **kwargs: Any) -> Any:
    datamodule = class_type(*args, **kwargs)
    datamodule.load_state_dict(state)
    return datamodule


def _logger_root(logger_cfg: Any) -> Path | None:
    """``save_dir/name`` of the first versioned logger in the config, where its run folders live."""
    cfgs = logger_cfg if isinstance(logger_cfg, list) else [logger_cfg]
    for cfg in cfgs:
        cfg = _as_dict(cfg) if cfg not in (None, True, False) else {}
        if cfg.get("class_path", "").rsplit(".", 1)[-1] in ("TensorBoardLogger", "CSVLogger"):
            args = cfg.get("init_args") or {}
            default_name = "lightning_logs"
            return Path(args.get("save_dir") or ".") / (args.get("name") if args.get("name") is not None else default_name)
    return None


def _no_matching_run(root: Path, candidates: list[runs.Candidate], version: Any) -> str:
    if not candidates:
        where = f"version_{version}" if version is not None else "any run"
        return f"--ckpt_path=last: {where} under {root} has no checkpoints/last.ckpt. Pass a checkpoint file."
    lines = [
        f"--ckpt_path=last: no run under {root} was started with these settings, so none is resumed "
        "(a resume continues the same experiment). The runs with a last.ckpt and what differs (run -> command):"
    ]
    for c in candidates[:5]:
        lines.append(f"  version_{c.version}: " + "; ".join(c.differences[:6]) + (" ..." if len(c.differences) > 6 else ""))
    lines.append("Pass the settings of the run to resume, or start a new run without --ckpt_path.")
    return "\n".join(lines)


_checkpoint_cache: dict[Path, dict[str, Any]] = {}


def _cached_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata, read once per process (tensors memory-mapped, not loaded)."""
    if path not in _checkpoint_cache:
        _checkpoint_cache[path] = load_checkpoint(path, mmap=True)
    return _checkpoint_cache[path]


def with_checkpoint_config(argv: list[str]) -> list[str]:
    """``validate|test|predict --ckpt_path X`` without ``--config``: read the configuration stored in
    the checkpoint first, so the command runs as the run that wrote it (its callbacks, logger, seed,
    optimiser); options given on the command line still override it."""
    if not argv or argv[0] not in SUBCOMMANDS[1:] or any(a in ("--config", "-c") or a.startswith("--config=") for a in argv):
        return argv
    ckpt = _flag_value(argv, "--ckpt_path")
    if not ckpt or ckpt in ("best", "last", "hpc", "registry"):
        return argv
    if not Path(ckpt).is_file():
        raise UserError(f"--ckpt_path {ckpt!r} is not a file. Pass the path of a .ckpt file.")
    stored = _cached_checkpoint(Path(ckpt)).get(CONFIG_KEY)
    if not stored:
        raise UserError(
            f"{ckpt} holds no run configuration (it was not written by this project's CLI). Pass the config "
            "it was trained with: --config <config.yaml>."
        )
    return [argv[0], "--config", stored, *argv[1:]]


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class _NoAdverts(logging.Filter):
    """Drop Lightning's tips that advertise cloud services at the start of every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def main(args: list[str] | None = None, run: bool = True) -> CLI:
    """Build and run the CLI; ``args`` lets tests and scripts call it in-process."""
    torch.set_num_threads(cpu_threads())
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    # Lightning 2.6 calls a torch pytree API that torch deprecated: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    try:
        argv = with_checkpoint_config(list(sys.argv[1:] if args is None else args))
        if args is None:
            sys.argv[1:] = argv  # parsed by LightningCLI from the command line
        return CLI(
            ClassifierModule,
            ClassificationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "sync_batchnorm": True,
                "enable_autolog_hparams": False,  # HParamsTab logs them, with the metrics
                "callbacks": [FaultTolerance(), ScalingSetup(), HParamsTab()],
            },
            auto_configure_optimizers=False,
            args=None if args is None else argv,
            run=run,
        )
    except RunInterrupted as err:
        print(err, file=sys.stderr)
        sys.exit(err.exit_code)
    except (CheckpointWriteError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except (UserError, MisconfigurationException) as err:
        runs.discard_unused()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
