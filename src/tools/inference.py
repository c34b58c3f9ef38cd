"""Checkpoint → model ready for inference, and raw inputs → the tensor that model takes.

Shared by the exporter (:mod:`src.tools.export`) and the prediction server (:mod:`src.tools.serve`):

- :func:`load_for_inference` rebuilds the eval-mode LightningModule and its DataModule (with the
  fitted state the checkpoint carries: class names, Fashion-MNIST mean/std, the AG News
  vocabulary) from a checkpoint alone, without the training data. It is the one place that knows
  how a checkpoint stores its run configuration.
- :func:`encoder_for` picks the :class:`InputEncoder` for the DataModule's input kind: a 40-value
  MNIST-1D signal, a 28×28 Fashion-MNIST image (PNG or pixel array), or an AG News text. Each
  encoder validates raw JSON-style inputs (:meth:`InputEncoder.parse`, no torch involved, so it
  can run in the server's HTTP processes), turns them into the model's input batch exactly as the
  DataModule does for ``predict`` (:meth:`InputEncoder.encode`), and describes that for the
  export sidecar (:meth:`InputEncoder.describe`).

    python -c "from src.tools.inference import load_for_inference; print(load_for_inference('last.ckpt'))"
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from src.data.base import ClassificationDataModule
from src.models.classifier import ClassifierModule
from src.runtime.checkpoints import CheckpointError, load_checkpoint


class InferenceError(RuntimeError):
    """A checkpoint that cannot be turned into an inference model; the message says why."""


class InputError(ValueError):
    """A raw input that cannot be encoded for the model.

    Attributes:
        status: the HTTP status the server answers with (400 malformed, 413 too large, 422 wrong shape).
        index: position of the offending input in the request (``None``: the request as a whole).
    """

    def __init__(self, message: str, status: int = 422, index: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.index = index

    def detail(self) -> dict[str, Any]:
        """JSON-ready error detail for an HTTP response."""
        out: dict[str, Any] = {"error": str(self)}
        if self.index is not None:
            out["input_index"] = self.index
        return out


# ------------------------------------------------------------------------------ checkpoint
def load_for_inference(
    ckpt_path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ClassifierModule, ClassificationDataModule]:
    """Rebuild the eval-mode model and its DataModule (fitted state restored) from a checkpoint.

    The classes come from the checkpoint (``_class_path``), their settings from its hyperparameters
    through Lightning's ``load_from_checkpoint`` (weights only, nothing unpickled), the DataModule's
    fitted state (class names, normalisation, vocabulary) from the entry Lightning keeps for it. No
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
    _check_fitted_state(datamodule, path)
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


def _check_fitted_state(datamodule: ClassificationDataModule, path: str) -> None:
    """Refuse a DataModule whose fitted state is missing (it would otherwise go looking for data)."""
    from src.data.ag_news import AGNews
    from src.data.fashion_mnist import FashionMNIST

    if isinstance(datamodule, AGNews) and datamodule.vocab is None:
        raise InferenceError(f"checkpoint {path!r} carries no AG News vocabulary (AGNews state is missing).")
    if isinstance(datamodule, FashionMNIST) and (datamodule.mean is None or datamodule.std is None):
        raise InferenceError(
            f"checkpoint {path!r} carries no Fashion-MNIST normalisation (FashionMNIST mean/std are missing)."
        )


