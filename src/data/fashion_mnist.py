"""Fashion-MNIST: 28×28 grayscale images of Zalando articles in 10 classes (Hugging Face dataset).

    python -m src.cli fit --config configs/fashion_mnist_mlp_bn.yaml                    # from the Hub
    python -m src.cli fit --config configs/fashion_mnist_mlp_bn.yaml \\
        --data.init_args.data_dir=../shared/data/fashion_mnist                           # local parquet

The PNGs are decoded once into a uint8 tensor cache (60,000×28×28 is 47 MB); batches are
normalised on the device with the mean/std of the training part, so no per-sample PIL decoding
happens while training. A raw input (export, serve) is a PNG or a pixel array, decoded by the same
:func:`open_image` and normalised by the same :meth:`FashionMNIST.transform_batch`.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from src.data.base import DataError, Split, load_cache, save_cache
from src.data.hub import DataSourceError, HubDataModule, check_labels
from src.data.raw_inputs import RawInputError, number_array, type_name
from src.runtime.value_types import NonNegativeInt

IMAGE_SIZE = 28
# The names of the Hub dataset card (its ClassLabel feature); used until the data says otherwise.
CLASS_NAMES = [
    "T - shirt / top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CACHE_VERSION = 1


class FashionMNIST(HubDataModule):
    """Fashion-MNIST from the Hub (``zalando-datasets/fashion_mnist``) or local parquet files.

    The official test split (10,000 images) is used for ``test`` and ``predict``; validation is
    carved from the training split with ``split_seed`` (default 5,000 images), unless the local
    source has a ``validation`` file. Pixels are normalised with the mean and standard deviation
    of the training part only (after the validation split is carved off); both are saved in the
    checkpoint with the class names.

    Args:
        hub_name: Hugging Face Hub dataset id (used when no local source is given).
        data_dir: folder with ``train.parquet`` and ``test.parquet`` (``validation.parquet``
            optional) in the Hub schema (``image``: PNG, ``label``: ClassLabel), e.g.
            ``../shared/data/fashion_mnist``. Loading from it never touches the network.
        data_files: explicit split → parquet file mapping instead of ``data_dir``.
        cache_dir: folder for the decoded uint8 tensor cache (keyed by the source files).
        hflip: train-time random horizontal flips (light augmentation; off by default).
        max_shift: train-time random translations of up to this many pixels (0 = off).
        val_size: images carved from the training split for validation (count or fraction).
        **kwargs: ``hf_cache_dir`` and the batching/split options of the base DataModules.
    """

    columns = ("image", "label")

    def __init__(
        self,
        hub_name: str = "zalando-datasets/fashion_mnist",
        data_dir: str | None = None,
        data_files: dict[str, str] | None = None,
        cache_dir: str = "data_cache/fashion_mnist",
        hflip: bool = False,
        max_shift: NonNegativeInt = 0,
        val_size: int | float = 5000,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            hub_name=hub_name,
            data_dir=data_dir,
            data_files=data_files,
            cache_dir=cache_dir,
            val_size=val_size,
            **kwargs,
        )
        if max_shift >= IMAGE_SIZE:
            raise ValueError(f"max_shift must be below the image size {IMAGE_SIZE}, got {max_shift}")
        self.hflip = hflip
        self.max_shift = max_shift
        self.mean: float | None = None
        self.std: float | None = None
        self._source_key: str | None = None

    @property
    def num_classes(self) -> int:
        return len(CLASS_NAMES)

    @property
    def input_size(self) -> int:
        return IMAGE_SIZE * IMAGE_SIZE

    def default_class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    # ------------------------------------------------------------------ tensor cache
    def cache_file(self, key: str) -> Path:
        return self.cache_dir / f"fashion_mnist_v{CACHE_VERSION}_{key}.pt"

    def _current_cache_file(self) -> Path:
        try:
            self._source_key = self.source_key()
        except DataSourceError:
            # The local files are gone; a checkpoint may still name a cache built from them.
            if self._source_key is not None and self.cache_file(self._source_key).is_file():
                warnings.warn(
                    f"{self.data_dir or self.data_files} is not available; using the decoded cache "
                    f"{self.cache_file(self._source_key)} that the checkpoint names.",
                    stacklevel=2,
                )
                return self.cache_file(self._source_key)
            raise
        return self.cache_file(self._source_key)

    def prepare_data(self) -> None:
        path = self._current_cache_file()
        if not path.is_file():
            self._build_cache(path)

    def _build_cache(self, path: Path) -> dict[str, Any]:
        ds = self.load_hf()
        tensors: dict[str, Any] = {"class_names": self.class_names}
        for split, part in ds.items():
            tensors[f"{split}_y"] = check_labels(
                part[self.label_column],
                self.num_classes,
                split,
                "Pass Fashion-MNIST parquet files (label: a class index).",
            )
            tensors[f"{split}_x"] = decode_images(part, split)
        save_cache(tensors, path)
        return tensors

    def load_splits(self) -> dict[str, Split]:
        path = self._current_cache_file()
        data = load_cache(path) if path.is_file() else None
        if data is None:
            data = self._build_cache(path)
        self._class_names = list(data["class_names"])
        splits = {"train": (data["train_x"], data["train_y"]), "test": (data["test_x"], data["test_y"])}
        if "validation_x" in data:
            splits["val"] = (data["validation_x"], data["validation_y"])
        return splits

    # ------------------------------------------------------------------ normalisation
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.mean is None or self.std is None:
            # Statistics of the training part only (validation already carved off): no leakage.
            self.mean, self.std = pixel_stats(self.splits["train"][0])

    def transform_batch(self, batch: Split, training: bool) -> Split:
        x, *rest = batch
        if self.mean is None or self.std is None:
            raise RuntimeError("FashionMNIST.setup() has not run: the normalisation statistics are unknown.")
        if training and self.max_shift:
            x = random_shift(x, self.max_shift)
        if training and self.hflip:
            flip = torch.rand(x.shape[0], 1, 1, device=x.device) < 0.5
            x = torch.where(flip, x.flip(-1), x)
        return ((x.float() - self.mean) / self.std, *rest)

    # ------------------------------------------------------------------ raw inputs (export, serve)
    @property
    def input_shape(self) -> tuple[int, int]:
        return (IMAGE_SIZE, IMAGE_SIZE)

    def check_fitted(self) -> None:
        if self.mean is None or self.std is None:
            raise DataError(
                "no Fashion-MNIST normalisation (FashionMNIST mean/std): it is fitted on the training part in "
                "setup() and travels in the checkpoints fit writes."
            )

    def parse_raw_input(self, value: Any) -> np.ndarray:
        """A base64 PNG (or ``{"png": "<base64>"}``), or a 28×28 array (or 784 values) of integer
        pixels 0-255 → a (28, 28) uint8 image."""
        if isinstance(value, dict) and set(value) == {"png"}:
            value = value["png"]
        if isinstance(value, str):
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as err:
                raise RawInputError(f"not valid base64 ({err}).") from None
            try:
                return open_image(raw)
            except ImageError as err:
                if err.size is not None:
                    w, h = err.size
                    raise RawInputError(
                        f"the image is {w}x{h}, expected {IMAGE_SIZE}x{IMAGE_SIZE}."
                    ) from None
                raise RawInputError(f"not a readable {IMAGE_SIZE}x{IMAGE_SIZE} image ({err}).") from None
        if not isinstance(value, list):
            raise RawInputError(
                f"expected a base64 PNG string or a {IMAGE_SIZE}x{IMAGE_SIZE} array of pixels 0-255, got "
                f"{type_name(value)}."
            )
        what = f"a {IMAGE_SIZE}x{IMAGE_SIZE} array (or {IMAGE_SIZE * IMAGE_SIZE} values) of pixels 0-255"
        pixels = number_array(value, what)
        if pixels.shape == (IMAGE_SIZE * IMAGE_SIZE,):
            pixels = pixels.reshape(IMAGE_SIZE, IMAGE_SIZE)
        if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE):
            raise RawInputError(f"expected {what}, got shape {'x'.join(map(str, pixels.shape))}.")
        # Integers 0-255 only: the model was trained on uint8 pixels (a 0-1 float image would be
        # silently misread as almost black).
        with np.errstate(invalid="ignore"):
            integral = pixels.dtype.kind in "iu" or bool((np.mod(pixels, 1) == 0).all())
        if not (integral and pixels.min() >= 0 and pixels.max() <= 255):
            raise RawInputError("pixel values must be integers from 0 to 255.")
        return pixels.astype(np.uint8)

    def example_inputs(self, n: int, generator: torch.Generator) -> Tensor:
        pixels = torch.randint(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE), generator=generator, dtype=torch.uint8)
        return self._eval_transform(pixels)

    def describe_raw_inputs(self) -> dict[str, Any]:
        return {
            "kind": "image",
            "raw_input": f"a {IMAGE_SIZE}x{IMAGE_SIZE} grayscale image: PNG, or pixel values 0-255",
            "normalisation": {"mean": self.mean, "std": self.std, "scale": 1.0},
            "steps": [
                "decode the image and convert it to 8-bit grayscale (PIL mode 'L') if it is not",
                f"pixels as float32 on the 0-255 scale (scale 1.0: not divided by 255), shape ({IMAGE_SIZE}, "
                f"{IMAGE_SIZE})",
                "x = (pixel * scale - mean) / std",
                f"stack into a (batch, {IMAGE_SIZE}, {IMAGE_SIZE}) float32 array",
            ],
            "self_contained": True,
        }

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.mean is not None and self.std is not None:
            state.update(mean=self.mean, std=self.std)
        if self._source_key is not None:
            state["source_key"] = self._source_key
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "mean" in state_dict and "std" in state_dict:
            self.mean, self.std = float(state_dict["mean"]), float(state_dict["std"])
        self._source_key = state_dict.get("source_key", self._source_key)


class ImageError(Exception):
    """An image that cannot be used: unreadable, or (``size`` set) not 28×28."""

    def __init__(self, reason: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(reason)
        self.size = size


def open_image(source: bytes | str) -> np.ndarray:
    """One encoded image (bytes, or a file path) → a ``(28, 28)`` uint8 array, converted to 8-bit
    grayscale (PIL mode ``L``) if it is not. Its size is checked before any pixel is decoded.

    Raises:
        ImageError: the image is unreadable, too large for PIL to open safely, or not 28×28.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise ImageError(f"{img.size[0]}x{img.size[1]}", size=img.size)
            return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)
    except Image.DecompressionBombError as err:  # PIL refuses to open it: its size is all we know
        raise ImageError(f"too large to open safely: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{type(err).__name__}: {err}") from None


