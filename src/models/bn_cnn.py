"""Text CNN with batch norm (seed 001, building blocks from seed 000), for AG News.

python -m src.cli fit --config configs/ag_news_cnn_bn.yaml

token ids → embedding (or one-hot) → for each filter width: [Conv1d → BN → ReLU] × depth →
global max-pool over time (optionally with mean-pool) → concat [+ mean of hashed n-gram vectors] →
dropout → FC → ReLU → dropout → FC.

Padding never changes a prediction: convolutions use SAME padding, so the conv output at a
token only sees zeros beyond the text's end whether they come from the conv's own padding or
from the batch's padding; padded positions are zeroed after every layer, are left out of the
BatchNorm statistics, and are masked out of the pooling.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.data.text import PAD_ID, UNK_ID
from src.models.classifier import ClassifierModule
from src.models.layers import BNPosition, NormAct, he_init


class MaskedNormAct(nn.Module):
    """:class:`NormAct` applied to the real tokens of a ``(N, C, L)`` batch only.

    The valid positions are gathered into ``(M, C)`` so BatchNorm's batch statistics are those of
    the text, not of the padding; padded positions come out as zeros.
    """

    def __init__(self, num_features: int, **norm_act: Any) -> None:
        super().__init__()
        self.norm_act = NormAct(num_features, **norm_act)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = x.transpose(1, 2)  # (N, L, C)
        out = h.new_zeros(h.shape)
        out[mask] = self.norm_act(h[mask])
        return out.transpose(1, 2)


class ConvBranch(nn.Module):
    """``depth`` × (Conv1d of one width with SAME padding → masked BN/ReLU)."""

    def __init__(
        self, in_channels: int, num_filters: int, kernel_size: int, depth: int, **norm_act: Any
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(in_channels if i == 0 else num_filters, num_filters, kernel_size) for i in range(depth)
        )
        # SAME padding (output aligned with the tokens), the extra zero on the right for even widths.
        self.pad = ((kernel_size - 1) // 2, kernel_size // 2)
        self.norm_acts = nn.ModuleList(MaskedNormAct(num_filters, **norm_act) for _ in range(depth))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for conv, norm_act in zip(self.convs, self.norm_acts, strict=True):
            x = norm_act(conv(F.pad(x, self.pad)), mask)
        return x


class BNCNNNet(nn.Module):
    """The network; input is a ``(N, L)`` tensor of token ids right-padded with ``<pad>`` = 0.

    Args:
        input_size: vocabulary size.
        num_classes: output classes.
        input_encoding: ``embedding`` (learnt token vectors) or ``one_hot`` (the seed's way;
            memory grows with the vocabulary, so keep ``max_vocab`` small with it).
        embedding_dim: token vector size (``embedding`` only).
        kernel_sizes: filter widths, one conv branch each.
        num_filters: filters per width.
        num_conv_layers: conv layers per branch (depth).
        batch_norm: BatchNorm after each convolution.
        bn_position: BN before or after the ReLU.
        bn_momentum: BatchNorm momentum.
        bn_eps: BatchNorm epsilon.
        pooling: ``max`` (global max over time, the seed's), ``mean``, or ``max_mean`` (both, concatenated).
        hidden_size: width of the hidden FC layer.
        dropout: dropout before each FC layer.
        embedding_dropout: dropout on the token vectors (training only).
        word_dropout: probability of replacing a token by ``<unk>`` (training only).
        embedding_init_std: standard deviation of the initial token vectors.
        ngram_buckets: size of the hashed n-gram table (0: off). With it, every n-gram of
            ``ngram_sizes`` consecutive tokens is hashed into one of ``ngram_buckets`` learnt vectors,
            whose mean over the text is concatenated to the pooled conv features (fastText-style).
        ngram_sizes: n-gram lengths hashed (e.g. ``[2]`` for bigrams).
        ngram_dim: size of the hashed n-gram vectors.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        input_encoding: Literal["embedding", "one_hot"] = "embedding",
        embedding_dim: int = 128,
        kernel_sizes: tuple[int, ...] = (1, 3, 5),
        num_filters: int = 100,
        num_conv_layers: int = 1,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        pooling: Literal["max", "mean", "max_mean"] = "max",
        hidden_size: int = 100,
        dropout: float = 0.5,
        embedding_dropout: float = 0.0,
        word_dropout: float = 0.0,
        embedding_init_std: float = 0.1,
        ngram_buckets: int = 0,
        ngram_sizes: tuple[int, ...] = (2,),
        ngram_dim: int = 64,
    ) -> None:
        super().__init__()
        if input_size < 3:
            raise ValueError(f"input_size (vocabulary size) must be >= 3, got {input_size}")
        if not kernel_sizes or min(kernel_sizes) < 1:
            raise ValueError(f"kernel_sizes must be a non-empty list of widths >= 1, got {kernel_sizes}")
        if num_conv_layers < 1:
            raise ValueError(f"num_conv_layers must be >= 1, got {num_conv_layers}")
        if input_encoding not in ("embedding", "one_hot"):
            raise ValueError(f"input_encoding must be 'embedding' or 'one_hot', got {input_encoding!r}")
        if pooling not in ("max", "mean", "max_mean"):
            raise ValueError(f"pooling must be 'max', 'mean' or 'max_mean', got {pooling!r}")
        if ngram_buckets < 0 or (ngram_buckets and (not ngram_sizes or min(ngram_sizes) < 1)):
            raise ValueError(
                f"ngram_buckets must be >= 0 and ngram_sizes widths >= 1, got {ngram_buckets}, {ngram_sizes}"
            )
        self.input_size = input_size
        self.input_encoding = input_encoding
        self.kernel_sizes = tuple(kernel_sizes)
        self.pooling = pooling
        self.word_dropout = word_dropout
        if input_encoding == "embedding":
            self.embedding: nn.Embedding | None = nn.Embedding(input_size, embedding_dim, padding_idx=PAD_ID)
            # BN after the conv makes the output blind to the vectors' scale, so small initial
            # vectors only make Adam's fixed-size steps relatively larger: they train much faster
            # than the N(0, 1) default on a small corpus.
            nn.init.normal_(self.embedding.weight, std=embedding_init_std)
            with torch.no_grad():
                self.embedding.weight[PAD_ID].zero_()
            channels = embedding_dim
        else:
            self.embedding = None
            channels = input_size
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        norm_act = {
            "batch_norm": batch_norm,
            "bn_position": bn_position,
            "momentum": bn_momentum,
            "eps": bn_eps,
        }
        self.branches = nn.ModuleList(
            ConvBranch(channels, num_filters, k, num_conv_layers, **norm_act) for k in self.kernel_sizes
        )
        features = num_filters * len(self.kernel_sizes) * (2 if pooling == "max_mean" else 1)
        self.ngram_sizes = tuple(ngram_sizes)
        self.ngram_buckets = ngram_buckets
        self.ngrams: nn.Embedding | None = None
        if ngram_buckets:
            # Hashed n-gram vectors, like the word vectors small at first.
            self.ngrams = nn.Embedding(ngram_buckets, ngram_dim)
            nn.init.normal_(self.ngrams.weight, std=embedding_init_std)
            features += ngram_dim
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(features, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )
        # He init for the convolutions (they feed ReLUs); the head keeps PyTorch's smaller default,
        # because max-pooled BN outputs are large and He-scaled FC layers start with huge logits.
        for branch in self.branches:
            branch.apply(he_init)

    def mask(self, ids: Tensor) -> Tensor:
        """``(N, L)`` True at real tokens. An empty text keeps its first position, so it still gets a
        (padding-only) prediction instead of an empty max-pool."""
        mask = ids != PAD_ID
        mask[:, 0] |= ~mask.any(dim=1)
        return mask

    def drop_words(self, ids: Tensor) -> Tensor:
        """Word dropout: at train time, each real token becomes ``<unk>`` with probability ``word_dropout``."""
        if self.training and self.word_dropout > 0:
            drop = (torch.rand(ids.shape, device=ids.device) < self.word_dropout) & (ids != PAD_ID)
            ids = ids.masked_fill(drop, UNK_ID)
        return ids

    def ngram_features(self, ids: Tensor) -> Tensor:
        """Mean of the hashed n-gram vectors over the n-grams of real tokens, ``(N, ngram_dim)``.

        The hash is plain arithmetic on the vocabulary ids, so it is the same on every run and
        machine; an n-gram touching padding is left out, so padding changes nothing.
        """
        assert self.ngrams is not None
        real = ids != PAD_ID
        total = ids.new_zeros(ids.shape[0], self.ngrams.embedding_dim, dtype=self.ngrams.weight.dtype)
        count = ids.new_zeros(ids.shape[0], 1, dtype=total.dtype)
        for n in self.ngram_sizes:
            if ids.shape[1] < n:
                continue
            h = ids[:, : ids.shape[1] - n + 1].clone()
            valid = real[:, : ids.shape[1] - n + 1].clone()
            for k in range(1, n):
                h = h * 1_000_003 + ids[:, k : ids.shape[1] - n + 1 + k]
                valid &= real[:, k : ids.shape[1] - n + 1 + k]
            h = (h * 31 + n) % self.ngram_buckets  # n in the hash: a bigram and a trigram rarely share a row
            total = total + (self.ngrams(h) * valid.unsqueeze(-1)).sum(dim=1)
            count = count + valid.sum(dim=1, keepdim=True)
        return total / count.clamp(min=1)

    def conv_activations(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token outputs of every branch's last conv block, ``(N, filters × widths, L)``, and the mask."""
        if ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise TypeError(f"BNCNN expects token ids (an integer tensor), got {ids.dtype}")
        return self._conv(self.drop_words(ids))

    def _conv(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.mask(ids)
        x = self.embedding(ids) if self.embedding is not None else F.one_hot(ids, self.input_size).float()
        x = self.embedding_dropout(x) * mask.unsqueeze(-1)  # zero vectors at padding (one-hot too)
        x = x.transpose(1, 2)  # (N, C, L)
        return torch.cat([branch(x, mask) for branch in self.branches], dim=1), mask

    def pool(self, h: Tensor, mask: Tensor) -> Tensor:
        """Global pooling over the real tokens only (padding is masked out of max and mean)."""
        m = mask.unsqueeze(1)
        pooled = []
        if self.pooling in ("max", "max_mean"):
            pooled.append(h.masked_fill(~m, float("-inf")).amax(dim=2))
        if self.pooling in ("mean", "max_mean"):
            pooled.append((h * m).sum(dim=2) / m.sum(dim=2).clamp(min=1))
        return torch.cat(pooled, dim=1)

    def features(self, ids: Tensor) -> Tensor:
        """The text features the FC head classifies: pooled conv outputs (and n-gram features)."""
        if ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise TypeError(f"BNCNN expects token ids (an integer tensor), got {ids.dtype}")
        ids = self.drop_words(ids)  # the same dropped words for the convolutions and the n-grams
        h, mask = self._conv(ids)
        features = self.pool(h, mask)
        if self.ngrams is not None:
            features = torch.cat([features, self.ngram_features(ids)], dim=1)
        return features

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.features(ids))


class BNCNN(ClassifierModule):
    """BN-CNN text classifier (seed 001's CNN with batch norm) on the shared training logic.

    Args:
        input_size: vocabulary size (linked from the DataModule).
        input_encoding: ``embedding`` (default) or ``one_hot`` (the seed's input; small vocabularies).
        embedding_dim: token vector size.
        kernel_sizes: convolution filter widths, one branch each (e.g. ``[1, 3, 5]``).
        num_filters: filters per width.
        num_conv_layers: conv → BN → ReLU blocks per branch.
        batch_norm: BatchNorm after each convolution (off = the plain CNN).
        bn_position: BN before or after the ReLU.
        bn_momentum: BatchNorm momentum.
        bn_eps: BatchNorm epsilon.
        pooling: ``max`` (global max-pool over the text, the seed's), ``mean``, or ``max_mean`` (both).
        hidden_size: width of the hidden FC layer.
        dropout: dropout before each FC layer.
        embedding_dropout: dropout on the token vectors at train time.
        word_dropout: probability of replacing a token by ``<unk>`` at train time.
        embedding_init_std: standard deviation of the initial token vectors.
        ngram_buckets: rows of the hashed n-gram table; 0 turns the n-gram features off. On, the mean
            of the hashed vectors of the text's n-grams is concatenated to the pooled conv features.
        ngram_sizes: n-gram lengths hashed (e.g. ``[2]``: bigrams).
        ngram_dim: size of the hashed n-gram vectors.
        mixup_alpha: mixup of the text features at train time (Guo et al., 2019, "senMixup"): each
            text's pooled features and its label are mixed with those of another text of the batch,
            with a weight drawn from Beta(alpha, alpha) per batch; 0 turns it off. Training metrics
            then score the mixed batch against the labels of the larger share.
        **kwargs: training options of :class:`ClassifierModule` (classes, optimizer, scheduler).
    """

    def __init__(
        self,
        input_size: int = 20000,
        input_encoding: Literal["embedding", "one_hot"] = "embedding",
        embedding_dim: int = 128,
        kernel_sizes: list[int] = [1, 3, 5],  # noqa: B006  (jsonargparse shows list defaults)
        num_filters: int = 100,
        num_conv_layers: int = 1,
        batch_norm: bool = True,
        bn_position: BNPosition = "before_activation",
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        pooling: Literal["max", "mean", "max_mean"] = "max",
        hidden_size: int = 100,
        dropout: float = 0.5,
        embedding_dropout: float = 0.0,
        word_dropout: float = 0.0,
        embedding_init_std: float = 0.1,
        ngram_buckets: int = 0,
        ngram_sizes: list[int] = [2],  # noqa: B006
        ngram_dim: int = 64,
        mixup_alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0: off), got {mixup_alpha}")
        self.mixup_alpha = mixup_alpha
        self.net = BNCNNNet(
            input_size,
            self.num_classes,
            input_encoding=input_encoding,
            embedding_dim=embedding_dim,
            kernel_sizes=tuple(kernel_sizes),
            num_filters=num_filters,
            num_conv_layers=num_conv_layers,
            batch_norm=batch_norm,
            bn_position=bn_position,
            bn_momentum=bn_momentum,
            bn_eps=bn_eps,
            pooling=pooling,
            hidden_size=hidden_size,
            dropout=dropout,
            embedding_dropout=embedding_dropout,
            word_dropout=word_dropout,
            embedding_init_std=embedding_init_std,
            ngram_buckets=ngram_buckets,
            ngram_sizes=tuple(ngram_sizes),
            ngram_dim=ngram_dim,
        )
        self.example_input_array = torch.ones(2, max(kernel_sizes), dtype=torch.long)

    def conv_activations(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token conv activations and the token mask (for heatmaps); see :class:`BNCNNNet`."""
        net = getattr(self.net, "_orig_mod", self.net)  # unwrap torch.compile
        return net.conv_activations(ids)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        if self.mixup_alpha <= 0:
            return super().training_step(batch, batch_idx)
        net = getattr(self.net, "_orig_mod", self.net)  # unwrap torch.compile
        loss, logits, labels = mixup_step(net, batch[0], batch[1], self.mixup_alpha, self.label_smoothing)
        self.train_stats.update(logits.detach(), labels, loss.detach())
        return loss


def mixup_step(
    net: BNCNNNet, ids: Tensor, y: Tensor, alpha: float, label_smoothing: float = 0.0
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
