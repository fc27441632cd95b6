"""The language-modelling objectives that several methods train with, as engine methods.

- `PackedLanguageModeling`: packed windows of text, the summed token cross-entropy, validated by
  loss, perplexity and bits per byte (pretraining, distillation's plain-text baseline, continual
  text tasks);
- `ConversationLanguageModeling`: packed (or padded) conversations with the loss on assistant
  tokens only (SFT, sequence-level distillation, continual conversation tasks and replay);
- `tokenize_conversations` and `summed_token_loss`, which they and the continual scorer share.

They take narrow arguments (the engine's `TrainConfig`, lengths, flags), so that no method builds
another method's config to reuse its objective.
"""

from __future__ import annotations

import torch

from ..data.conversations import (Conversation, collate_packed, collate_padded, length_grouped_order,
                                  pack_conversations, tokenize_conversation)
from ..data.packing import EpochOrder, PackedSequences, micro_batch_samples
from ..evaluation.language_modeling import evaluate_language_modeling
from ..losses.tokens import IGNORE_INDEX
from ..model import CausalLM
from .distributed import Shard
from .engine import TrainConfig


def summed_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of a batch's supervised tokens. A packed batch brings its documents and
    positions, a padded one its padding mask, a batch of plain text windows neither."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"),
                 document_ids=batch.get("document_ids"), labels=batch["labels"]).loss


class PackedLanguageModeling:
    """The engine's view of pretraining: batches of packed windows, summed cross-entropy."""

    name = "pretrain"
    trainable_modules = None
    fixed_shapes = True

    def __init__(self, train: PackedSequences, val: PackedSequences, token_bytes, config: TrainConfig):
        self.train, self.val, self.token_bytes, self.config = train, val, token_bytes, config
        self.order = EpochOrder(len(train), config.seed)

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        samples = micro_batch_samples(step, micro, rank, world, self.config.batch_size, self.config.grad_accum)
        return self.train.batch([self.order[s] for s in samples])

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].numel()

    def loss(self, model, batch):
        return summed_token_loss(model, batch), {}

    def evaluate(self, model: CausalLM, shard: Shard) -> dict[str, float]:
        # eval_batches global batches, split over the processes: the same windows at every world size.
        return evaluate_language_modeling(model, self.val, self.token_bytes, self.config.batch_size,
                                          self.config.eval_batches * self.config.batch_size * shard.world, shard)


def tokenize_conversations(records: list[dict], tokenizer, max_length: int, train_on: str,
                           truncation: str) -> tuple[list, int]:
    """Conversation records ({"messages", "source", "tools"?}) as training examples, and how many were too
    long to keep (see `data.conversations.tokenize_conversation`)."""
    examples, skipped = [], 0
    for record in records:
        example = tokenize_conversation(Conversation(record["messages"], record["source"], record.get("tools")), tokenizer, max_length,
                                        train_on, truncation)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return examples, skipped


class ConversationLanguageModeling:
    """The engine's view of SFT: batches of packed (or padded) conversations, loss on assistant tokens."""

    trainable_modules = None

    def __init__(self, train: list, val: list, pad_id: int, max_length: int, packing: bool, config: TrainConfig,
                 name: str = "sft"):
        self.config, self.pad_id, self.name = config, pad_id, name
        if packing:
            self.train = pack_conversations(train, max_length)
            self.val = pack_conversations(val, max_length)
            self.collate = lambda rows: collate_packed(rows, pad_id)
            self.order = EpochOrder(len(self.train), config.seed)
        else:
            self.train, self.val = train, val
            self.collate = lambda rows: collate_padded(rows, pad_id)
            lengths = [len(example.input_ids) for example in train]
            self.order = _GroupedOrder(lengths, config.batch_size, config.seed)

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        c = self.config
        samples = micro_batch_samples(step, micro, rank, world, c.batch_size, c.grad_accum)
        return self.collate([self.train[self.order[s]] for s in samples])

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model, batch):
        return summed_token_loss(model, batch), {}

    def evaluate(self, model, shard: Shard) -> dict[str, float]:
        loss_sum, tokens = 0.0, 0
        size = self.config.batch_size
        limit = min(len(self.val), self.config.eval_batches * size * shard.world)
        for index, start in enumerate(range(0, limit, size)):
            if not shard.takes(index):
                continue
            batch = self.collate(self.val[start:start + size])
            batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
            total, _ = self.loss(model, batch)
            loss_sum += total.item()
            tokens += self.count(batch)
        totals = shard.sum({"loss": loss_sum, "tokens": tokens})
        return {"val_loss": totals["loss"] / max(totals["tokens"], 1)}


class _GroupedOrder:
    """Sample number -> example index for length-grouped batches, epoch after epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self._epoch, self._order = -1, []

    def __getitem__(self, sample: int) -> int:
        epoch, position = divmod(sample, len(self.lengths))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = length_grouped_order(self.lengths, self.batch_size, self.seed, epoch)
        return self._order[position]
