"""The project's one entry point.

    python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml
    python -m src.cli test --ckpt_path lightning_logs/mnist1d_resnet_bn/version_0/checkpoints/last.ckpt
    python -m src.cli predict --config configs/mnist1d_resnet_bn.yaml --ckpt_path <ckpt>
    python -m src.cli fit --help   |   python -m src.cli fit --config <yaml> --print_config

Any setting can be overridden on the command line (``--trainer.max_epochs=5``,
``--model.init_args.hidden_size=256``, ``--data.init_args.batch_size=512``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

# jsonargparse releases after 4.39 announce future API changes on every run; they are not
# actionable for users of this CLI.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jsonargparse.*")
warnings.filterwarnings("ignore", message=r".*jsonargparse.*", category=FutureWarning)
# lightning 2.6 calls a torch pytree API that torch deprecated; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


class _NoAdverts(logging.Filter):
    """Drop Lightning's tips that advertise cloud services at the start of every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())

import torch  # noqa: E402
from lightning.fabric.plugins import CheckpointIO  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402

import src.callbacks  # noqa: E402,F401  (registers callback classes for short names in YAML)
from src.callbacks.fault_tolerance import FaultTolerance, NonFiniteLossError  # noqa: E402
from src.callbacks.scaling import ScalingSetup  # noqa: E402
from src.data import ClassificationDataModule, DataSourceError  # noqa: E402
from src.models import ClassifierModule  # noqa: E402
from src.reliability import (  # noqa: E402
    CheckpointError,
    SafeCheckpointIO,
    assign_log_version,
    check_devices,
    load_checkpoint,
    newest_last_checkpoint,
)

# Values the DataModule knows and the model needs. They are linked at instantiation, so they are
# never written twice; a value for one of them in a YAML file or on the command line is replaced
# by the linked one (the CLI warns when that happens).
LINKED = ("num_classes", "input_size", "class_names")


