"""Checkpoint → the eval-mode model and its DataModule, for the exporter and the prediction server.

:func:`load_for_inference` rebuilds both from a checkpoint alone, without the training data: the
classes the checkpoint names, their settings, and the DataModule's fitted state (class names, a
normalisation, a vocabulary). It is the one place that knows how a checkpoint stores its run
configuration. How a raw input becomes a model input is the DataModule's own business
(``parse_raw_input``, ``raw_inputs_to_batch``, ``describe_raw_inputs``: see
:class:`src.data.base.ClassificationDataModule`).

    python -c "from src.tools.inference import load_for_inference; print(load_for_inference('last.ckpt'))"
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from src.data.base import ClassificationDataModule, DataError
from src.models.classifier import ClassifierModule
from src.runtime.checkpoints import CheckpointError, load_checkpoint
from src.runtime.errors import UsageError


class InferenceError(UsageError):
    """A checkpoint that cannot be turned into an inference model; the message says why."""


def load_for_inference(
    ckpt_path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ClassifierModule, ClassificationDataModule]:
    """Rebuild the eval-mode model and its DataModule (fitted state restored) from a checkpoint.

    The classes come from the checkpoint (``_class_path``), their settings from its hyperparameters
    through Lightning's ``load_from_checkpoint`` (weights only, nothing unpickled), the DataModule's
    fitted state from the entry Lightning keeps for it, checked by its ``check_fitted()``. No
    training data is touched.

    Raises:
        InferenceError: missing/corrupt file, a checkpoint without this project's model or
            DataModule classes, weights that do not fit the model, or missing fitted state.
    """
    path = str(ckpt_path)
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except CheckpointError as err:
        raise InferenceError(str(err)) from err
    model_cls = _class(ckpt, "hyper_parameters", ClassifierModule, path)
    data_cls = _class(ckpt, "datamodule_hyper_parameters", ClassificationDataModule, path)
    try:
        # eager network: inference runs it as it is, and export must trace it
        model = model_cls.load_from_checkpoint(
            path, map_location=map_location, weights_only=True, compile_model=False
        )
        datamodule = data_cls.load_from_checkpoint(path, weights_only=True)
    except RuntimeError as err:
        detail = "\n".join(str(err).splitlines()[:4])
        raise InferenceError(
            f"checkpoint {path!r}: its weights do not fit the {model_cls.__name__} its hyperparameters "
            f"describe:\n{detail}\nThe file was edited or mixes two runs; use a checkpoint as written by fit."
        ) from err
    except (TypeError, ValueError) as err:
        raise InferenceError(f"checkpoint {path!r}: cannot rebuild its model or data: {err}") from err
    try:
        datamodule.check_fitted()
    except DataError as err:
        raise InferenceError(f"checkpoint {path!r}: {err}") from err
    model.eval()  # BatchNorm uses its running statistics, dropout is off
    model.requires_grad_(False)
    return model, datamodule


def _class(ckpt: dict[str, Any], key: str, base: type, path: str) -> type:
    """The class named in ``ckpt[key]['_class_path']``, a subclass of ``base``."""
    what = "model" if base is ClassifierModule else "DataModule"
    class_path = (ckpt.get(key) or {}).get("_class_path")
    if not isinstance(class_path, str):
        raise InferenceError(
            f"checkpoint {path!r} does not name its {what} class ({key}['_class_path'] is missing): it was not "
            "written by `python -m src.cli fit`. Export and serve need a checkpoint of this project."
        )
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise InferenceError(
            f"checkpoint {path!r} names {what} class {class_path!r}, which cannot be imported."
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise InferenceError(f"checkpoint {path!r} names {class_path!r}, which is not a {base.__name__}.")
    return cls
