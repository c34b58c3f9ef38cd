"""In-memory tensor batches: every sample once per epoch, replayable orders, resumable positions,
and no single-sample training batch (BatchNorm cannot normalise one sample)."""

from __future__ import annotations

import torch

from src.data import TensorBatches


def sizes(loader: TensorBatches) -> list[int]:
    return [len(b[0]) for b in loader]


def test_only_a_single_sample_final_training_batch_is_dropped():
    x = torch.arange(9.0)
    assert sizes(TensorBatches((x,), batch_size=4, drop_last_single=True)) == [4, 4]  # 9 = 4 + 4 + 1
    assert len(TensorBatches((x,), batch_size=4, drop_last_single=True)) == 2
    assert sizes(TensorBatches((x,), batch_size=3, drop_last_single=True)) == [3, 3, 3]
    assert sizes(TensorBatches((x[:6],), batch_size=4, drop_last_single=True)) == [4, 2]
    assert sizes(TensorBatches((x,), batch_size=4)) == [4, 4, 1]  # evaluation keeps every sample
    assert sizes(TensorBatches((x,), batch_size=100, drop_last_single=True)) == [9]  # larger than the data


def test_each_epoch_covers_every_sample_once_in_an_order_a_resume_replays():
    x = torch.arange(103)
    epoch = [0]
    loader = TensorBatches((x, x), batch_size=10, shuffle=True, seed=7, epoch=lambda: epoch[0])
    assert len(loader) == 11
    first = torch.cat([b[0] for b in loader])
    assert sorted(first.tolist()) == list(range(103))
    epoch[0] = 1
    assert not torch.equal(torch.cat([b[0] for b in loader]), first)
    epoch[0] = 0
    assert torch.equal(torch.cat([b[0] for b in loader]), first)
    assert torch.equal(torch.cat([b[0] for b in TensorBatches((x, x), batch_size=10)]), x)


def test_a_loader_resumed_mid_epoch_skips_the_batches_already_served():
    x = torch.arange(20.0)
    epoch = [2]
    first = TensorBatches((x,), batch_size=3, shuffle=True, seed=5, epoch=lambda: epoch[0])
    it = iter(first)
    seen = [next(it)[0] for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches_served": 3}
    resumed = TensorBatches((x,), batch_size=3, shuffle=True, seed=5, epoch=lambda: epoch[0])
    resumed.load_state_dict(state)
    rest = [b[0] for b in resumed]
    assert torch.equal(torch.cat(seen + rest).sort().values, x)  # the epoch completes, nothing twice
    epoch[0] = 3
    assert len(list(resumed)) == 7  # the next epoch is whole again
    at_end = TensorBatches((x,), batch_size=3, shuffle=True, seed=5, epoch=lambda: epoch[0])
    at_end.load_state_dict({"epoch": 2, "batches_served": 7})  # saved at the end of epoch 2
    assert len(list(at_end)) == 7
