"""Tiny AG-News-shaped parquet files (``text``, ``label`` ClassLabel) written by the tests."""

from __future__ import annotations

import random
from pathlib import Path

CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
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
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=CLASSES)}
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


def tiny_ag_news(tmp_path: Path) -> list[str]:
    """CLI overrides that point the AG News config at tiny local data (for tests/test_cli.py)."""
    files = write_tiny_ag_news(tmp_path / "ag_news")
    return [
        f"--data.init_args.data_files={{train: {files['train']}, test: {files['test']}}}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.batch_size=16",
        "--data.init_args.max_vocab=200",
    ]
