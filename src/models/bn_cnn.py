"""Text CNN with batch norm after each convolution, for AG News.

    python -m src.cli fit --config configs/ag_news_cnn_bn.yaml

token ids → token vectors (embedding or one-hot) → for each filter width: [Conv1d → BN → ReLU] ×
depth → pooled over the text (max, mean or both) → [+ mean of hashed n-gram vectors] → dropout →
FC → ReLU → dropout → FC.

Padding never changes a prediction: convolutions use SAME padding, so the output at a token only
sees zeros beyond the text's end whether they come from the convolution's own padding or from the
batch's; padded positions are zeroed after every layer, left out of the BatchNorm statistics, and
masked out of the pooling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.data.text import PAD_ID, UNK_ID
from src.models.classifier import BNClassifier
from src.models.layers import he_init
from src.runtime.value_types import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Rate


def token_mask(ids: Tensor) -> Tensor:
    """``(N, L)``, True at real tokens. An empty text keeps its first position, so it still gets a
    (padding-only) prediction instead of an empty pooling."""
    mask = ids != PAD_ID
    mask[:, 0] |= ~mask.any(dim=1)
    return mask


class WordDropout(nn.Module):
    """In training, each real token becomes ``<unk>`` with probability ``p``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, ids: Tensor) -> Tensor:
        if not (self.training and self.p > 0):
            return ids
        drop = (torch.rand(ids.shape, device=ids.device) < self.p) & (ids != PAD_ID)
        return ids.masked_fill(drop, UNK_ID)


class TokenVectors(nn.Module):
    """Token ids → ``(N, C, L)`` vectors, zero at padding: a learnt embedding, or one-hot (``dim=None``)."""

    def __init__(self, vocab_size: int, dim: int | None, dropout: float, init_std: float) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding: nn.Embedding | None = None
        if dim is not None:
            self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
            # BN after the convolution makes the output blind to the vectors' scale, so small
            # initial vectors only make Adam's fixed-size steps relatively larger: on a small
            # corpus they train much faster than the N(0, 1) default.
            nn.init.normal_(self.embedding.weight, std=init_std)
            with torch.no_grad():
                self.embedding.weight[PAD_ID].zero_()
        self.channels = dim if dim is not None else vocab_size
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embedding(ids) if self.embedding is not None else F.one_hot(ids, self.vocab_size).float()
        return (self.dropout(x) * mask.unsqueeze(-1)).transpose(1, 2)


class MaskedNormAct(nn.Module):
    """A norm/activation block applied to the real tokens of a ``(N, C, L)`` batch only: in training
    the valid positions are gathered into ``(M, C)``, so BatchNorm's batch statistics are those of
    the text, not of the padding; padded positions come out as zeros. In evaluation BatchNorm is a
    fixed per-channel map, so the block runs on every position and the padding is zeroed after:
    the same result, without boolean indexing (faster, and exportable to ONNX)."""

    def __init__(self, norm_act: nn.Module) -> None:
        super().__init__()
        self.norm_act = norm_act

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if not self.training:
            return self.norm_act(x) * mask.unsqueeze(1).to(x.dtype)
        h = x.transpose(1, 2)  # (N, L, C)
        out = h.new_zeros(h.shape)
        out[mask] = self.norm_act(h[mask])
        return out.transpose(1, 2)


