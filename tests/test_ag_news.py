"""AG News DataModule and the BN-CNN through the CLI, on tiny parquet files written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from src.data import DataError
from src.data.ag_news import AGNews
from src.data.hub import DataSourceError
from src.data.text import UNK_ID, Vocabulary, text_to_tokens
from tests.helpers.cli import config, run_cli
from tests.helpers.data import AG_CLASSES as CLASSES
from tests.helpers.data import TEST_ONLY_WORD, write_tiny_ag_news

CONFIG = config("ag_news_cnn_bn")


def _dm(tmp_path: Path, **kw) -> AGNews:
    folder = tmp_path / "data"
    files = {s: str(folder / f"{s}.parquet") for s in ("train", "test")}
    if not folder.is_dir():
        write_tiny_ag_news(folder)
    return AGNews(data_files=files, cache_dir=str(tmp_path / "cache"), batch_size=8, val_size=16, **kw)


def test_vocabulary_is_fitted_on_the_training_part_only(tmp_path: Path):
    dm = _dm(tmp_path)
    assert dm.class_names == CLASSES and dm.num_classes == 4
    vocab = dm.get_vocab()
    dm.setup("fit")
    assert TEST_ONLY_WORD not in vocab.stoi
    ids, _ = dm.encode_texts([f"stocks {TEST_ONLY_WORD}"])
    assert ids[0, 1] == UNK_ID and ids[0, 0] != UNK_ID
    train_words = {t for text in dm.texts("train") for t in text_to_tokens(text)}
    assert set(vocab.itos[2:]) <= train_words  # nothing learnt from the validation or test texts
    assert len(dm.texts("train")) == 80 and len(dm.texts("val")) == 16 and len(dm.texts("test")) == 40


def test_tail_validation_is_the_last_training_rows(tmp_path: Path):
    import datasets

    dm = _dm(tmp_path, val_split="tail")
    dm.setup("fit")
    rows = datasets.load_dataset("parquet", data_files=str(tmp_path / "data" / "train.parquet"))["train"][
        "text"
    ]
    assert dm.texts("val") == list(rows[-16:]) and dm.texts("train") == list(rows[:-16])
    assert set(dm.get_vocab().itos[2:]) <= {t for text in rows[:-16] for t in text_to_tokens(text)}


def test_vocabulary_cache_is_reused_and_identical(tmp_path: Path):
    first = _dm(tmp_path).get_vocab()
    cached = list((tmp_path / "cache").glob("vocab_*.json"))
    assert len(cached) == 1 and not list((tmp_path / "cache").glob("*.tmp*"))
    second = _dm(tmp_path)
    assert second.get_vocab() == first and second._raw is None  # read from the cache, data untouched
    other = _dm(tmp_path, max_vocab=10)  # other settings, other cache entry
    assert len(other.get_vocab()) == 10 and len(list((tmp_path / "cache").glob("vocab_*.json"))) == 2


def test_state_dict_round_trip_restores_vocabulary_without_data(tmp_path: Path):
    dm = _dm(tmp_path)
    state = dm.state_dict()
    restored = AGNews(data_files={"train": "/nowhere/train.parquet", "test": "/nowhere/test.parquet"})
    restored.load_state_dict(state)
    assert restored.get_vocab() == dm.get_vocab() and restored.class_names == CLASSES
    assert restored.input_size == dm.input_size


def test_batches_are_trimmed_to_the_longest_text_but_not_below_the_widest_filter(tmp_path: Path):
    dm = _dm(tmp_path, min_batch_length=7)
    dm.setup("fit")
    for ids, labels, lengths in dm.val_dataloader():
        assert ids.shape[1] == max(int(lengths.max()), 7) and len(labels) == len(ids)
    ids, _, _ = dm.collate((torch.zeros(2, 50, dtype=torch.long), torch.zeros(2), torch.tensor([1, 2])))
    assert ids.shape == (2, 7)


def test_predict_inputs_and_their_errors(tmp_path: Path):
    good = tmp_path / "texts.txt"
    good.write_text("Stocks rise\n\nCafé 東京\n", encoding="utf-8")
    assert _dm(tmp_path, predict_file=str(good)).read_predict_texts() == ["Stocks rise", "", "Café 東京"]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        _dm(tmp_path, predict_file=str(bad)).read_predict_texts()
    with pytest.raises(DataError, match="is missing. Pass a UTF-8 text file"):
        _dm(tmp_path, predict_file=str(tmp_path / "missing.txt")).read_predict_texts()
    with pytest.raises(DataError, match="is a folder"):
        _dm(tmp_path, predict_file=str(tmp_path)).read_predict_texts()
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="No texts to predict"):
        _dm(tmp_path, predict_file=str(empty)).read_predict_texts()
    with pytest.raises(ValueError, match="not both"):
        _dm(tmp_path, predict_file=str(good), predict_texts=["x"])


def test_missing_local_data_gives_a_clear_error(tmp_path: Path):
    dm = AGNews(data_dir=str(tmp_path / "nope"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataSourceError, match="data_dir"):
        dm.get_vocab()


@pytest.mark.slow
def test_fit_then_predict_raw_texts_from_checkpoint_with_data_gone(tmp_path: Path):
    files = write_tiny_ag_news(tmp_path / "data")
    data = [
        f"--data.init_args.data_files={{train: {files['train']}, test: {files['test']}}}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.batch_size=16",
        "--data.init_args.max_length=20",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]
    run_cli("fit", "--config", CONFIG, "--trainer.max_epochs=1", *data, cwd=tmp_path)
    run_dir = next((tmp_path / "logs").rglob("version_0"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # the vocabulary travels in the checkpoint (plain types: loads with weights_only=True)
    state = torch.load(ckpt, weights_only=True)
    vocab = Vocabulary.from_state_dict(state["AGNews"]["vocab"])
    assert vocab == Vocabulary.load(next((tmp_path / "cache").glob("vocab_*.json")))
    assert TEST_ONLY_WORD not in vocab.stoi

    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(tmp_path / "cache")
    texts = [
        "Stocks and profit rise on the oil market",
        "",
        "   \t ",
        "coach " * 500,  # far beyond max_length
        "Ünïcödé 東京 ☃ — “quoted”",
        "qqqx zzzy wwwv",  # all unknown
    ]
    out = run_cli(
        "predict",
        "--config",
        CONFIG,
        "--ckpt_path",
        str(ckpt),
        f"--data.init_args.predict_texts={json.dumps(texts)}",
        f"--trainer.callbacks.output={tmp_path / 'preds.json'}",
        "--trainer.callbacks.heatmaps=50",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    rows = json.loads((tmp_path / "preds.json").read_text())
    assert [r["text"] for r in rows] == texts
    for row in rows:
        assert row["predicted_name"] in CLASSES
        assert abs(sum(row["probs"].values()) - 1) < 1e-4
    assert "Stocks and profit" in out.stderr + out.stdout  # printed with its topic and probabilities
    heatmaps = list((tmp_path / "logs").rglob("heatmaps/heatmap_*.png"))  # inside the predict run's folder
    assert len(heatmaps) == len(texts)

    # the same from a file, without any config: everything comes from the checkpoint
    (tmp_path / "texts.txt").write_text("\n".join(texts[:2]) + "\n", encoding="utf-8")
    run_cli(
        "predict",
        "--ckpt_path",
        str(ckpt),
        f"--data.init_args.predict_file={tmp_path / 'texts.txt'}",
        cwd=tmp_path,
    )
