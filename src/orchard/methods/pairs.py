"""Preference pairs as the engine sees them, shared by `orchard reward` and `orchard dpo`.

A pair is read (pairwise files, HH-RLHF dialogues, or the built-in world's pairs), rendered with
the model's chat template into a chosen and a rejected sequence that share their prompt tokens
(labels on the reply and its turn end only), and batched as one padded batch whose first half is
the chosen rows and second half the rejected ones, so a single forward pass scores both. A frozen
reference model's log-probabilities of every pair are computed once and cached in the run directory
(`cached_reference`), for the methods whose loss compares with them.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..data.conversations import TokenizedConversation, collate_padded
from ..data.packing import EpochOrder, micro_batch_samples
from ..data.preferences import (PreferencePair, checked_split, read_limited, read_preference_pairs, read_split,
                                tokenize_preference_pair)
from ..data.synthetic import World, preference_pairs
from ..files import atomic_file
from ..losses.tokens import IGNORE_INDEX
from ..training import TrainConfig
from ..training.runtime import Runtime


@dataclass
class PreferenceDataConfig:
    path: str | list[str] | None = None
    """Pairwise .jsonl/.jsonl.gz/.json/.parquet files or globs: prompt/chosen/rejected as strings or
    message lists, or HH-RLHF's chosen/rejected dialogues. None means the built-in world's pairs."""
    val_path: str | list[str] | None = None
    """Held-out pairs; None holds out data.val_fraction of data.path (the built-in world's
    held-out split when data.path is None)."""
    val_fraction: float = 0.1
    """Fraction of the pairs held out when data.val_path is not given (at least one)."""
    max_length: int = 512
    """Most tokens of prompt plus reply; longer pairs follow data.truncation."""
    truncation: Literal["error", "skip", "truncate_prompt"] = "truncate_prompt"
    """Too long: stop with an error, skip the pair (counted), or drop the prompt's oldest turns."""
    on_error: Literal["error", "skip"] = "error"
    """A malformed record: stop with an error naming it, or skip it (counted)."""
    max_pairs: int | None = None
    """Use at most this many training pairs (from the start)."""

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.max_length <= 1:
            raise ValueError(f"data.max_length must be at least 2, got {self.max_length}")


def pair_training_defaults() -> TrainConfig:
    """The `train` defaults of the methods that learn from pairs (reward models, DPO and relatives)."""
    return TrainConfig(max_steps=200, lr=5e-5, warmup_steps=10, weight_decay=0.0, batch_size=8, eval_every=50,
                       save_every=50)


@dataclass
class TokenizedPair:
    chosen: TokenizedConversation
    rejected: TokenizedConversation


def builtin_pairs(split: str, limit: int | None) -> list[PreferencePair]:
    """The built-in world's preference pairs of `split` ("train", "held_out"), the first `limit`."""
    records = preference_pairs(World(), split=split, num_pairs=limit)
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"built-in {split} pair {i}")
            for i, r in enumerate(records)]


def _tokenize(pairs: list[PreferencePair], tokenizer, config: PreferenceDataConfig) -> tuple[list[TokenizedPair], int]:
    tokenized, skipped = [], 0
    for pair in pairs:
        result = tokenize_preference_pair(pair, tokenizer, config.max_length, config.truncation)
        if result is None:
            skipped += 1
        else:
            tokenized.append(TokenizedPair(*result))
    return tokenized, skipped


def load_pairs(config: PreferenceDataConfig, tokenizer, seed: int) -> tuple[list[TokenizedPair], list[TokenizedPair], dict]:
    """(train pairs, held-out pairs, a description for the lineage record)."""
    if config.path is None:
        train = builtin_pairs("train", config.max_pairs)
        val = (builtin_pairs("held_out", None) if config.val_path is None
               else read_limited(read_preference_pairs, config.val_path, config.on_error, "data.val_path", None))
        source = "built-in world preference pairs"
    else:
        train, val = read_split(read_preference_pairs, config.path, config.val_path, config.on_error,
                                config.max_pairs, config.val_fraction, seed)
        source = str(config.path)
    train_tokens, skipped_train = _tokenize(train, tokenizer, config)
    val_tokens, skipped_val = _tokenize(val, tokenizer, config)
    record = checked_split(train_tokens, val_tokens, skipped_train + skipped_val, "pair", "data.max_length",
                           config.max_length, source)
    return train_tokens, val_tokens, record


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch: rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected ones (the
    layout of `collate_padded`: shifted labels, attention_mask, position_ids)."""
    return collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


class PairBatches:
    """Micro-batches of pairs for the engine: a pure function of (step, micro-batch, rank)."""

    def __init__(self, pairs: list[TokenizedPair], batch_size: int, grad_accum: int, seed: int, pad_id: int):
        self.pairs, self.batch_size, self.grad_accum, self.pad_id = pairs, batch_size, grad_accum, pad_id
        self.order = EpochOrder(len(pairs), seed)

    def indices(self, step: int, micro: int, rank: int, world: int) -> list[int]:
        samples = micro_batch_samples(step, micro, rank, world, self.batch_size, self.grad_accum)
        return [self.order[s] for s in samples]

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        indices = self.indices(step, micro, rank, world)
        batch = collate_pairs([self.pairs[i] for i in indices], self.pad_id)
        batch["pair_index"] = torch.tensor(indices)
        return batch


def held_out_batches(pairs: list[TokenizedPair], batch_size: int, pad_id: int, limit: int | None = None,
                     shard=None):
    """Held-out pairs in order, `batch_size` at a time (at most `limit` batches per process): with a
    `shard` (`training.distributed.Shard`), this process's share of `limit` batches per process."""
    world = shard.world if shard is not None else 1
    for n, start in enumerate(range(0, len(pairs), batch_size)):
        if limit is not None and n >= limit * world:
            return
        if shard is not None and not shard.takes(n):
            continue
        batch = collate_pairs(pairs[start:start + batch_size], pad_id)
        batch["pair_index"] = torch.arange(start, min(start + batch_size, len(pairs)))
        yield batch