class CLI(LightningCLI):
    """LightningCLI over the project's base classes (subclass mode), with data → model links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run test on the best checkpoint in the same log folder.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # `validate|test|predict --ckpt_path X` with no config: take the model and data classes
        # and their arguments from the checkpoint, so nothing has to be repeated. Anything given
        # after (a --config, --data.init_args.*) still overrides the data.
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
        self._ckpt_classes: dict[str, str] = {}
        if argv and argv[0] in ("fit", "validate", "test", "predict"):
            ckpt_path = _flag_value(argv, "--ckpt_path")
            if ckpt_path and ckpt_path not in ("best", "last", "hpc", "registry"):
                if not Path(ckpt_path).is_file():
                    sys.exit(
                        f"error: --ckpt_path {ckpt_path!r} is not a file. Pass the path of a .ckpt file."
                    )
                ckpt = _load_checkpoint(ckpt_path)  # refuses corrupt files and pickled code up front
                for key, name in (("hyper_parameters", "model"), ("datamodule_hyper_parameters", "data")):
                    if "_class_path" in (ckpt.get(key) or {}):
                        self._ckpt_classes[name] = ckpt[key]["_class_path"]
            if ckpt_path and argv[0] != "fit" and ckpt_path not in ("best", "last", "hpc", "registry"):
                injected = []
                for key, flag in (("hyper_parameters", "--model"), ("datamodule_hyper_parameters", "--data")):
                    hparams = dict(ckpt.get(key) or {})
                    hparams.pop("_instantiator", None)
                    if "_class_path" in hparams:
                        init = {k: v for k, v in hparams.items() if k != "_class_path" and k not in LINKED}
                        injected += [
                            flag,
                            json.dumps({"class_path": hparams["_class_path"], "init_args": init}),
                        ]
                argv = [argv[0], *injected, *argv[1:]]
            args = argv
        with warnings.catch_warnings():
            # `args` is the command line itself (with what the checkpoint supplies): Lightning's
            # warning about passing both `args` and a command line would print on every run.
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        # A DataModule whose model-facing values come from fitted state (e.g. a vocabulary) gets
        # that state from the checkpoint as soon as it exists, before the data → model links are
        # read, so `test`/`predict --ckpt_path` build the same model without the training data.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        cli = self

        def instantiate_data(
            class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any
        ) -> Any:
            datamodule = data_instantiator(
                class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs
            )
            state = _load_checkpoint(ckpt_path).get(type(datamodule).__qualname__)
            if state:
                datamodule.load_state_dict(state)
            return datamodule

        from lightning.pytorch.cli import _InstantiatorFn

        data_instantiator = _InstantiatorFn(cli=cli, key="data")
        self.parser.add_instantiator(
            instantiate_data, ClassificationDataModule, subclasses=True, prepend=True
        )

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        if cfg.get("data") is None:
            self.parser.error(
                "No data given. Pass a config (--config configs/<name>.yaml) or --data=<DataModule> "
                "(e.g. --data=MNIST1D), or a checkpoint with --ckpt_path for validate/test/predict."
            )
        # A checkpoint of another model/data pair cannot be loaded: say so before building anything.
        for name, ckpt_class in getattr(self, "_ckpt_classes", {}).items():
            chosen = (cfg.get(name) or {}).get("class_path") or ""
            if chosen.rsplit(".", 1)[-1] != ckpt_class.rsplit(".", 1)[-1]:
                self.parser.error(
                    f"--ckpt_path {cfg.get('ckpt_path')!r} holds a {ckpt_class} {name}, but this run builds "
                    f"{name} {chosen or 'None'}. Use a checkpoint written with the same model and data, "
                    "or leave out --config to rebuild both from the checkpoint."
                )
        if problem := check_devices(cfg["trainer"].get("accelerator"), cfg["trainer"].get("devices")):
            self.parser.error(problem)
        model_args = (cfg.get("model") or {}).get("init_args") or {}
        defaults = _init_defaults((cfg.get("model") or {}).get("class_path"))
        for name in LINKED:
            # The parsed config holds the class's defaults too: only a changed value was set by hand.
            if model_args.get(name) not in (None, defaults.get(name)) and name != "class_names":
                warnings.warn(
                    f"model.init_args.{name}={model_args.get(name)!r} is set in the config but is linked "
                    f"from the data (data.{name}); the data's value is used.",
                    stacklevel=1,
                )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # `--trainer.enable_progress_bar=false` should simply switch off the configured bar
        # (Lightning would refuse the combination with a progress-bar callback in the list).
        if config.get("enable_progress_bar") is False:
            config = {
                **config,
                "callbacks": [c for c in config.get("callbacks") or [] if not isinstance(c, ProgressBar)],
            }
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        # Exact resumption and a clean stop on a NaN loss for every run (see FaultTolerance).
        if not any(isinstance(c, FaultTolerance) for c in callbacks + list(config.get("callbacks") or [])):
            callbacks = [*callbacks, FaultTolerance()]
        # Atomic checkpoint writes and weights_only loads, unless a CheckpointIO is configured.
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config = {**config, "plugins": [*plugins, SafeCheckpointIO()]}
        trainer = super()._instantiate_trainer(config, callbacks)
        # Each run gets its own version folder (even when started at the same moment).
        # `fit --ckpt_path last` continues in the folder of the newest run with a last.ckpt;
        # validate/test/predict take that checkpoint and log into a folder of their own.
        sub = self.config.get("subcommand")
        last = bool(sub) and self.config[sub].get("ckpt_path") == "last"
        for logger in trainer.loggers:
            root = getattr(logger, "root_dir", None)
            if last and sub != "fit" and root is not None:
                found = newest_last_checkpoint(Path(root))
                if found is None:
                    sys.exit(
                        f"error: --ckpt_path last: no run under {root!r} has a checkpoints/last.ckpt. Pass "
                        "the path of a .ckpt file."
                    )
                self.config_init[sub]["ckpt_path"] = str(found[1])
            try:
                assign_log_version(logger, resume_last=last and sub == "fit")
            except OSError as err:
                sys.exit(
                    f"error: cannot write the log folder {root!r}: {err}. Pass a writable folder with "
                    "--trainer.logger.init_args.save_dir=<folder>."
                )
        return trainer

    def before_fit(self) -> None:
        # val_size=0: the final fit on every training sample, once the settings were chosen with
        # validation. Nothing is validated, so what watches a validation metric is adapted.
        if getattr(self.datamodule, "has_validation", True):
            return
        kept, changes = [], []
        for cb in self.trainer.callbacks:
            monitor = getattr(cb, "monitor", None)
            if isinstance(cb, EarlyStopping) and str(monitor).startswith("val"):
                changes.append(f"EarlyStopping(monitor={monitor!r}) is off")
                continue
            if isinstance(cb, ModelCheckpoint) and str(monitor).startswith("val"):
                # keep the newest epoch (the end of the schedule) as the "best" checkpoint
                cb.monitor, cb.save_top_k, cb.filename = None, 1, "epoch{epoch:03d}"
                changes.append(f"ModelCheckpoint(monitor={monitor!r}) keeps the last epoch instead")
            kept.append(cb)
        self.trainer.callbacks = kept
        # Lightning's notice about the empty validation loader is what val_size=0 asked for.
        warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
        rank_zero_info(
            "val_size=0: training on every training sample without validation"
            + (f"; {'; '.join(changes)}." if changes else ".")
        )

    def before_validate(self) -> None:
        if not getattr(self.datamodule, "has_validation", True):
            sys.exit(
                "error: val_size=0 leaves no validation split to validate on. Pass a val_size, or run test."
            )

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            ckpt = "best" if self.trainer.checkpoint_callback is not None else None
            if self.trainer.fast_dev_run:
                ckpt = None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


def _init_defaults(class_path: str | None) -> dict[str, Any]:
    """Default ``__init__`` argument values of a class and its bases ({} if it cannot be imported)."""
    import importlib
    import inspect

    try:
        module, _, name = (class_path or "").rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for param in inspect.signature(klass.__init__).parameters.values():
            if param.default is not inspect.Parameter.empty:
                defaults[param.name] = param.default
    return defaults


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _load_checkpoint(path: str) -> dict[str, Any]:
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        sys.exit(f"error: {err}")


def _default_threads() -> int:
    """Torch CPU threads when ``BN_NUM_THREADS`` is unset: 1 on machines with 1-2 cores.

    Measured on a shared 2-core machine under load (benchmarks/speed.py): an epoch with 2 threads
    took 14-19x longer than with 1 (OpenMP threads waiting on busy cores). Larger machines keep
    torch's default (one thread per physical core).
    """
    return 1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()


def main(args: Any = None, run: bool = True) -> CLI:
    """Build and run the CLI (``args`` lets tests and scripts call it in-process)."""
    torch.set_num_threads(int(os.environ.get("BN_NUM_THREADS") or _default_threads()))
    try:
        return CLI(
            ClassifierModule,
            ClassificationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # Scaling: SyncBatchNorm under multi-GPU DDP by default (ScalingSetup keeps per-process
            # BN on CPU, where SyncBatchNorm cannot run) and the effective batch size/LR reported.
            trainer_defaults={"sync_batchnorm": True, "callbacks": [ScalingSetup()]},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )
    except (CheckpointError, NonFiniteLossError, DataSourceError, MisconfigurationException) as err:
        # Expected failures (a missing data source, a bad checkpoint, a diverged loss, settings that
        # do not go together): the message says what to do; a traceback through Lightning's loops
        # adds nothing.
        sys.exit(f"error: {err}")
    except RuntimeError as err:
        if "Error(s) in loading state_dict" not in str(err):
            raise
        detail = "\n".join(str(err).splitlines()[:6])
        sys.exit(
            f"error: the checkpoint does not fit the model this run builds:\n{detail}\nThe model or data "
            "options differ from those the checkpoint was trained with; leave out --config (validate/test/"
            "predict rebuild both from the checkpoint) or pass the options of the checkpoint's run."
        )


if __name__ == "__main__":
    main()
