"""AG News: news texts (title + description) in 4 topics, from the Hub or local parquet.

python -m src.cli fit --config configs/ag_news_cnn_bn.yaml
python -m src.cli predict --ckpt_path best.ckpt --data.init_args.predict_texts='["Stocks fall as oil jumps"]'

Texts are preprocessed and tokenized by :mod:`src.data.text`, numericalised once into padded id
tensors, and each batch is trimmed to its longest text. The vocabulary is fitted on the training
part only and travels in the checkpoint, so ``test``/``predict --ckpt_path`` need no training data.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from src.data.base import DataError, Split
from src.data.hub import HubDataModule, check_labels
from src.data.raw_inputs import RawInputError, type_name
from src.data.text import (
    PAD_ID,
    TOKENIZER_VERSION,
    UNK_ID,
    Vocabulary,
    fingerprint,
    numericalize,
    pad_ids,
    text_ids,
    text_to_tokens,
    tokenizer_description,
    trim_batch,
)
from src.runtime.value_types import PositiveInt

AG_NEWS_SCHEMA = "Pass data in the AG News schema (text, and label as a class index)."

AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
# A raw text sent to the server may hold this many characters per token the model reads: far more
# than the kept tokens take, while bounding the tokenizer's work on one input.
CHARS_PER_KEPT_TOKEN = 100


class AGNews(HubDataModule):
    """AG News topic classification (Hub ``fancyzhx/ag_news`` or local parquet with ``text``/``label``).

    Validation is carved from the training split (``val_size``, ``split_seed``) unless the source
    has a ``validation`` split; the vocabulary is fitted on what remains for training.

    The vocabulary is needed as soon as the DataModule exists (its size is linked into the
    model's embedding), so it is built then, on every process of a multi-GPU run: it is a pure
    function of the training texts and the settings (ties broken alphabetically), so every rank
    gets the same one. It is cached in ``cache_dir`` under a key of those inputs, written
    atomically (temp file + rename), so concurrent ranks never see or write half a file.

    Args:
        hub_name: Hub dataset id.
        data_dir: folder with ``train.parquet`` and ``test.parquet`` (``validation.parquet`` optional).
        data_files: explicit split → parquet file mapping, e.g. ``{train: /data/ag_news/
            train_first_10429_rows.parquet, test: /data/ag_news/test.parquet}``.
        cache_dir: folder for the vocabulary cache.
        hf_cache_dir: the ``datasets`` cache (``null``: its default).
        max_vocab: the most tokens in the vocabulary, ``<pad>`` and ``<unk>`` included.
        min_freq: the least count (in the training part) for a token to get its own index.
        max_length: tokens kept per text (longer texts are truncated at the end).
        min_batch_length: batches are trimmed to their longest text but never below this; keep it
            at least the widest conv filter.
        predict_texts: raw texts to classify in ``predict``.
        predict_file: UTF-8 text file with one text per line to classify in ``predict``. With neither,
            ``predict`` runs on the test split.
        val_split: how validation is carved from the training rows: ``random`` (seeded by
            ``split_seed``) or ``tail`` (the last rows). AG News lists related stories next to each
            other, so a random split puts near-duplicates of training texts into validation and
            overrates the model; ``tail`` keeps validation apart, like the test split.
        **kwargs: batching and split options of :class:`ClassificationDataModule`.
    """

    columns: ClassVar[tuple[str, ...]] = ("text", "label")
    input_kind = "tokens"
    resumable_options = (*HubDataModule.resumable_options, "predict_texts", "predict_file")

    def __init__(
        self,
        hub_name: str = "fancyzhx/ag_news",
        data_dir: str | None = None,
        data_files: dict[str, str] | None = None,
        cache_dir: str = "data_cache/ag_news",
        hf_cache_dir: str | None = None,
        max_vocab: PositiveInt = 20000,
        min_freq: PositiveInt = 1,
        max_length: PositiveInt = 100,
        min_batch_length: PositiveInt = 5,
        predict_texts: list[str] | None = None,
        predict_file: str | None = None,
        val_split: Literal["random", "tail"] = "random",
        **kwargs: Any,
    ) -> None:
        super().__init__(hub_name, data_dir, data_files, cache_dir, hf_cache_dir, **kwargs)
        if max_vocab < 3:
            raise ValueError(f"max_vocab must be >= 3 (<pad>, <unk> and one word), got {max_vocab}")
        if predict_texts is not None and predict_file is not None:
            raise ValueError("Pass predict_texts or predict_file, not both.")
        if isinstance(predict_texts, str):
            raise ValueError('predict_texts must be a list of texts, e.g. \'["first text", "second"]\'.')
        self.max_vocab = max_vocab
        self.min_freq = min_freq
        self.max_length = max_length
        self.min_batch_length = min_batch_length
        self.predict_texts = predict_texts
        self.predict_file = predict_file
        self.val_split = val_split
        self.vocab: Vocabulary | None = None
        self._raw: Any = None  # the loaded DatasetDict, kept between vocabulary and setup
        self._texts: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ what the model needs
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def default_class_names(self) -> list[str]:
        return list(AG_NEWS_CLASSES)

    @property
    def input_size(self) -> int:
        """Vocabulary size (the embedding's rows); builds or loads the vocabulary on first use."""
        return len(self.get_vocab())

    # ------------------------------------------------------------------ vocabulary
    def _dataset(self) -> Any:
        if self._raw is None:
            self._raw = self.load_hf()
        return self._raw

    def _train_val_indices(self, n: int) -> tuple[Tensor, Tensor | None]:
        """Row indices of the training part and of the carved validation part (None if the source
        has its own validation split, or with ``val_size=0``)."""
        if not self.has_validation or "validation" in self._dataset():
            return torch.arange(n), None
        (train_idx,), (val_idx,) = self._carve_val((torch.arange(n),))
        if self.val_split == "tail":  # same sizes, but validation is the last rows
            return torch.arange(len(train_idx)), torch.arange(len(train_idx), n)
        return train_idx, val_idx

    def vocab_cache_file(self) -> Path:
        key = fingerprint(
            self.source_key(),
            self.max_vocab,
            self.min_freq,
            self.val_size,
            self.split_seed,
            self.val_split,
            TOKENIZER_VERSION,
        )
        return self.cache_dir / f"vocab_{key}.json"

    def get_vocab(self) -> Vocabulary:
        """The fitted vocabulary: from the checkpoint state, the cache, or fitted on the training part."""
        if self.vocab is not None:
            return self.vocab
        path = self.vocab_cache_file()
        if path.is_file():
            try:
                self.vocab = Vocabulary.load(path)
                return self.vocab
            except (ValueError, KeyError, OSError) as err:  # truncated/foreign file: rebuild it
                warnings.warn(
                    f"Ignoring unreadable vocabulary cache {path} ({err}); rebuilding it.", stacklevel=2
                )
        train = self._dataset()["train"]
        texts = train["text"]
        train_idx, _ = self._train_val_indices(len(texts))
        self.vocab = Vocabulary.fit(
            (text_to_tokens(texts[i]) for i in train_idx.tolist()), self.max_vocab, self.min_freq
        )
        if len(self.vocab) <= 2:
            raise DataError(
                f"The training texts hold no word seen at least min_freq={self.min_freq} times (empty texts?). "
                + AG_NEWS_SCHEMA
            )
        try:
            self.vocab.save(path)
        except OSError as err:
            raise DataError(
                f"cannot write the vocabulary cache {path}: {err.strerror or err}. Pass a writable folder "
                "with --data.init_args.cache_dir=<folder>."
            ) from err
        return self.vocab

    # ------------------------------------------------------------------ data
    def encode_texts(self, texts: list[str]) -> tuple[Tensor, list[list[str]]]:
        """Raw texts → padded id tensor ``(N, L)`` and the tokens the model sees (after truncation)."""
        ids, _ = numericalize(texts, self.get_vocab(), self.max_length, self.min_batch_length)
        return ids, [text_to_tokens(t)[: self.max_length] for t in texts]

    def _encode(self, texts: list[str], labels: Any) -> Split:
        ids, lengths = numericalize(texts, self.get_vocab(), self.max_length, self.min_batch_length)
        return ids, torch.as_tensor(labels, dtype=torch.long), lengths

    def load_splits(self) -> dict[str, Split]:
        ds = self._dataset()
        train_texts, train_labels = list(ds["train"]["text"]), list(ds["train"]["label"])
        for split in ds:  # before any text is tokenised: a wrong schema fails fast
            check_labels(ds[split]["label"], self.num_classes, split, AG_NEWS_SCHEMA)
        train_idx, val_idx = self._train_val_indices(len(train_texts))
        parts = {"train": ([train_texts[i] for i in train_idx], [train_labels[i] for i in train_idx])}
        if val_idx is not None:
            parts["val"] = ([train_texts[i] for i in val_idx], [train_labels[i] for i in val_idx])
        elif self.has_validation:
            parts["val"] = (list(ds["validation"]["text"]), list(ds["validation"]["label"]))
        parts["test"] = (list(ds["test"]["text"]), list(ds["test"]["label"]))
        self._texts.update({split: texts for split, (texts, _) in parts.items()})
        return {split: self._encode(texts, labels) for split, (texts, labels) in parts.items()}

    def read_predict_texts(self) -> list[str]:
        """The texts to classify, from ``predict_texts`` or ``predict_file``; ``[]`` when neither is set."""
        if self.predict_texts is not None:
            texts = [str(t) if t is not None else "" for t in self.predict_texts]
        elif self.predict_file is None:
            return []
        else:
            path = Path(self.predict_file).expanduser()
            what = "a folder" if path.is_dir() else "missing" if not path.exists() else None
            if what:
                raise DataError(
                    f"predict_file {str(path)!r} is {what}. Pass a UTF-8 text file with one text per line."
                )
            try:
                texts = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as err:
                raise DataError(
                    f"predict_file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}). Save it "
                    "as UTF-8, one text per line."
                ) from err
        if not texts:
            raise DataError("No texts to predict: predict_texts is empty or predict_file has no lines.")
        return texts

    def texts(self, split: str) -> list[str]:
        """The raw texts of a split (``train``/``val``/``test``/``predict``), in tensor order."""
        return self._texts.get(split, [])

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            texts = self.read_predict_texts()
            if texts:
                if "predict" not in self.splits:
                    ids, _, lengths = self._encode(texts, [0] * len(texts))
                    device = self._device() if self.loader == "tensors" else None
                    split = (ids, torch.zeros(len(texts), dtype=torch.long), lengths)
                    self.splits["predict"] = tuple(t.to(device) for t in split) if device else split
                    self._texts["predict"] = texts
                return
        if "train" not in self.splits:
            predict = self.splits.pop("predict", None)
            super().setup(stage)
            if predict is not None:
                self.splits["predict"] = predict
        if stage == "predict":  # no texts given: predict the test split
            self.splits["predict"] = self.splits["test"]
            self._texts["predict"] = self._texts["test"]

    def predict_dataloader(self) -> Any:
        if "predict" not in self.splits:
            self.setup("predict")
        return self._make_loader("predict", train=False)

    def collate(self, batch: Split) -> Split:
        ids, labels, lengths = batch
        return trim_batch(ids, lengths, self.min_batch_length), labels, lengths

    # ------------------------------------------------------------------ raw inputs (export, serve)
    @property
    def input_shape(self) -> tuple[str]:
        return ("sequence",)

    @property
    def max_raw_chars(self) -> int:
        """The longest raw text the server accepts (:data:`CHARS_PER_KEPT_TOKEN` per kept token)."""
        return CHARS_PER_KEPT_TOKEN * self.max_length

    def check_fitted(self) -> None:
        if self.vocab is None:
            raise DataError(
                "no AG News vocabulary (AGNews vocab): it is fitted on the training part and travels in the "
                "checkpoints fit writes."
            )

    def parse_raw_input(self, value: Any) -> np.ndarray:
        """A text (a JSON string) → the ids of its first ``max_length`` tokens."""
        if not isinstance(value, str):
            raise RawInputError(f"expected a text (a JSON string), got {type_name(value)}.")
        if len(value) > self.max_raw_chars:
            raise RawInputError(
                f"the text has {len(value):,} characters; at most {self.max_raw_chars:,} are accepted (the "
                f"model reads its first {self.max_length} tokens). Send the start of the text."
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate ("\ud800") decodes from JSON but is not text
            raise RawInputError(f"not valid UTF-8 text ({err.reason}).") from None
        return np.asarray(text_ids(value, self.get_vocab(), self.max_length), dtype=np.int64)

    def raw_inputs_to_batch(self, samples: Sequence[np.ndarray]) -> Tensor:
        """Right-padded to the longest text (at least ``min_batch_length``), as ``predict`` batches them."""
        return pad_ids(samples, self.min_batch_length)[0]

    def example_inputs(self, n: int, generator: torch.Generator) -> Tensor:
        width = max(self.min_batch_length, 12)
        ids = torch.randint(2, len(self.get_vocab()), (n, width), generator=generator)
        lengths = torch.randint(0, width + 1, (n,), generator=generator)
        return ids.masked_fill(torch.arange(width) >= lengths.unsqueeze(1), PAD_ID)

    def describe_raw_inputs(self) -> dict[str, Any]:
        return {
            "kind": "text",
            "raw_input": f"a UTF-8 text of at most {self.max_raw_chars} characters",
            "normalisation": None,
            "tokenizer": tokenizer_description(),
            "vocabulary": list(self.get_vocab().itos),
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "max_length": self.max_length,
            "min_length": self.min_batch_length,
            "steps": [
                "tokens = tokenize(preprocess(text))[:max_length]",
                "ids = [vocabulary.index(token) if token in vocabulary else unk_id for token in tokens]",
                "right-pad every text's ids with pad_id to the longest in the batch, but at least min_length",
            ],
            "self_contained": True,
        }

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["class_names"] = self.class_names
        vocab = self.get_vocab()
        state.update(vocab=vocab.state_dict(), tokenizer_version=TOKENIZER_VERSION)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "vocab" in state_dict:
            if state_dict.get("tokenizer_version") != TOKENIZER_VERSION:
                warnings.warn(
                    f"The checkpoint's tokenizer version {state_dict.get('tokenizer_version')} differs from "
                    f"this code's ({TOKENIZER_VERSION}); predictions may differ from the trained model's.",
                    stacklevel=2,
                )
            self.vocab = Vocabulary.from_state_dict(state_dict["vocab"])
