"""Preprocessing, tokenizer, vocabulary and the BN-CNN's handling of padding."""

from __future__ import annotations

import torch

from src.data.text import PAD_ID, UNK_ID, Vocabulary, numericalize, preprocess, text_to_tokens, trim_batch
from src.models.bn_cnn import BNCNN, TextCNN


def test_preprocess_handles_ag_news_escapes_and_html_remnants():
    raw = "Wall St.\\band Co #36;5 bn, it #39;s &lt;b&gt;BIG&lt;/b&gt;  \\\\ news"
    assert preprocess(raw) == "wall st. band co $5 bn, it 's big news"
    assert text_to_tokens(raw) == [
        "wall",
        "st",
        ".",
        "band",
        "co",
        "$",
        "5",
        "bn",
        ",",
        "it",
        "'s",
        "big",
        "news",
    ]


def test_preprocess_edge_cases():
    assert preprocess("") == "" and preprocess("   \t\n ") == ""
    assert text_to_tokens("Café MÜNCHEN 東京") == ["café", "münchen", "東京"]
    assert text_to_tokens("see http://x.com/a?b=1 now") == ["see", "now"]


def test_vocabulary_is_deterministic_and_respects_limits():
    texts = [["b", "a", "c", "a"], ["c", "b", "d"], ["a"]]
    vocab = Vocabulary.fit(texts, max_vocab=5, min_freq=1)
    # a:3, b:2, c:2 (tie broken alphabetically), d:1 cut by max_vocab
    assert vocab.itos == ["<pad>", "<unk>", "a", "b", "c"]
    assert Vocabulary.fit(reversed(texts), max_vocab=5) == vocab
    assert Vocabulary.fit(texts, max_vocab=100, min_freq=2).itos == ["<pad>", "<unk>", "a", "b", "c"]
    assert vocab.encode(["a", "zzz"]) == [2, UNK_ID]


def test_vocabulary_save_load_round_trip(tmp_path):
    vocab = Vocabulary.fit([["x", "y", "ü"]])
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == vocab
    assert not list(tmp_path.glob("*.tmp*"))


def test_numericalize_pads_truncates_and_keeps_min_width():
    vocab = Vocabulary.fit([["a", "b"]])
    ids, lengths = numericalize(["a b a b a", "b", ""], vocab, max_length=4, min_width=3)
    assert ids.shape == (3, 4) and lengths.tolist() == [4, 1, 0]
    assert ids[1].tolist() == [vocab.stoi["b"], PAD_ID, PAD_ID, PAD_ID]
    ids, _ = numericalize(["a"], vocab, max_length=4, min_width=3)
    assert ids.shape == (1, 3)
    assert trim_batch(torch.zeros(2, 9), torch.tensor([2, 4]), 5).shape == (2, 5)
    assert trim_batch(torch.zeros(2, 9), torch.tensor([2, 7]), 5).shape == (2, 7)


def _net(**kw) -> TextCNN:
    torch.manual_seed(0)
    kw = {"embedding_dim": 8, "kernel_sizes": [1, 2, 5], "num_filters": 6, "hidden_size": 8, **kw}
    net = BNCNN(input_size=50, num_classes=4, **kw).net
    # Train briefly so BN running statistics are not the identity.
    net.train()
    for _ in range(3):
        net(torch.randint(1, 50, (16, 12)))
    return net.eval()


def test_padding_does_not_change_prediction_in_eval_mode():
    for kw in (
        {},
        {"num_conv_layers": 2, "pooling": "max_mean"},
        {"bn_position": "after_activation"},
        {"ngram_buckets": 97, "ngram_sizes": [2, 3], "ngram_dim": 5},
    ):
        net = _net(**kw)
        short = torch.tensor([[5, 9, 3]])
        alone = net(short)
        longer = torch.randint(1, 50, (2, 30))
        batch = torch.zeros(3, 30, dtype=torch.long)
        batch[0, :3] = short[0]
        batch[1:] = longer
        assert torch.allclose(net(batch)[0], alone[0], atol=1e-5), kw


def test_padding_never_wins_the_max_pool():
    net = _net()
    ids = torch.tensor([[7, 8, 0, 0, 0, 0]])
    h, mask = net.conv_activations(ids)
    assert mask.tolist() == [[True, True, False, False, False, False]]
    assert (h[:, :, 2:] == 0).all()  # padded positions are zeroed, and masked out of the pool
    pooled = net.pool(h - 10.0, mask)  # all-negative activations: padding zeros would win unmasked
    assert (pooled < -5).all()


def test_empty_and_all_unknown_inputs_give_finite_outputs():
    net = _net()
    out = net(torch.tensor([[PAD_ID] * 5, [UNK_ID] * 5]))
    assert torch.isfinite(out).all()


def test_one_hot_input_and_module_shapes():
    net = _net(input_encoding="one_hot")
    assert net.vectors.embedding is None
    assert net(torch.tensor([[3, 4, 0, 0, 0]])).shape == (1, 4)
    model = BNCNN(input_size=30, num_classes=4, kernel_sizes=[2, 3], num_filters=4, batch_norm=False)
    assert model(torch.ones(3, 7, dtype=torch.long)).shape == (3, 4)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())


def test_word_dropout_only_in_training():
    net = _net(word_dropout=0.9)
    ids = torch.randint(2, 50, (4, 10))
    assert torch.equal(net(ids), net(ids))  # eval: deterministic, no tokens dropped


def test_hashed_ngram_features_shape_and_padding():
    net = _net(ngram_buckets=97, ngram_sizes=[2, 3], ngram_dim=5)
    ids = torch.tensor([[5, 9, 3, 0, 0], [4, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    feats = net.ngrams(ids)
    assert feats.shape == (3, 5)
    # Row 0: the mean of its two bigrams and one trigram; padding adds nothing.
    assert torch.allclose(feats[0], net.ngrams(ids[:1, :3])[0], atol=1e-6)
    assert (feats[1:] == 0).all()  # a one-word or empty text has no bigram
    assert net(ids).shape == (3, 4) and torch.isfinite(net(ids)).all()


def test_mixup_mixes_features_and_labels_and_the_model_still_learns():
    torch.manual_seed(0)
    # Four topics, each marked by its own token (ids 2-5) among random filler tokens.
    y = torch.arange(4).repeat(16)
    ids = torch.randint(6, 40, (64, 8))
    ids[:, 3] = y + 2
    kw = {"input_size": 40, "num_classes": 4, "kernel_sizes": [1], "num_filters": 8, "hidden_size": 16}
    plain, model = BNCNN(**kw, dropout=0.0), BNCNN(**kw, dropout=0.0, mixup_alpha=0.4)
    plain.train(), model.train()
    # Without dropout the plain loss of a batch is the same every time; mixup pairs the texts
    # anew and draws a new weight at every step.
    assert len({float(plain.training_step((ids, y), 0).detach()) for _ in range(3)}) == 1
    assert len({float(model.training_step((ids, y), 0).detach()) for _ in range(3)}) == 3
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        model.training_step((ids, y), 0).backward()
        optimizer.step()
    model.eval()
    assert (model(ids).argmax(-1) == y).float().mean() > 0.9  # predictions are not mixed