# ------------------------------------------------------------------------------ encoders
class InputEncoder(ABC):
    """Raw inputs of one kind → the model's input batch.

    ``parse`` validates JSON-style inputs (one list entry per input) and returns them in a
    canonical form; ``encode`` turns canonical inputs into the batch tensor the model takes.
    """

    kind: str
    input_name: str = "input"

    @abstractmethod
    def parse_one(self, value: Any, index: int) -> Any:
        """Validate one raw input; raise :class:`InputError` naming ``index``."""

    @abstractmethod
    def encode(self, items: Sequence[Any]) -> Tensor:
        """Canonical inputs (from :meth:`parse`) → the model's input batch."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Input spec and preprocessing, self-contained (for the export sidecar)."""

    @abstractmethod
    def example(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` synthetic model inputs (when no real data is at hand)."""

    @abstractmethod
    def input_spec(self) -> dict[str, Any]:
        """Name, dtype and shape (symbolic dims as strings) of the model's input tensor."""

    def parse(self, values: Any, max_inputs: int | None = None) -> list[Any]:
        """Validate a request's list of raw inputs; return them in canonical form."""
        if not isinstance(values, list):
            raise InputError(f'"inputs" must be a list of {self.kind} inputs, got {_type_name(values)}.', 400)
        if not values:
            raise InputError('"inputs" is empty: send at least one input.', 400)
        if max_inputs is not None and len(values) > max_inputs:
            raise InputError(
                f"{len(values)} inputs in one request; at most {max_inputs} are accepted. Split the request.",
                413,
            )
        return [self.parse_one(v, i) for i, v in enumerate(values)]


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SignalEncoder(InputEncoder):
    """MNIST-1D: each input is a list of ``length`` numbers, used as they are (float32)."""

    length: int
    kind: str = "signal"

    def parse_one(self, value: Any, index: int) -> list[float]:
        if not isinstance(value, list) or len(value) != self.length:
            got = f"{len(value)} values" if isinstance(value, list) else _type_name(value)
            raise InputError(
                f"input {index}: expected a list of {self.length} numbers, got {got}.", 422, index
            )
        if not all(_is_number(v) and math.isfinite(v) for v in value):
            raise InputError(f"input {index}: every value must be a finite number.", 422, index)
        return value

    def encode(self, items: Sequence[list[float]]) -> Tensor:
        return torch.tensor(items, dtype=torch.float32).reshape(len(items), self.length)

    def input_spec(self) -> dict[str, Any]:
        return {"name": self.input_name, "dtype": "float32", "shape": ["batch", self.length]}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "raw_input": f"a list of {self.length} numbers (an MNIST-1D signal)",
            "normalisation": None,
            "steps": ["stack the signals into a float32 (batch, length) array; no normalisation"],
        }

    def example(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, self.length, generator=generator)


@dataclass
class ImageEncoder(InputEncoder):
    """Fashion-MNIST: each input is a 28×28 grayscale image, as a base64 PNG string or a pixel array.

    Pixels are normalised as ``FashionMNIST.transform_batch`` does: ``(pixel - mean) / std`` on the
    0-255 scale, with the training part's mean and std from the checkpoint.
    """

    mean: float
    std: float
    height: int = 28
    width: int = 28
    kind: str = "image"

    def parse_one(self, value: Any, index: int) -> np.ndarray:
        if isinstance(value, str):
            return self._decode_image(value, index)
        if isinstance(value, dict) and set(value) == {"png"} and isinstance(value["png"], str):
            return self._decode_image(value["png"], index)
        if isinstance(value, list):
            return self._pixels(value, index)
        raise InputError(
            f"input {index}: expected a base64 PNG string or a {self.height}x{self.width} array of 0-255 "
            f"values, got {_type_name(value)}.",
            422,
            index,
        )

    def _pixels(self, rows: list[Any], index: int) -> np.ndarray:
        shape_ok = len(rows) == self.height and all(
            isinstance(r, list) and len(r) == self.width for r in rows
        )
        if not shape_ok:
            flat = len(rows) == self.height * self.width and all(_is_number(v) for v in rows)
            if not flat:
                raise InputError(
                    f"input {index}: a pixel array must be {self.height} rows of {self.width} values "
                    f"(or {self.height * self.width} values), got {_shape_of(rows)}.",
                    422,
                    index,
                )
            rows = [rows[r * self.width : (r + 1) * self.width] for r in range(self.height)]
        values = [v for r in rows for v in r]
        # Integers 0-255 only: the model was trained on uint8 pixels (a 0-1 float image would be
        # silently misread as almost black).
        if not all(_is_number(v) and math.isfinite(v) and v == int(v) and 0 <= v <= 255 for v in values):
            raise InputError(f"input {index}: pixel values must be integers from 0 to 255.", 422, index)
        return np.asarray(values, dtype=np.uint8).reshape(self.height, self.width)

    def _decode_image(self, text: str, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise InputError(f"input {index}: not valid base64 ({err}).", 422, index) from err
        try:
            with Image.open(io.BytesIO(raw)) as img:
                if img.size != (self.width, self.height):
                    raise InputError(
                        f"input {index}: the image is {img.size[0]}x{img.size[1]}, not {self.width}x{self.height}.",
                        422,
                        index,
                    )
                # as FashionMNIST's decoder does: grayscale, converted if need be
                return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8).copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise InputError(
                f"input {index}: not a readable image ({type(err).__name__}).", 422, index
            ) from err

    def encode(self, items: Sequence[np.ndarray]) -> Tensor:
        x = torch.from_numpy(np.stack(items)) if len(items) else torch.empty(0, self.height, self.width)
        return (x.float() - self.mean) / self.std  # FashionMNIST.transform_batch (no augmentation)

    def input_spec(self) -> dict[str, Any]:
        return {"name": self.input_name, "dtype": "float32", "shape": ["batch", self.height, self.width]}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "raw_input": f"a {self.width}x{self.height} grayscale image: PNG, or pixel values 0-255",
            "normalisation": {"mean": self.mean, "std": self.std, "scale": 1.0},
            "steps": [
                "decode the image and convert it to 8-bit grayscale (PIL mode 'L') if it is not",
                f"pixels as float32 on the 0-255 scale (scale 1.0: not divided by 255), shape ({self.height}, "
                f"{self.width})",
                "x = (pixel * scale - mean) / std",
                f"stack into a (batch, {self.height}, {self.width}) float32 array",
            ],
        }

    def example(self, n: int, generator: torch.Generator) -> Tensor:
        pixels = torch.randint(0, 256, (n, self.height, self.width), generator=generator, dtype=torch.uint8)
        return (pixels.float() - self.mean) / self.std


def _shape_of(value: Any) -> str:
    if not isinstance(value, list):
        return _type_name(value)
    inner = {len(v) for v in value if isinstance(v, list)}
    if inner and len(inner) == 1:
        return f"{len(value)}x{inner.pop()} values"
    return f"a list of {len(value)} entries"


@dataclass
class TextEncoder(InputEncoder):
    """AG News: each input is a text; preprocessed, tokenized and numericalised by :mod:`src.data.text`
    with the checkpoint's vocabulary, truncated to ``max_length`` tokens, right-padded with ``<pad>``
    to the longest text of the batch (at least ``min_length``)."""

    itos: list[str]
    max_length: int
    min_length: int
    tokenizer_version: int
    kind: str = "text"
    input_name: str = "token_ids"

    def __post_init__(self) -> None:
        from src.data.text import Vocabulary

        self.vocab = Vocabulary(self.itos)

    def parse_one(self, value: Any, index: int) -> str:
        if not isinstance(value, str):
            raise InputError(
                f"input {index}: expected a text (a JSON string), got {_type_name(value)}.", 422, index
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate ("\ud800") decodes from JSON but is not text
            raise InputError(f"input {index}: not valid UTF-8 text ({err.reason}).", 400, index) from err
        return value

    def encode(self, items: Sequence[str]) -> Tensor:
        from src.data.text import numericalize

        ids, _ = numericalize(list(items), self.vocab, self.max_length, self.min_length)
        return ids

    def input_spec(self) -> dict[str, Any]:
        return {"name": self.input_name, "dtype": "int64", "shape": ["batch", "sequence"]}

    def describe(self) -> dict[str, Any]:
        from src.data import text as t

        return {
            "kind": self.kind,
            "raw_input": "a UTF-8 text",
            "normalisation": None,
            "tokenizer": {
                "version": self.tokenizer_version,
                "lowercase": True,
                # src.data.text.preprocess, in order; every pattern is a Python `re` pattern
                "preprocess": [
                    {"step": "replace", "pattern": t._BACKSLASHES.pattern, "with": " "},
                    {"step": "prefix_entities", "pattern": t._BARE_ENTITY.pattern, "with": "&\\1"},
                    {"step": "html_unescape", "note": "Python html.unescape"},
                    {"step": "replace", "pattern": t._TAG.pattern, "with": " "},
                    {"step": "replace", "pattern": t._URL.pattern, "with": " "},
                    {
                        "step": "translate",
                        "table": {
                            "\u2018": "'",
                            "\u2019": "'",
                            "\u201c": '"',
                            "\u201d": '"',
                            "\u2014": " - ",
                            "\x97": " - ",
                        },
                    },
                    {"step": "lowercase", "note": "Python str.lower"},
                    {"step": "collapse_whitespace", "note": "' '.join(text.split())"},
                ],
                "empty_text": "an empty or missing text gives no tokens",
                "token_pattern": t._TOKEN.pattern,
                "tokenize": "re.findall(token_pattern, text): words, English clitics, single punctuation marks",
            },
            "vocabulary": list(self.itos),
            "pad_id": t.PAD_ID,
            "unk_id": t.UNK_ID,
            "max_length": self.max_length,
            "min_length": self.min_length,
            "steps": [
                "tokens = tokenize(preprocess(text))[:max_length]",
                "ids = [vocabulary.index(token) if token in vocabulary else unk_id for token in tokens]",
                "right-pad every text's ids with pad_id to the longest in the batch, but at least min_length",
            ],
        }

    def example(self, n: int, generator: torch.Generator) -> Tensor:
        from src.data.text import PAD_ID

        width = max(self.min_length, 12)
        ids = torch.randint(2, len(self.itos), (n, width), generator=generator)
        lengths = torch.randint(0, width + 1, (n,), generator=generator)
        return ids.masked_fill(torch.arange(width) >= lengths.unsqueeze(1), PAD_ID)


def encoder_for(datamodule: ClassificationDataModule) -> InputEncoder:
    """The encoder of the DataModule's input kind, holding its fitted state (vocabulary, mean/std)."""
    from src.data.ag_news import AGNews
    from src.data.fashion_mnist import IMAGE_SIZE, FashionMNIST
    from src.data.mnist1d import MNIST1D
    from src.data.text import TOKENIZER_VERSION

    if isinstance(datamodule, AGNews):
        assert datamodule.vocab is not None, "load_for_inference checks the vocabulary"
        return TextEncoder(
            list(datamodule.vocab.itos), datamodule.max_length, datamodule.min_batch_length, TOKENIZER_VERSION
        )
    if isinstance(datamodule, FashionMNIST):
        assert datamodule.mean is not None and datamodule.std is not None
        return ImageEncoder(float(datamodule.mean), float(datamodule.std), IMAGE_SIZE, IMAGE_SIZE)
    if isinstance(datamodule, MNIST1D):
        return SignalEncoder(datamodule.input_size)
    raise InferenceError(
        f"no input encoder for {type(datamodule).__name__}: export and serve support the MNIST1D, "
        "FashionMNIST and AGNews DataModules."
    )


def class_names(model: ClassifierModule) -> list[str]:
    """The class names the model was trained with (from the checkpoint's hyperparameters)."""
    return list(model.class_names)


def sample_inputs(
    datamodule: ClassificationDataModule, encoder: InputEncoder, n: int, seed: int = 0
) -> tuple[Tensor, str, bool]:
    """Up to ``n`` model inputs from the checkpoint's test split, as ``predict`` feeds them.

    Falls back to ``n`` synthetic inputs when the data source cannot be read (moved, offline).
    Returns the inputs, a description of where they come from (and why), and whether they are real.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            datamodule.prepare_data()
            datamodule.setup("test")
            split = datamodule.splits["test"]
        batch = datamodule.collate(tuple(t[:n] for t in split))
        x = datamodule.transform_batch(batch, training=False)[0]
        return x.cpu(), f"{len(x)} samples of the test split", True
    except Exception as err:  # any data-source failure: check on synthetic inputs instead, and say so
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        x = encoder.example(n, torch.Generator().manual_seed(seed))
        return x, f"{n} synthetic inputs (the test data is not available: {reason})", False