def sequence_log_probs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, per-token mean) log-probability of each row's supervised reply."""
    logps = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                  log_probs_of=batch["labels"]).log_probs
    tokens = (batch["labels"] != IGNORE_INDEX).sum(-1).clamp(min=1)
    summed = logps.sum(-1)
    return summed, summed / tokens


# --- the reference model's log-probabilities, computed once per run ----------------------------------

REFERENCE_FILE = "reference_logps.safetensors"


@torch.no_grad()
def reference_log_probs(model, items: list, pad_id: int, batch_size: int, autocast,
                        collate: Callable[[list, int], dict[str, torch.Tensor]] = collate_pairs) -> torch.Tensor:
    """(N, 2) summed log-probabilities under `model` of each item's two sequences, which `collate`
    lays out as rows 0..B-1 and B..2B-1 (a pair's chosen and rejected reply by default; KTO's example
    and its KL sequence)."""
    model.eval()
    rows = []
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[start:start + batch_size], pad_id).items()}
        with autocast():
            summed, _ = sequence_log_probs(model, batch)
        n = len(summed) // 2
        rows.append(torch.stack([summed[:n], summed[n:]], dim=1).float().cpu())
    model.train()
    return torch.cat(rows)


def _fingerprint(splits: dict[str, list[TokenizedPair]], parent_sha: str | None, precision: str) -> str:
    digest = hashlib.sha256(f"{parent_sha}:{precision}".encode())
    for name, pairs in splits.items():
        digest.update(f"{name}:{len(pairs)}".encode())
        for pair in pairs:
            digest.update(str((pair.chosen.input_ids, pair.rejected.input_ids)).encode())
    return digest.hexdigest()


def cached_reference(out: Path, model, train, val, pad_id: int, batch_size: int, parent_sha: str | None,
                     runtime: Runtime) -> dict[str, torch.Tensor]:
    """The reference log-probabilities of every pair, from `out/reference_logps.safetensors` when it
    was computed for these pairs by this parent at the runtime's precision, else computed now and
    saved (a cache that cannot be read, or holds something else, is computed again)."""
    cache_file = out / REFERENCE_FILE
    fingerprint = _fingerprint({"train": train, "val": val}, parent_sha, runtime.precision)
    cached = _read_reference(cache_file, fingerprint, {"train": len(train), "val": len(val)})
    if cached is not None:
        return cached
    model.to(runtime.device)
    reference = {"train": reference_log_probs(model, train, pad_id, batch_size, runtime.autocast),
                 "val": reference_log_probs(model, val, pad_id, batch_size, runtime.autocast)}
    # Each process of a torchrun writes its own temporary (named by its pid) and renames it.
    atomic_file(cache_file, lambda tmp: save_file({k: v.contiguous() for k, v in reference.items()}, tmp,
                                                  metadata={"fingerprint": fingerprint}))
    return reference


def _read_reference(cache_file: Path, fingerprint: str, sizes: dict[str, int]) -> dict[str, torch.Tensor] | None:
    if not cache_file.is_file():
        return None
    try:
        with safe_open(cache_file, framework="pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            cached = {split: handle.get_tensor(split) for split in sizes}
    except (SafetensorError, OSError, KeyError) as error:
        print(f"{cache_file} is unreadable ({error}); computing it again", file=sys.stderr)
        return None
    if any(len(cached[split]) != size for split, size in sizes.items()):
        return None
    return cached
