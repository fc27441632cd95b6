"""Packing, the train/validation split and the order of samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchard.data.packing import EpochOrder, PackedSequences, micro_batch_samples, split_tokens
from orchard.errors import OrchardError


def test_split_is_by_position_and_keeps_the_tail_for_validation():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1, seq_len=16)
    assert len(train) == 900 and len(val) == 100
    assert train[-1] == 899 and val[0] == 900 and val[-1] == 999
    # Deterministic: the same boundary every time, whatever else changes.
    assert split_tokens(tokens, 0.1, seq_len=64)[1][0] == 900


def test_split_rejects_too_little_data_and_bad_fractions():
    with pytest.raises(OrchardError, match="fewer than one sequence"):
        split_tokens(np.arange(100), 0.1, seq_len=16, where="tiny.txt")
    with pytest.raises(OrchardError, match="data.val_fraction"):
        split_tokens(np.arange(100), 1.5, seq_len=4)


def test_windows_are_non_overlapping_with_shifted_targets():
    tokens = np.arange(103, dtype=np.uint16)
    packed = PackedSequences(tokens, seq_len=10)
    assert len(packed) == 10  # (103 - 1) // 10
    batch = packed.batch([0, 3, 9])
    assert batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"][1].tolist() == list(range(30, 40))
    assert batch["labels"][1].tolist() == list(range(31, 41))
    assert batch["labels"][2].tolist() == list(range(91, 101))


def test_epoch_order_is_a_fresh_permutation_each_epoch_and_deterministic():
    order = EpochOrder(50, seed=7)
    first = [order[i] for i in range(50)]
    second = [order[i] for i in range(50, 100)]
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert first != second and first != list(range(50))
    again = EpochOrder(50, seed=7)
    assert [again[i] for i in range(100)] == first + second
    assert [EpochOrder(50, seed=8)[i] for i in range(50)] != first


def test_micro_batches_partition_the_global_batch_for_any_world_size():
    def samples(world, accum, batch):
        return sorted(s for micro in range(accum) for rank in range(world)
                      for s in micro_batch_samples(3, micro, rank, world, batch, accum))

    expected = list(range(3 * 16, 4 * 16))
    assert samples(world=1, accum=1, batch=16) == expected
    assert samples(world=2, accum=2, batch=4) == expected
    assert samples(world=4, accum=1, batch=4) == expected
    assert samples(world=1, accum=4, batch=4) == expected
