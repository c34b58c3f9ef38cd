"""What the CLI checks before it builds anything, and once the model exists: each problem is a
:class:`~src.runtime.errors.UsageError` saying what to pass instead, so nothing starts that cannot finish."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from src.runtime.checkpoints import read_metadata
from src.runtime.errors import UsageError
from src.runtime.resume import import_class
from src.runtime.settings import config_differences

# Values the data knows and the model needs, linked at instantiation so they are never written twice.
LINKED = ("num_classes", "input_size", "class_names")
_KINDS = {"features": "feature vectors (signals, images)", "tokens": "token ids (text)"}


def check_given(cfg: Any) -> None:
    """A model and data are given."""
    for part in ("data", "model"):
        if cfg.get(part) is None:
            raise UsageError(
                f"no {part} given. Pass a config (--config configs/<name>.yaml), or --ckpt_path <checkpoint> "
                "for validate/test/predict."
            )


def check_command(subcommand: str | None, cfg: Any, given_model: dict[str, Any]) -> None:
    """The model and data can go together; a ``fit`` trains something; linked values set by hand are
    named (the data's win)."""
    model_cls, data_cls = import_class(cfg.model.class_path), import_class(cfg.data.class_path)
    model_kind, data_kind = getattr(model_cls, "input_kind", None), getattr(data_cls, "input_kind", None)
    if model_kind and data_kind and model_kind != data_kind:
        raise UsageError(
            f"{model_cls.__name__} reads {_KINDS[model_kind]}, but {data_cls.__name__} yields {_KINDS[data_kind]}. "
            "Pair the model with data of its kind (see configs/)."
        )
    for name in LINKED:
        if (given_model.get("init_args") or {}).get(name) is not None:
            rank_zero_warn(
                f"model.init_args.{name} is set in the config, but it is linked from the data (data.{name}); "
                "the data's value is used. Remove it from the config."
            )
    if subcommand == "fit":
        for key in ("max_epochs", "max_steps", "limit_train_batches"):
            if cfg.trainer.get(key) == 0:
                raise UsageError(
                    f"--trainer.{key}=0 trains nothing. Pass a positive value, or run validate/test instead."
                )


def check_checkpoint(
    subcommand: str | None,
    cfg: Any,
    checkpoint: Path,
    given_model: dict[str, Any],
    resumable: tuple[str, ...],
) -> None:
    """The checkpoint holds this run's kind of data; a model setting of the command that the
    checkpoint's hyperparameters replace (Lightning re-reads them) is refused for a resumed ``fit``
    and named otherwise, never dropped silently; ``resumable`` settings (a tuner's) may differ."""
    stored = (read_metadata(checkpoint).get("datamodule_hyper_parameters") or {}).get("_class_path", "")
    if stored and stored.rsplit(".", 1)[-1] != cfg.data.class_path.rsplit(".", 1)[-1]:
        raise UsageError(
            f"--ckpt_path {checkpoint} holds a {stored} data, but this run builds data {cfg.data.class_path}. "
            "Use a checkpoint of the same model and data, or leave out --config (validate/test/predict rebuild "
            "both from the checkpoint)."
        )
    model = cfg.model.as_dict() if hasattr(cfg.model, "as_dict") else dict(cfg.model)
    differences = config_differences({"model": given_model}, {"model": model}, resumable)
    differences = [d for d in differences if d.split(":")[0].rsplit(".", 1)[-1] not in LINKED]
    if not differences:
        return
    shown = "; ".join(differences[:8]) + (" ..." if len(differences) > 8 else "")
    if subcommand == "fit":
        raise UsageError(
            f"--ckpt_path {checkpoint} was trained with other model settings than this command gives (command -> "
            f"checkpoint: {shown}). A resumed run keeps its model: drop these options, or start a new run without "
            "--ckpt_path."
        )
    rank_zero_warn(
        f"The checkpoint's model settings are used, not the command's (command -> checkpoint): {shown}."
    )


def check_weights_fit(model: torch.nn.Module, checkpoint: Path) -> None:
    """The checkpoint's weights have the names and shapes of the model this run built."""
    stored = read_metadata(checkpoint)["state_dict"]
    built = model.state_dict()
    problems = [f"{k}: missing in the checkpoint" for k in built if k not in stored]
    problems += [f"{k}: not in this model" for k in stored if k not in built]
    problems += [
        f"{k}: checkpoint {tuple(stored[k].shape)}, this model {tuple(v.shape)}"
        for k, v in built.items()
        if k in stored and tuple(stored[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise UsageError(
            f"the checkpoint {checkpoint} does not fit the model this run builds ("
            + "; ".join(problems[:4])
            + (" ..." if len(problems) > 4 else "")
            + "). The model or data options differ from those it was trained with: leave out --config "
            "(validate/test/predict rebuild both from the checkpoint) or pass the options of its run."
        )