class ConvBranch(nn.Module):
    """``depth`` × (Conv1d of one width with SAME padding → masked norm/activation)."""

    def __init__(
        self,
        in_channels: int,
        num_filters: int,
        kernel_size: int,
        depth: int,
        norm_act: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.convs = nn.ModuleList(
            nn.Conv1d(in_channels if i == 0 else num_filters, num_filters, kernel_size) for i in range(depth)
        )
        # SAME padding (output aligned with the tokens); the extra zero goes right for even widths.
        self.pad = ((kernel_size - 1) // 2, kernel_size // 2)
        self.norm_acts = nn.ModuleList(MaskedNormAct(norm_act(num_filters)) for _ in range(depth))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for conv, norm_act in zip(self.convs, self.norm_acts, strict=True):
            x = norm_act(conv(F.pad(x, self.pad)), mask)
        return x


class MaskedPool(nn.Module):
    """Global pooling of ``(N, C, L)`` over the real tokens: ``max``, ``mean`` or ``max_mean`` (both)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(1)
        pooled = []
        if self.mode in ("max", "max_mean"):
            pooled.append(h.masked_fill(~m, float("-inf")).amax(dim=2))
        if self.mode in ("mean", "max_mean"):
            pooled.append((h * m).sum(dim=2) / m.sum(dim=2).clamp(min=1))
        return torch.cat(pooled, dim=1)


class HashedNGrams(nn.Module):
    """Mean of hashed n-gram vectors over a text's n-grams of real tokens, ``(N, dim)`` (fastText-style).

    The hash is plain arithmetic on the vocabulary ids, so it is the same on every run and machine;
    an n-gram touching padding is left out, so padding changes nothing.
    """

    def __init__(self, buckets: int, sizes: list[int], dim: int, init_std: float) -> None:
        super().__init__()
        self.sizes = tuple(sizes)
        self.buckets = buckets
        self.vectors = nn.Embedding(buckets, dim)
        nn.init.normal_(self.vectors.weight, std=init_std)

    def forward(self, ids: Tensor) -> Tensor:
        real = ids != PAD_ID
        total = ids.new_zeros(ids.shape[0], self.vectors.embedding_dim, dtype=self.vectors.weight.dtype)
        count = ids.new_zeros(ids.shape[0], 1, dtype=total.dtype)
        length = ids.shape[1]
        for n in self.sizes:
            if length < n:
                continue
            h = ids[:, : length - n + 1].clone()
            valid = real[:, : length - n + 1].clone()
            for k in range(1, n):
                h = h * 1_000_003 + ids[:, k : length - n + 1 + k]
                valid &= real[:, k : length - n + 1 + k]
            h = (h * 31 + n) % self.buckets  # n in the hash: a bigram and a trigram rarely share a row
            total = total + (self.vectors(h) * valid.unsqueeze(-1)).sum(dim=1)
            count = count + valid.sum(dim=1, keepdim=True)
        return total / count.clamp(min=1)


class TextCNN(nn.Module):
    """The network: ``(N, L)`` token ids, right-padded with ``<pad>`` = 0, to class logits."""

    def __init__(
        self,
        word_dropout: WordDropout,
        vectors: TokenVectors,
        branches: list[ConvBranch],
        pool: MaskedPool,
        head: nn.Module,
        ngrams: HashedNGrams | None = None,
    ) -> None:
        super().__init__()
        self.word_dropout = word_dropout
        self.vectors = vectors
        self.branches = nn.ModuleList(branches)
        self.pool = pool
        self.ngrams = ngrams
        self.head = head

    @property
    def kernel_sizes(self) -> list[int]:
        return [branch.kernel_size for branch in self.branches]

    def _conv(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = token_mask(ids)
        x = self.vectors(ids, mask)
        return torch.cat([branch(x, mask) for branch in self.branches], dim=1), mask

    def conv_activations(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token outputs of every branch's last block, ``(N, filters × widths, L)``, and the mask."""
        return self._conv(self.word_dropout(ids))

    def features(self, ids: Tensor) -> Tensor:
        """The text features the head classifies: pooled conv outputs (and n-gram features)."""
        ids = self.word_dropout(ids)  # the same dropped words for the convolutions and the n-grams
        h, mask = self._conv(ids)
        features = self.pool(h, mask)
        if self.ngrams is not None:
            features = torch.cat([features, self.ngrams(ids)], dim=1)
        return features

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.features(ids))


class BNCNN(BNClassifier):
    """BN-CNN text classifier.

    Args:
        input_encoding: ``embedding`` (learnt token vectors) or ``one_hot`` (memory grows with the
            vocabulary: keep ``max_vocab`` small with it).
        embedding_dim: token vector size (``embedding`` only).
        kernel_sizes: convolution filter widths, one branch each (e.g. ``[1, 3, 5]``).
        num_filters: filters per width.
        num_conv_layers: conv → BN → ReLU blocks per branch.
        pooling: ``max`` (global max over the text), ``mean``, or ``max_mean`` (both, concatenated).
        hidden_size: width of the hidden FC layer.
        dropout: dropout before each FC layer.
        embedding_dropout: dropout on the token vectors in training.
        word_dropout: probability of replacing a token by ``<unk>`` in training.
        embedding_init_std: standard deviation of the initial token (and n-gram) vectors.
        ngram_buckets: rows of the hashed n-gram table; 0 turns the n-gram features off. On, the mean
            of the hashed vectors of the text's n-grams is concatenated to the pooled conv features.
        ngram_sizes: n-gram lengths hashed (e.g. ``[2]``: bigrams).
        ngram_dim: size of the hashed n-gram vectors.
        mixup_alpha: mixup of the text features in training (Guo et al., 2019, "senMixup"): each
            text's pooled features and its label are mixed with those of another text of the batch,
            with a weight drawn from Beta(alpha, alpha) per batch; 0 turns it off. Training metrics
            then score the mixed batch against the labels of the larger share.
        **kwargs: batch-norm and training options of :class:`~src.models.classifier.BNClassifier`.
    """

    input_kind = "tokens"

    def __init__(
        self,
        input_encoding: Literal["embedding", "one_hot"] = "embedding",
        embedding_dim: PositiveInt = 128,
        kernel_sizes: list[PositiveInt] = [1, 3, 5],  # noqa: B006  (jsonargparse shows list defaults)
        num_filters: PositiveInt = 100,
        num_conv_layers: PositiveInt = 1,
        pooling: Literal["max", "mean", "max_mean"] = "max",
        hidden_size: PositiveInt = 100,
        dropout: Rate = 0.5,
        embedding_dropout: Rate = 0.0,
        word_dropout: Rate = 0.0,
        embedding_init_std: PositiveFloat = 0.1,
        ngram_buckets: NonNegativeInt = 0,
        ngram_sizes: list[PositiveInt] = [2],  # noqa: B006
        ngram_dim: PositiveInt = 64,
        mixup_alpha: NonNegativeFloat = 0.0,
        **kwargs: Any,
    ) -> None:
        if not kernel_sizes:
            raise ValueError("kernel_sizes must list at least one filter width, e.g. [1, 3, 5]")
        super().__init__(**kwargs)

    def build_network(self) -> TextCNN:
        hp = self.hparams
        vectors = TokenVectors(
            hp.input_size,
            hp.embedding_dim if hp.input_encoding == "embedding" else None,
            hp.embedding_dropout,
            hp.embedding_init_std,
        )
        branches = [
            ConvBranch(vectors.channels, hp.num_filters, k, hp.num_conv_layers, self.norm_act)
            for k in hp.kernel_sizes
        ]
        for branch in branches:  # He init for the convolutions, which feed ReLUs
            branch.apply(he_init)
        features = hp.num_filters * len(branches) * (2 if hp.pooling == "max_mean" else 1)
        ngrams = None
        if hp.ngram_buckets:
            ngrams = HashedNGrams(hp.ngram_buckets, hp.ngram_sizes, hp.ngram_dim, hp.embedding_init_std)
            features += hp.ngram_dim
        # The head keeps PyTorch's default init: max-pooled BN outputs are large, and He-scaled FC
        # layers would start with huge logits.
        head = nn.Sequential(
            nn.Dropout(hp.dropout),
            nn.Linear(features, hp.hidden_size),
            nn.ReLU(),
            nn.Dropout(hp.dropout),
            nn.Linear(hp.hidden_size, hp.num_classes),
        )
        return TextCNN(WordDropout(hp.word_dropout), vectors, branches, MaskedPool(hp.pooling), head, ngrams)

    def example_input(self) -> Tensor:
        return torch.ones(2, max(self.hparams.kernel_sizes), dtype=torch.long)

    def conv_activations(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token conv activations and the token mask (for heatmaps); see :class:`TextCNN`."""
        return self.net.conv_activations(ids)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        if self.hparams.mixup_alpha <= 0:
            return super().training_step(batch, batch_idx)
        loss, logits, labels = mixup_step(
            self.net, batch[0], batch[1], self.hparams.mixup_alpha, self.hparams.label_smoothing
        )
        self.metrics("train").update(logits.detach(), labels, loss.detach())
        return loss


def mixup_step(
    net: TextCNN, ids: Tensor, y: Tensor, alpha: float, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """One training forward pass with the text features mixed in pairs (senMixup).

    Returns the mixed loss, the logits of the mixed features, and for each of them the label with
    the larger share (for training metrics).
    """
    # Drawn on the CPU from torch's seeded generator: no device sync, and a resumed run replays it.
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(y.shape[0], device=y.device)
    features = net.features(ids)
    logits = net.head(lam * features + (1 - lam) * features[perm])
    loss = lam * F.cross_entropy(logits, y, label_smoothing=label_smoothing) + (1 - lam) * F.cross_entropy(
        logits, y[perm], label_smoothing=label_smoothing
    )
    return loss, logits, y if lam >= 0.5 else y[perm]
