"""Language-modelling metrics: loss, perplexity and bits per byte on packed sequences.

Bits per byte divides the summed loss by the UTF-8 bytes of the predicted tokens, so models with
different tokenizers are compared on the same text (a tokenizer with longer tokens has a higher
per-token loss but fewer tokens).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.packing import PackedSequences
from ..errors import OrchardError
from ..losses.tokens import bits_per_byte


@torch.no_grad()
def evaluate_language_modeling(model: torch.nn.Module, sequences: PackedSequences, token_bytes: np.ndarray,
                               batch_size: int, max_sequences: int | None = None, shard=None,
                               progress=None) -> dict[str, float]:
    """Metrics over the first `max_sequences` windows of `sequences` (all of them when None). No
    window at all is an error: a loss of 0 and a perplexity of 1 over nothing would read as perfect.
    With a `shard` (`orchard.training.distributed.Shard`) each process scores its batches and the
    sums are added over all of them. `progress(n)` is called after each batch of n windows."""
    device = next(model.parameters()).device
    count = len(sequences) if max_sequences is None else min(len(sequences), max_sequences)
    if count <= 0:
        raise OrchardError(f"evaluation: no window of {sequences.seq_len} tokens to evaluate on "
                           f"({len(sequences.tokens)} tokens, at most {max_sequences} windows)")
    loss_sum, tokens, num_bytes = 0.0, 0, 0
    byte_table = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64))
    for index, start in enumerate(range(0, count, batch_size)):
        if shard is not None and not shard.takes(index):
            continue
        batch = sequences.batch(range(start, min(start + batch_size, count)))
        loss_sum += model(batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss.item()
        tokens += batch["labels"].numel()
        num_bytes += int(byte_table[batch["labels"]].sum())
        if progress is not None:
            progress(len(batch["labels"]))
    if shard is not None:
        totals = shard.sum({"loss": loss_sum, "tokens": tokens, "bytes": num_bytes})
        loss_sum, tokens, num_bytes = totals["loss"], int(totals["tokens"]), int(totals["bytes"])
    loss = loss_sum / max(tokens, 1)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
            "val_bpb": bits_per_byte(loss_sum, num_bytes), "val_tokens": float(tokens)}
