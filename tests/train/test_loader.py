"""Data order and learning-rate schedule: pure functions, no training."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from facebce.train import lr_at
from facebce.train.loader import SeededSamples, ShardedBatchSampler, batches_per_epoch


def batches(n, b, w, epoch=0, start=0, seed=5):
    return [list(ShardedBatchSampler(n, b, rank=r, world_size=w, seed=seed, epoch=epoch, start=start)) for r in range(w)]


def test_ranks_split_each_global_batch_of_the_permutation():
    n, b, w = 103, 4, 3
    per_rank = batches(n, b, w)
    assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == batches_per_epoch(n, b, w) == 8
    perm = ShardedBatchSampler(n, b, seed=5).permutation().tolist()
    for k in range(8):
        global_batch = sorted(i for r in range(w) for _, i in per_rank[r][k])
        assert global_batch == sorted(perm[k * b * w:(k + 1) * b * w])


def test_resume_offset_gives_the_remaining_batches_on_any_world_size():
    n, b = 96, 4
    full = batches(n, b, 2)
    tail = batches(n, b, 2, start=3 * b * 2)
    assert [x[3:] for x in full] == tail
    # 1 process continuing where 2 stopped sees the same samples, in the same order, as one stream
    one = batches(n, 8, 1, start=3 * b * 2)[0]
    two = [sorted(full[0][k] + full[1][k]) for k in range(3, len(full[0]))]
    assert [sorted(x) for x in one] == two


def test_epochs_reshuffle():
    assert batches(50, 5, 1, epoch=0) != batches(50, 5, 1, epoch=1)
    assert batches(50, 5, 1, epoch=1) == batches(50, 5, 1, epoch=1)


class Noise(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(3), i


def test_augmentation_is_a_function_of_sample_and_epoch():
    ds = SeededSamples(Noise(), seed=1)
    torch.manual_seed(0)
    a = ds[(0, 3)][0]
    state = torch.get_rng_state()
    b = ds[(0, 3)][0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(a, b) and not torch.equal(a, ds[(1, 3)][0]) and not torch.equal(a, ds[(0, 4)][0])


def test_lr_warmup_then_polynomial_decay():
    assert [lr_at(s, 0.1, 10, 2) for s in (0, 1)] == pytest.approx([0.05, 0.1])
    assert lr_at(2, 0.1, 10, 2) == pytest.approx(0.1)
    assert lr_at(6, 0.1, 10, 2) == pytest.approx(0.1 * 0.5 ** 2)
    assert lr_at(9, 0.1, 10, 0) == pytest.approx(0.1 * 0.1 ** 2)