def decode_images(part: Any, split: str) -> Tensor:
    """Decode a split's PNG column once into a ``(N, 28, 28)`` uint8 tensor; a missing, undecodable or
    wrongly sized image is a :class:`DataSourceError` naming the split and the row."""
    import datasets

    hint = "Pass Fashion-MNIST parquet files (image: a 28×28 grayscale PNG per row)."
    raw = part.cast_column("image", datasets.Image(decode=False))["image"]
    out = np.empty((len(raw), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, item in enumerate(raw):
        source = (item or {}).get("bytes") or (item or {}).get("path")
        if not source:
            raise DataSourceError(f"Image {i} of the {split} split is empty (null). {hint}")
        try:
            out[i] = open_image(source)
        except ImageError as err:
            if err.size is not None:
                w, h = err.size
                raise DataSourceError(
                    f"Image {i} of the {split} split is {w}×{h}, not {IMAGE_SIZE}×{IMAGE_SIZE}. {hint}"
                ) from None
            raise DataSourceError(
                f"Image {i} of the {split} split is not a readable image ({err}). {hint}"
            ) from None
    return torch.from_numpy(out)


def pixel_stats(images: Tensor) -> tuple[float, float]:
    """Mean and standard deviation of all pixels (uint8 scale), in float64 for accuracy."""
    x = images.to(torch.float64)
    return float(x.mean()), float(x.std())


def random_shift(x: Tensor, max_shift: int) -> Tensor:
    """Translate each image of ``x`` (N, H, W) by its own random offset in [-max_shift, max_shift]
    pixels, filling with zeros (background)."""
    n, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), device=x.device)
    rows = (off[:, :1] + torch.arange(h, device=x.device)).unsqueeze(-1).expand(n, h, w + 2 * max_shift)
    x = torch.gather(padded, 1, rows)
    cols = (off[:, 1:] + torch.arange(w, device=x.device)).unsqueeze(1).expand(n, h, w)
    return torch.gather(x, 2, cols)
