"""Supervised fine-tuning on conversations: full, or parameter-efficient with LoRA/DoRA.

Run it with `orchard sft INIT=CKPT [RECIPE.yaml] [key=value ...]`; with no data it fine-tunes on
the built-in world's instruction conversations. Read top to bottom, a run is:

1. the parent checkpoint (orchard's or a Hugging Face model) and its tokenizer and chat template;
2. conversations read and rendered with that template, the loss only on assistant tokens
   (all assistant turns or the last), bad records an error or a counted skip, long ones
   truncated by dropping old turns, never the answer;
3. packed into `data.max_length`-token sequences without attention or positions leaking across
   conversations (block-diagonal masks, positions restarting at each one), or padded one per row;
4. with `peft.method=lora|dora|qlora|adapter|prefix`, adapters attached to the frozen base (only they train and
   are saved; qlora first stores the base's targeted layers in 4-bit NF4); otherwise every
   weight trains;
5. the shared engine, with this module's batches and loss (summed token cross-entropy over
   supervised tokens), validated by the loss on held-out conversations.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from typing import Literal

from ..data.conversations import read_conversations
from ..data.records import ReadStats
from ..data.synthetic import World, instruction_conversations
from ..environments import tool_conversations
from ..errors import OrchardError
from ..losses.tokens import IGNORE_INDEX
from ..peft.config import apply_peft
from ..training import TrainConfig, TrainResult
from ..training.objectives import ConversationLanguageModeling, tokenize_conversations
from ..training.launch import MethodConfig, finish, start_from
from ..training.run_directory import in_run_directory


@dataclass
class ConversationDataConfig:
    path: str | list[str] | None = None
    """Conversations: .jsonl/.json files or globs in OpenAI messages (with tool calls and
    tools), ShareGPT, Alpaca or prompt/completion form. None means built-in data (data.builtin)."""
    builtin: Literal["instructions", "tools"] = "instructions"
    """Built-in data when data.path is None: the world's instruction conversations, or its
    tool-use conversations (calculator and lookup calls, `orchard.environments.world`, with a
    quarter of plain instructions)."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = "auto"
    """Record format; auto detects it from each record's keys."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which assistant turns the loss covers."""
    max_length: int = 512
    """Tokens per training sequence; longer conversations follow data.truncation."""
    truncation: Literal["error", "skip", "truncate_prompt"] = "truncate_prompt"
    """Too long: stop with an error, skip it (counted), or drop its oldest turns (never the answer)."""
    on_error: Literal["error", "skip"] = "error"
    """A malformed record (unknown role, empty answer, ...): stop with an error, or skip it (counted)."""
    packing: bool = True
    """Pack several conversations per sequence (block-diagonal attention); False pads one per row,
    batching similar lengths together."""
    val_fraction: float = 0.05
    """Fraction of conversations held out for validation (at least one)."""
    max_conversations: int | None = None
    """Use at most this many conversations (from the start)."""


@dataclass
class SFTConfig(MethodConfig):
    out: str = "runs/sft"
    data: ConversationDataConfig = field(default_factory=ConversationDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=300, lr=1e-4, warmup_steps=20,
                                                                   weight_decay=0.0, batch_size=8))


def load_conversations(config: SFTConfig) -> tuple[list[dict], str]:
    """Conversation records and a description of where they came from."""
    if config.data.path is None and config.data.builtin == "tools":
        records = tool_conversations(World(), num_conversations=config.data.max_conversations or 2000)
        return [{**r, "source": f"built-in tools:{i}"} for i, r in enumerate(records)], "built-in world tool use"
    if config.data.path is None:
        records = instruction_conversations(World(), split="train",
                                            num_conversations=config.data.max_conversations)
        return [{"messages": r["messages"], "source": f"built-in:{i}"} for i, r in enumerate(records)], \
            "built-in world instructions"
    stats = ReadStats()
    conversations = []
    for conversation in read_conversations(config.data.path, format=config.data.format,
                                           on_error=config.data.on_error, stats=stats):
        conversations.append({"messages": conversation.messages, "source": conversation.source,
                              "tools": conversation.tools})
        if config.data.max_conversations and len(conversations) >= config.data.max_conversations:
            break
    if stats.skipped:
        print(f"skipped {stats.skipped} malformed record(s): {stats.describe()}", file=sys.stderr)
    return conversations, str(config.data.path)


@in_run_directory("sft")
def run(config: SFTConfig) -> TrainResult:
    start = start_from(config.init, "sft", config.train)
    model, tokenizer = start.model, start.tokenizer

    records, source = load_conversations(config)
    examples, too_long = tokenize_conversations(records, tokenizer, config.data.max_length, config.data.train_on,
                                                config.data.truncation)
    if too_long:
        print(f"skipped {too_long} conversation(s) longer than data.max_length={config.data.max_length}",
              file=sys.stderr)
    if len(examples) < 2:
        raise OrchardError(f"data.path: {len(examples)} usable conversation(s) in {source}; need at least 2")
    random.Random(config.train.seed).shuffle(examples)
    num_val = max(1, int(len(examples) * config.data.val_fraction))
    val, train = examples[:num_val], examples[num_val:]

    trainable, total = apply_peft(model, config.peft, config.train.seed)

    method = ConversationLanguageModeling(train, val, tokenizer.pad_id, config.data.max_length, config.data.packing,
                                          config.train)
    supervised = sum(sum(1 for label in e.labels if label != IGNORE_INDEX) for e in train)
    data_record = {"source": source, "conversations": len(records), "train": len(train), "val": len(val),
                   "skipped_too_long": too_long, "supervised_tokens": supervised}
    return finish(start, config, method, "sft", data_record, (trainable, total), config.data.max_length)
