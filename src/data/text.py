"""Text preprocessing, tokenizer and vocabulary for the word-level text models (AG News).

The pipeline is ``preprocess`` → ``tokenize`` → :class:`Vocabulary` → :func:`numericalize`:

>>> tokenize(preprocess("Wall St.\\\\band #36;5 &lt;b&gt;Bears&lt;/b&gt; can't"))
['wall', 'st', '.', 'band', '$', '5', 'bears', 'can', "'t"]

The vocabulary is fitted on the training split only (validation and test
texts must meet unknown words as real inputs will), and is plain lists and ints, so it travels in
a checkpoint that loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
# Bump when preprocess/tokenize change, so cached vocabularies built the old way are not reused.
TOKENIZER_VERSION = 1

# AG News keeps the original CSV's escapes verbatim: a backslash stands for a line break
# ("dwindling\band"), "\\" and '\"' occur too. All of them separate words.
_BACKSLASHES = re.compile(r"\\+")
# HTML entities that lost their "&" (" #36;" is "$", " #39;" an apostrophe) or kept it ("&lt;").
_BARE_ENTITY = re.compile(r"(?<![&\w])(#\d{1,5};|(?:quot|amp|lt|gt|nbsp|apos);)")
_TAG = re.compile(r"<[^<>]{0,200}>")
_URL = re.compile(r"(?:https?://|www\.)\S+")
# A word (letters/digits of any script), an English clitic ('s, 't, 're, ...), or one
# punctuation character. Punctuation stays as tokens: "(reuters)" and "$" carry topic signal.
_TOKEN = re.compile(r"'(?:s|t|re|ve|ll|d|m)\b|\w+|[^\w\s]")
# Typographic quotes and dashes → ASCII.
_QUOTES = {0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0x2014: " - ", 0x97: " - "}


def preprocess(text: str) -> str:
    """Normalise one raw text before tokenizing.

    Steps, in order: backslash escapes become spaces; HTML entities are decoded, including the
    ones that lost their ``&`` (`` #36;`` → ``$``, `` #39;`` → ``'``, ``&lt;b&gt;`` → ``<b>``);
    HTML tags and URLs are removed; typographic quotes become ASCII; everything is lower-cased;
    runs of whitespace collapse to one space. Nothing learnt from data is used, so this is the
    same for every split.

    Args:
        text: the raw text (any Unicode; ``None`` is treated as empty).

    Returns:
        The normalised text (possibly empty).
    """
    if not text:
        return ""
    text = _BACKSLASHES.sub(" ", str(text))
    text = _BARE_ENTITY.sub(lambda m: "&" + m.group(1), text)
    text = html.unescape(text)
    text = _TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    text = text.translate(_QUOTES)
    return " ".join(text.lower().split())


def tokenize(text: str) -> list[str]:
    """Split a preprocessed text into words, clitics (``'s``) and single punctuation marks."""
    return _TOKEN.findall(text)


def text_to_tokens(text: str) -> list[str]:
    """``tokenize(preprocess(text))``: the tokens the model sees for a raw text."""
    return tokenize(preprocess(text))


class Vocabulary:
    """Token ↔ index mapping fitted on training texts; ``<pad>`` is 0 and ``<unk>`` is 1.

    Tokens are ranked by frequency, ties broken alphabetically, so the same texts always give the
    same vocabulary (on every DDP rank, on every run).

    Args:
        tokens: the index → token list; must start with ``<pad>``, ``<unk>``.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tokens[:2] != [PAD, UNK]:
            raise ValueError(f"a vocabulary must start with {PAD!r}, {UNK!r}; got {tokens[:2]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        self.itos = tokens
        self.stoi = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def fit(cls, tokenized: Iterable[Sequence[str]], max_vocab: int = 20000, min_freq: int = 1) -> Vocabulary:
        """Count tokens and keep the ``max_vocab - 2`` most frequent seen at least ``min_freq`` times."""
        if max_vocab < 3:
            raise ValueError(f"max_vocab must be >= 3 (<pad>, <unk> and one word), got {max_vocab}")
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts: Counter[str] = Counter()
        for tokens in tokenized:
            counts.update(tokens)
        counts.pop(PAD, None)
        counts.pop(UNK, None)
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls([PAD, UNK, *ranked[: max_vocab - 2]])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other.itos == self.itos

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(t, UNK_ID) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    # Plain types only, so the checkpoint loads with weights_only=True.
    def state_dict(self) -> dict[str, Any]:
        return {"itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Vocabulary:
        return cls(state["itos"])

    def save(self, path: str | Path) -> None:
        """Write as JSON atomically (temp file + rename): concurrent writers never interleave."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.state_dict(), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_state_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def text_ids(text: str, vocab: Vocabulary, max_length: int) -> list[int]:
    """One raw text → the ids of its first ``max_length`` tokens (the start is kept: the title comes
    first in AG News)."""
    return vocab.encode(text_to_tokens(text)[:max_length])


def pad_ids(encoded: Sequence[Sequence[int]], min_width: int = 1) -> tuple[Tensor, Tensor]:
    """Id lists → a right-padded ``(N, L)`` id tensor and their ``(N,)`` lengths; ``L`` is the longest
    list, but at least ``min_width`` (the widest convolution filter). An empty list is all padding."""
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    width = max([min_width, *lengths.tolist()]) if len(encoded) else min_width
    ids = torch.full((len(encoded), width), PAD_ID, dtype=torch.long)
    for i, e in enumerate(encoded):
        if len(e):
            ids[i, : len(e)] = torch.as_tensor(e, dtype=torch.long)
    return ids, lengths


def numericalize(
    texts: Sequence[str], vocab: Vocabulary, max_length: int, min_width: int = 1
) -> tuple[Tensor, Tensor]:
    """Turn raw texts into a right-padded ``(N, L)`` id tensor and their ``(N,)`` token counts:
    :func:`text_ids` of each text, then :func:`pad_ids`.

    Args:
        texts: raw texts (preprocessed and tokenized here).
        vocab: the fitted vocabulary.
        max_length: the most tokens kept per text.
        min_width: the least width of the returned tensor.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    return pad_ids([text_ids(t, vocab, max_length) for t in texts], min_width)


def tokenizer_description() -> dict[str, Any]:
    """:func:`text_to_tokens` step by step, with its patterns (Python ``re``), for an export's sidecar:
    enough to tokenize a raw text without this project's code."""
    return {
        "version": TOKENIZER_VERSION,
        "lowercase": True,
        # preprocess(), in order
        "preprocess": [
            {"step": "replace", "pattern": _BACKSLASHES.pattern, "with": " "},
            {"step": "prefix_entities", "pattern": _BARE_ENTITY.pattern, "with": "&\\1"},
            {"step": "html_unescape", "note": "Python html.unescape"},
            {"step": "replace", "pattern": _TAG.pattern, "with": " "},
            {"step": "replace", "pattern": _URL.pattern, "with": " "},
            {"step": "translate", "table": {chr(k): v for k, v in _QUOTES.items()}},
            {"step": "lowercase", "note": "Python str.lower"},
            {"step": "collapse_whitespace", "note": "' '.join(text.split())"},
        ],
        "empty_text": "an empty or missing text gives no tokens",
        "token_pattern": _TOKEN.pattern,
        "tokenize": "re.findall(token_pattern, text): words, English clitics, single punctuation marks",
    }


def trim_batch(ids: Tensor, lengths: Tensor, min_width: int = 1) -> Tensor:
    """Cut a padded batch to its longest text, but no narrower than ``min_width``."""
    width = max(int(lengths.max()) if lengths.numel() else 0, min_width)
    return ids[:, :width]


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (cache keys)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
