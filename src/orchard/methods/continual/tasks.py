"""The tasks of a stream: built-in ones, conversation files and text corpora, tokenized once."""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ...data.conversations import TokenizedConversation, read_conversations
from ...data.records import ReadStats, resolve_paths
from ...data.packing import PackedSequences
from ...data.synthetic import CONTINUAL_TASKS, World, continual_task
from ...data.tokens import build_token_cache
from ...errors import OrchardError
from ...training.objectives import ConversationLanguageModeling, PackedLanguageModeling, tokenize_conversations
from .config import ContinualConfig

TEXT_PREFIX = "text:"


@dataclass
class TextStreams:
    """A text task's token streams: training windows from the start, held-out windows from the end."""

    train: object
    """Token ids (a 1-D array view of the cached corpus)."""
    scored: object
    """The scored windows' tokens (held out, or with eval_on=train the first training windows)."""
    token_bytes: object
    """UTF-8 bytes of each token id (bits per byte)."""
    window: int
    """Tokens per window (data.max_length)."""

    @property
    def train_windows(self) -> int:
        return len(PackedSequences(self.train, self.window))


@dataclass
class Task:
    """One task of the stream, tokenized: conversations, or a text corpus (`text` set)."""

    name: str
    """Short name: the built-in name or the file's stem (directory and adapter names)."""
    source: str
    train: list = field(default_factory=list)
    """Tokenized training conversations (empty for a text task)."""
    scored: list = field(default_factory=list)
    """Tokenized conversations the task is scored on (held out, or with eval_on=train the first
    training ones); also the engine's validation loss; conversation files' likelihood score."""
    items: list[tuple[list[dict], str]] | None = None
    """(prompt messages, expected answer) to score by exact match; None: scored by likelihood."""
    text: TextStreams | None = None

    @property
    def metric(self) -> str:
        if self.text is not None:
            return "bits_per_byte"
        return "exact_match" if self.items is not None else "likelihood"

    def train_size(self) -> int:
        """Training examples: conversations, or windows of a text task."""
        return self.text.train_windows if self.text is not None else len(self.train)

    def examples(self):
        """The training examples as tokenized conversations (a text window is one whose every token
        is supervised), lazily: replay samples a few of them from corpora of any size."""
        if self.text is None:
            yield from self.train
            return
        windows = PackedSequences(self.text.train, self.text.window)
        for index in range(len(windows)):
            ids = windows.window(index)[:-1].tolist()
            yield TokenizedConversation(ids, ids, f"{self.name}:window:{index}")

    def method(self, config: ContinualConfig, pad_id: int):
        """The engine's view of training on this task alone: SFT's batches and loss, or pretraining's."""
        if self.text is None:
            return conversation_modeling(self.train, self.scored, config, pad_id)
        return PackedLanguageModeling(PackedSequences(self.text.train, self.text.window),
                                      PackedSequences(self.text.scored, self.text.window),
                                      self.text.token_bytes, config.train)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "task"


def conversation_modeling(train: list, val: list, config: ContinualConfig,
                          pad_id: int) -> ConversationLanguageModeling:
    """SFT's objective on a task's conversations (or a replay buffer), with this run's settings."""
    return ConversationLanguageModeling(train, val, pad_id, config.data.max_length, config.data.packing, config.train)


def _tokenize(records: list[dict], tokenizer, config: ContinualConfig) -> list:
    examples, _ = tokenize_conversations(records, tokenizer, config.data.max_length, config.data.train_on,
                                         "truncate_prompt")
    return examples


def is_text_task(spec: str) -> bool:
    """A text corpus to continue pretraining on: "text:PATH", or a .txt(.gz) file."""
    return spec.startswith(TEXT_PREFIX) or spec.endswith((".txt", ".txt.gz"))


def load_text_task(spec: str, config: ContinualConfig, tokenizer) -> Task:
    """A text corpus tokenized once (the token cache pretraining uses) and cut into windows of
    data.max_length tokens: the last eval_items windows are held out, training reads the rest."""
    pattern = spec[len(TEXT_PREFIX):] if spec.startswith(TEXT_PREFIX) else spec
    paths = resolve_paths(pattern, key=f"tasks ({spec})")
    cache = build_token_cache(paths, tokenizer, config.data.text_field, show_progress=sys.stderr.isatty())
    window = config.data.max_length
    held_tokens = config.eval_items * window + 1
    if len(cache.tokens) < held_tokens + window:
        raise OrchardError(f"tasks: {spec} has {len(cache.tokens)} tokens; need more than eval_items="
                           f"{config.eval_items} held-out windows of data.max_length={window} and one to train on")
    boundary = len(cache.tokens) - held_tokens
    train = cache.tokens[:boundary + 1]
    if config.data.train_items is not None:
        train = train[:config.data.train_items * window + 1]
    scored = cache.tokens[boundary:] if config.eval_on == "held_out" else train[:held_tokens]
    stem = paths[0].name.split(".")[0] if len(paths) == 1 else paths[0].parent.name
    streams = TextStreams(train=train, scored=scored, token_bytes=tokenizer.token_byte_lengths(), window=window)
    return Task(name=_safe_name(stem), source=spec, text=streams)


def load_task(spec: str, config: ContinualConfig, tokenizer, world: World | None = None) -> Task:
    """A task of `config.tasks`, tokenized: a built-in name, a conversations file or a text corpus."""
    if is_text_task(spec):
        return load_text_task(spec, config, tokenizer)
    if spec in CONTINUAL_TASKS:
        world = world or World()
        train = continual_task(world, spec, "train", seed=config.world_seed, num_items=config.data.train_items)
        scored = (continual_task(world, spec, "held_out", seed=config.world_seed, num_items=config.eval_items)
                  if config.eval_on == "held_out" else train[:config.eval_items])
        train_records = [{"messages": m, "source": f"{spec}:train:{i}"} for i, (m, _) in enumerate(train)]
        scored_records = [{"messages": m, "source": f"{spec}:{config.eval_on}:{i}"} for i, (m, _) in enumerate(scored)]
        items = [(messages[:-1], expected) for messages, expected in scored]
        name, source = spec, f"built-in:{spec}"
    else:
        if not Path(spec).is_file():
            raise OrchardError(f"tasks: {spec!r} is neither a built-in task ({', '.join(CONTINUAL_TASKS)}), "
                               f"a conversations file nor a text corpus (text:PATH)")
        stats = ReadStats()
        records = [{"messages": c.messages, "source": c.source} for c in read_conversations(spec, stats=stats)]
        random.Random(f"continual:{config.train.seed}:{spec}").shuffle(records)
        if len(records) <= config.eval_items:
            raise OrchardError(f"tasks: {spec} has {len(records)} conversations; need more than "
                               f"eval_items={config.eval_items} (held out) to train on the rest")
        scored_records, train_records = records[:config.eval_items], records[config.eval_items:]
        if config.data.train_items is not None:
            train_records = train_records[:config.data.train_items]
        if config.eval_on == "train":
            scored_records = train_records[:config.eval_items]
        items, name, source = None, _safe_name(Path(spec).stem), spec
    train_examples = _tokenize(train_records, tokenizer, config)
    scored_examples = _tokenize(scored_records, tokenizer, config)
    if not train_examples or not scored_examples:
        raise OrchardError(f"tasks: {spec}: no usable conversations within data.max_length={config.data.max_length}")
    return Task(name=name, source=source, train=train_examples, scored=scored_examples, items=items)
