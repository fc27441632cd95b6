"""Packed fixed-length training sequences over a token stream, and their deterministic order.

The token stream (documents joined by end-of-text) is split once by position: the last
`val_fraction` of tokens is validation, the rest training, so the split never changes with the
batch size, the seed or the number of processes. Training sequences are the stream cut into
non-overlapping windows of `seq_len + 1` tokens (inputs and shifted targets); each epoch visits
them in a fresh permutation drawn from (seed, epoch). Sample `i` of the run is a pure function of
`i`, which is what lets a resumed or distributed run see exactly the batches a single
uninterrupted run sees.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import OrchardError


def split_tokens(tokens, val_fraction: float, seq_len: int, where: str = "data") -> tuple[object, object]:
    """(train, validation) views of a 1-D token array; validation is the tail."""
    if not 0 < val_fraction < 1:
        raise OrchardError(f"data.val_fraction: must be between 0 and 1, got {val_fraction}")
    n = len(tokens)
    boundary = n - int(n * val_fraction)
    train, val = tokens[:boundary], tokens[boundary:]
    for name, part in (("training", train), ("validation", val)):
        if len(part) < seq_len + 1:
            raise OrchardError(f"{where}: {n} tokens leave the {name} split {len(part)} tokens, fewer than one "
                               f"sequence of data.seq_len={seq_len}; use more data or a shorter data.seq_len")
    return train, val


class PackedSequences:
    """Non-overlapping windows of `seq_len + 1` tokens, as (inputs, targets) pairs."""

    def __init__(self, tokens, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        windows = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


class EpochOrder:
    """Maps the run's sample number to a sequence index: epoch after epoch of fresh permutations."""

    def __init__(self, num_sequences: int, seed: int):
        self.num_sequences = num_sequences
        self.seed = seed
        self._epoch, self._permutation = -1, None

    def __getitem__(self, sample: int) -> int:
        epoch, position = divmod(sample, self.num_sequences)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.num_sequences, generator=generator)
        return int(self._permutation[position])


def micro_batch_samples(step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int) -> range:
    """Sample numbers of one micro-batch: step s takes samples [s*G, (s+1)*G) of the run, with
    G = batch_size * grad_accum * world, dealt out so every (micro, rank) gets its own slice."""
    global_batch = batch_size * grad_accum * world
    start = step * global_batch + (micro * world + rank) * batch_size
    return range(start, start + batch_size)
