"""Tiny stand-ins for each DataModule's real data, as CLI flags (the real data never enters the tests).

``TINY_DATA`` maps a DataModule's class name (as in ``configs/*.yaml``) to a builder of CLI flags;
``tests/test_configs.py`` replays every config on it and fails for a config whose data class has no
builder here: register one for a new dataset with :func:`register`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

TINY_DATA: dict[str, Callable[[Path], list[str]]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        TINY_DATA[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------------------------- MNIST-1D
@register("MNIST1D")
def tiny_mnist1d(tmp_path: Path) -> list[str]:
    """600 signals: 420 train, 60 validation, 120 test; batches of 32 (14 steps per epoch)."""
    return [
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.num_samples=600",
        "--data.init_args.val_size=60",
        "--data.init_args.batch_size=32",
    ]


# ---------------------------------------------------------------------------------- Fashion-MNIST
FASHION_CLASSES = [
    "T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def write_fashion(path: Path, n: int, seed: int = 0, size: int = 28, brightness: bool = True) -> Path:
    """``n`` random images (each with its own brightness, so subsets differ in mean) as Hub parquet."""
    import datasets

    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 1.0, (n, 1, 1)) if brightness else np.ones((n, 1, 1))
    images = (rng.uniform(0, 255, (n, size, size)) * scale).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_CLASSES)}
    )
    labels = [i % 10 for i in range(n)]
    datasets.Dataset.from_dict({"image": list(images), "label": labels}, features=features).to_parquet(
        str(path)
    )
    return path


def tiny_fashion_dir(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    folder = root / "fashion"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        write_fashion(folder / "train.parquet", n_train, seed=0)
        write_fashion(folder / "test.parquet", n_test, seed=1)
    return folder


@register("FashionMNIST")
def tiny_fashion(tmp_path: Path) -> list[str]:
    """60 images (50 train, 10 validation) and 20 test; batches of 16."""
    return [
        f"--data.init_args.data_dir={tiny_fashion_dir(tmp_path)}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        f"--data.init_args.hf_cache_dir={tmp_path / 'hf'}",
        "--data.init_args.val_size=10",
        "--data.init_args.batch_size=16",
    ]


# ---------------------------------------------------------------------------------- AG News
AG_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
TOPIC_WORDS = [
    ["minister", "election", "troops", "embassy", "president", "talks"],
    ["match", "season", "coach", "goal", "league", "champions"],
    ["stocks", "profit", "shares", "oil", "market", "earnings"],
    ["software", "internet", "space", "computer", "chip", "research"],
]
FILLER = ["the", "a", "of", "on", "said", "new", "reuters", "(", ")", ",", "."]
TEST_ONLY_WORD = "zanzibarqx"  # appears in the test split only


def _text(rng: random.Random, label: int, extra: str = "") -> str:
    words = rng.choices(TOPIC_WORDS[label], k=rng.randint(3, 6)) + rng.choices(FILLER, k=rng.randint(2, 12))
    rng.shuffle(words)
    return " ".join(words).capitalize() + (" " + extra if extra else "") + " \\band #36;5 &lt;b&gt;"


def write_tiny_ag_news(folder: Path, n_train: int = 96, n_test: int = 40, seed: int = 0) -> dict[str, str]:
    """Write ``train.parquet`` and ``test.parquet`` into ``folder``; return the split → path mapping."""
    import datasets

    rng = random.Random(seed)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=AG_CLASSES)}
    )
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % 4 for i in range(n)]
        texts = [_text(rng, y, TEST_ONLY_WORD if split == "test" else "") for y in labels]
        path = folder / f"{split}.parquet"
        datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features).to_parquet(str(path))
        files[split] = str(path)
    return files


@register("AGNews")
def tiny_ag_news(tmp_path: Path) -> list[str]:
    """96 texts (86 train, 10 validation) and 40 test; batches of 16, a 200-word vocabulary."""
    files = write_tiny_ag_news(tmp_path / "ag_news")
    return [
        f"--data.init_args.data_files={{train: {files['train']}, test: {files['test']}}}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.batch_size=16",
        "--data.init_args.max_vocab=200",
    ]


# ---------------------------------------------------------------------------------- toy blobs (tests/pair)
# Per-feature scale and offset: without standardisation the last feature would drown the others.
BLOB_SCALE = np.array([1.0, 10.0, 100.0, 0.1, 5.0, 1000.0])
BLOB_OFFSET = np.array([0.0, 50.0, -300.0, 2.0, 0.0, 5000.0])
BLOB_CENTERS = np.array(
    [[3.0, 0.0, 0.0, 1.0, -1.0, 0.0], [0.0, 3.0, 0.0, -1.0, 0.0, 1.0], [0.0, 0.0, 3.0, 0.0, 1.0, -1.0]]
)


def blob_center(label: int) -> list[float]:
    """The raw feature vector at the centre of class ``label``'s blob."""
    return (BLOB_CENTERS[label] * BLOB_SCALE + BLOB_OFFSET).tolist()


def write_blobs(folder: Path, n_train: int = 240, n_test: int = 60, seed: int = 0) -> Path:
    """``train.csv`` and ``test.csv`` of three Gaussian blobs in six features (unit spread before
    scaling, centres 3-4 apart) in ``folder``, as :class:`tests.pair.toy_data.ToyBlobs` reads them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    header = ",".join([f"x{i}" for i in range(BLOB_CENTERS.shape[1])] + ["label"])
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % len(BLOB_CENTERS)
        x = (
            BLOB_CENTERS[labels] + rng.standard_normal((n, BLOB_CENTERS.shape[1]))
        ) * BLOB_SCALE + BLOB_OFFSET
        table = np.column_stack([x, labels])
        np.savetxt(folder / f"{split}.csv", table, delimiter=",", header=header, comments="", fmt="%.6g")
    return folder


@register("ToyBlobs")
def tiny_toy_blobs(tmp_path: Path) -> list[str]:
    """300 vectors: 216 train, 24 validation, 60 test; batches of 32 (7 steps per epoch)."""
    folder = tmp_path / "blobs"
    if not folder.is_dir():
        write_blobs(folder)
    return [f"--data.init_args.data_root={folder}", "--data.init_args.batch_size=32"]


def quiet(tmp_path: Path, max_epochs: int = 1) -> list[str]:
    """Short runs for tests: logs under ``tmp_path``, no progress bar, no test after fit."""
    return [
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--trainer.max_epochs={max_epochs}",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
    ]
