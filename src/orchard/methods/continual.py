"""Continual learning: one checkpoint trained through a sequence of tasks (conversations or text).

Run it with `orchard continual init=CKPT [RECIPE.yaml] [key=value ...]`; with no `tasks` it trains
on the built-in stream (`CONTINUAL_TASKS`: word problems, English facts, Chinese facts). Read top
to bottom, a run is:

1. every task's data: a built-in task (a name in `CONTINUAL_TASKS`) trains on its "train" split
   and is scored on `eval_items` items of its "held_out" split; a conversations task (a .jsonl,
   any format `orchard sft` reads) is shuffled (seeded) and its first `eval_items` conversations
   are held out, the rest train; both are tokenized as SFT does. A text task ("text:PATH" or a
   .txt file: continued pretraining) is tokenized into pretraining's token cache and cut into
   windows of data.max_length tokens; its last `eval_items` windows are held out, and it trains
   with pretraining's batches and loss. With eval_on=train every task is scored on its first
   `eval_items` training items instead (retention of what was taught);
2. the baseline: the init model scored on every task (cached in `out/baseline.json`);
3. for each task i, training with the shared engine into `out/task-<i>-<name>/`, a normal run
   directory (resumable; a finished one is skipped, so a killed run resumes where it stopped),
   with the strategy's changes:
   * naive: plain fine-tuning of the previous task's checkpoint;
   * replay: a reservoir (Algorithm R, seeded) of `replay_size` training examples of the earlier
     tasks (conversations, or text windows supervised on every token); each micro-batch is a
     replay micro-batch with probability `replay_ratio`, decided by a seeded draw from (step,
     micro-batch), so batches stay a pure function of the step and resume exactly;
   * ewc: online elastic weight consolidation. After task i the diagonal Fisher of the
     log-likelihood on `ewc_batches` of task i's batches (squared gradients of each batch's mean
     token loss, averaged) is added to the decayed earlier one, F = ewc_gamma * F_old + F_new, and
     saved as `task-<i>-<name>/fisher.safetensors` beside its final checkpoint; task i+1 then adds
     (ewc_lambda / 2) * sum F (theta - theta*)^2 to the mean token loss, theta* being task i's
     final weights. The Fisher is that of a batch's mean loss, so ewc_lambda keeps its meaning
     across batch sizes; its values are small, so useful lambdas are large (the default, 1e6, is
     the one measured on the built-in stream);
   * adapters: the base stays frozen; every task trains its own LoRA adapter (named after the
     task) from the base, and its checkpoint holds only that adapter. Task j is evaluated with
     adapter j active (task identity known at test time), so nothing learnt can be forgotten:
     R[i][j] == R[j][j] for j <= i; a task whose adapter is not trained yet (j > i) is scored on
     the base alone, so that row's later cells equal the baseline.
   Each task's `fit()` has its own warm-up and cosine decay: continual pre-training's re-warming
   and re-decay per task come for free.
4. after each task, every task scored on its scored items: row i of the accuracy matrix R
   (cached in `task-<i>-<name>/scores.json`);
5. `out/continual.json` (R, baseline, the `orchard.evaluation.continual` summary, task names,
   strategy, each task's metric), `out/R.png` (heat map) and `out/report.md` (tables).

Scores: built-in tasks are scored by greedy exact match (`chat_exact_match` with each item's
expected answer). Conversation files have no expected answers, so they are scored by the held-out
likelihood exp(-mean token loss) on the assistant tokens of their held-out conversations, and text
tasks by the likelihood per byte, 2 ** -(bits per byte) of the held-out windows. Every score is in
[0, 1] and higher is better, so the R-matrix metrics (forgetting, transfer) keep their meaning for
every task; continual.json names each task's metric and also gives the matrix in each task's own
unit ("values": bits per byte for text), which the table and heat map show.

Runs in one process (not under torchrun: the engine closes its process group at the end of each
`fit()`).
"""

from __future__ import annotations

import math
import os
import random
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from ..checkpoint import (
    FINAL_DIR,
    attach_adapter_checkpoint,
    is_adapter_checkpoint,
    load_checkpoint,
    load_merged,
    read_weights,
    resolve_checkpoint,
)
from ..config import to_dict
from ..data.conversations import ReadStats, TokenizedConversation, collate_padded, read_conversations
from ..data.corpus import resolve_paths
from ..data.packing import PackedSequences
from ..data.synthetic import CONTINUAL_TASKS, World, continual_task
from ..data.tokens import build_token_cache
from ..errors import OrchardError
from ..evaluation import continual as continual_metrics
from ..evaluation.completion import chat_exact_match
from ..evaluation.language_modeling import evaluate_language_modeling
from ..evaluation.report import Report
from ..files import atomic_file, read_json, write_json
from ..lineage import new_record
from ..losses.tokens import IGNORE_INDEX
from ..peft.config import PeftConfig
from ..peft.lora import (
    LoraConfig,
    add_lora,
    set_active_adapters,
    trainable_parameter_count,
)
from ..training import TrainConfig, Trainer, TrainResult
from ..training.run_directory import open_run
from ..training.objectives import (ConversationLanguageModeling, PackedLanguageModeling, summed_token_loss,
                                   tokenize_conversations)
from ..training.runtime import Runtime

FISHER_FILE = "fisher.safetensors"
SCORES_FILE = "scores.json"
TEXT_PREFIX = "text:"


@dataclass
class ContinualDataConfig:
    max_length: int = 512
    """Tokens per training sequence; longer conversations lose their oldest turns (never the answer).
    Text tasks are cut into windows of this many tokens."""
    packing: bool = True
    """Pack several conversations per sequence (block-diagonal attention); False pads one per row."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which assistant turns the loss covers."""
    train_items: int | None = None
    """Use at most this many training conversations (text tasks: windows) per task (None: all of
    them; a built-in task's default size)."""
    text_field: str = "text"
    """Field holding the text in a text task's .jsonl/.json/.parquet records."""


@dataclass
class ContinualConfig:
    init: str | None = None
    """The checkpoint the sequence starts from (orchard's, or a Hugging Face model directory or Hub id)."""
    out: str = "runs/continual"
    """Run directory: one run directory per task, continual.json, R.png, report.md. Running again resumes it."""
    tasks: list[str] = field(default_factory=lambda: list(CONTINUAL_TASKS))
    """The tasks, in training order: built-in names (arithmetic, facts-en, facts-zh), conversation
    .jsonl files, or text corpora to continue pretraining on: "text:PATH" (a file, glob or
    directory, as pretrain's data.path reads) or a .txt file."""
    task_steps: list[int] | None = None
    """Training steps of each task, in order (None: train.max_steps for every task). 0 scores a task
    without training it: a task the init model already learnt (e.g. the corpus it was pretrained
    on), whose data replay and EWC still protect while later tasks train."""
    strategy: Literal["naive", "replay", "ewc", "adapters"] = "naive"
    """naive: plain sequential fine-tuning; replay: mix in a buffer of earlier tasks' examples; ewc:
    online elastic weight consolidation; adapters: one LoRA adapter per task on a frozen base."""
    replay_size: int = 200
    """replay: examples kept in the reservoir buffer of earlier tasks' training examples."""
    replay_ratio: float = 0.25
    """replay: fraction of each step's micro-batches drawn from the buffer."""
    ewc_lambda: float = 1e6
    """ewc: strength of the penalty (ewc_lambda / 2) * sum F (theta - theta*)^2 added to the mean token
    loss. The Fisher of a batch's mean loss is small (1e-7 of a nat at naive fine-tuning's drift on
    the built-in stream), hence the large default: it cut that stream's forgetting by 82%."""
    ewc_batches: int = 20
    """ewc: batches of a task's training data the diagonal Fisher is averaged over."""
    ewc_gamma: float = 1.0
    """ewc: decay of the earlier Fisher, F = ewc_gamma * F_old + F_new (online EWC; 1 keeps all)."""
    peft: PeftConfig = field(default_factory=lambda: PeftConfig(method="lora", r=8))
    """adapters: the adapter each task trains (lora or dora)."""
    eval_items: int = 100
    """Items per task scored after every task (text tasks: windows of data.max_length tokens)."""
    eval_on: Literal["held_out", "train"] = "held_out"
    """held_out: score items no training step saw (built-in tasks' held-out split, conversations held
    out of a file, a corpus's last windows): what a task generalises to. train: score the first
    eval_items training items: how much of what was taught is retained, the measure of tasks that
    are memorised (facts a model did not know) rather than generalised."""
    world_seed: int = 0
    """Seed of the built-in tasks' items."""
    data: ContinualDataConfig = field(default_factory=ContinualDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=200, lr=1e-4, warmup_steps=20,
                                                                   weight_decay=0.0, batch_size=8))
    """Training of each task (its own warm-up and cosine decay)."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: give at least one task")
        if self.replay_size < 0:
            raise ValueError(f"replay_size must not be negative, got {self.replay_size}")
        if not 0 <= self.replay_ratio <= 1:
            raise ValueError(f"replay_ratio must be between 0 and 1, got {self.replay_ratio}")
        if self.ewc_lambda < 0 or self.ewc_gamma < 0:
            raise ValueError("ewc_lambda and ewc_gamma must not be negative")
        if self.ewc_batches <= 0:
            raise ValueError(f"ewc_batches must be positive, got {self.ewc_batches}")
        if self.eval_items <= 0:
            raise ValueError(f"eval_items must be positive, got {self.eval_items}")
        if self.task_steps is not None:
            if len(self.task_steps) != len(self.tasks):
                raise ValueError(f"task_steps: give one number per task ({len(self.tasks)}), got {len(self.task_steps)}")
            if any(steps < 0 for steps in self.task_steps) or not any(self.task_steps):
                raise ValueError(f"task_steps: must not be negative, and at least one task must train; got "
                                 f"{self.task_steps}")


# --- tasks -----------------------------------------------------------------------------------------


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


# --- replay -----------------------------------------------------------------------------------------


def reservoir(stream, size: int, seed: int) -> list:
    """Algorithm R: a uniform sample of `size` items of `stream` in one pass, deterministic in `seed`."""
    rng = random.Random(f"reservoir:{seed}")
    buffer: list = []
    for seen, item in enumerate(stream):
        if seen < size:
            buffer.append(item)
        else:
            slot = rng.randint(0, seen)
            if slot < size:
                buffer[slot] = item
    return buffer


class ContinualLanguageModeling:
    """The engine's view of one task: the task's own batches (conversations or text windows), plus
    replay micro-batches from a buffer of earlier tasks and an EWC penalty, as the strategy asks.
    The loss reads whatever a batch carries (a packed conversation batch brings its block mask and
    positions; a text batch neither), so replayed conversations mix into a text task and back."""

    name = "continual"
    trainable_modules = None

    def __init__(self, current, replay: ConversationLanguageModeling | None = None,
                 replay_ratio: float = 0.0, seed: int = 0, penalty: EWCPenalty | None = None):
        self.current, self.replay, self.replay_ratio = current, replay, replay_ratio
        self.seed, self.penalty = seed, penalty

    def is_replay(self, step: int, micro: int) -> bool:
        """Whether micro-batch `micro` of step `step` comes from the buffer (the same on every rank)."""
        if self.replay is None or self.replay_ratio <= 0:
            return False
        return random.Random(f"replay:{self.seed}:{step}:{micro}").random() < self.replay_ratio

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        source = self.replay if self.is_replay(step, micro) else self.current
        return source.batch(step, micro, rank, world)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model, batch):
        total, metrics = summed_token_loss(model, batch), {}
        if self.penalty is not None:
            # The engine divides the summed loss by count(): a per-token penalty is added count times.
            penalty = self.penalty()
            total = total + penalty * self.count(batch)
            metrics["ewc_penalty"] = float(penalty.detach())
        return total, metrics

    def evaluate(self, model) -> dict[str, float]:
        return self.current.evaluate(model)


# --- EWC ----------------------------------------------------------------------------------------------


def diagonal_fisher(model: torch.nn.Module, method, batches: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Mean over `batches` of the squared gradients of each batch's mean token loss (the empirical
    diagonal Fisher of the log-likelihood, per batch), for every trainable parameter, on the CPU.
    The mean, not the sum, so the Fisher keeps its scale whatever the batch size and sequence
    length, as the per-token penalty it weighs does."""
    model = model.to(device).train()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, device="cpu") for name, p in params.items()}
    for step in range(batches):
        batch = {k: v.to(device) for k, v in method.batch(step, 0, 0, 1).items()}
        model.zero_grad(set_to_none=True)
        total, _ = method.loss(model, batch)
        (total / max(method.count(batch), 1)).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float().cpu() ** 2
    model.zero_grad(set_to_none=True)
    return {name: (f / batches).contiguous() for name, f in fisher.items()}


class EWCPenalty:
    """(lambda / 2) * sum_k F_k (theta_k - theta*_k)^2 over the parameters the Fisher names."""

    def __init__(self, model: torch.nn.Module, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                 ewc_lambda: float):
        self.ewc_lambda = ewc_lambda
        named = dict(model.named_parameters())
        missing = sorted(set(fisher) - set(named))
        if missing:
            raise OrchardError(f"ewc: the Fisher names {missing[0]}, which the model does not have")
        self.terms = [(named[name], fisher[name], anchor[name]) for name in sorted(fisher)]

    def __call__(self) -> torch.Tensor:
        total = None
        for i, (p, f, a) in enumerate(self.terms):
            if f.device != p.device:  # the engine moved the model after this was built
                f, a = f.to(p.device), a.to(p.device)
                self.terms[i] = (p, f, a)
            term = (f * (p.float() - a) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.ewc_lambda * total


# --- scoring --------------------------------------------------------------------------------------------


def mean_likelihood(model, examples: list, pad_id: int, batch_size: int = 16) -> float:
    """exp(-mean token loss) on the supervised tokens of `examples`."""
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_padded(examples[start:start + batch_size], pad_id).items()}
            loss_sum += summed_token_loss(model, batch).item()
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    return math.exp(-loss_sum / max(tokens, 1))


def score_task(model, tokenizer, task: Task) -> float:
    """Higher is better, in [0, 1]: exact match, or the held-out likelihood per token (conversations)
    or per byte (text: 2 ** -bits_per_byte)."""
    if task.text is not None:
        windows = PackedSequences(task.text.scored, task.text.window)
        model.eval()
        bpb = evaluate_language_modeling(model, windows, task.text.token_bytes, batch_size=16)["val_bpb"]
        return 2.0 ** -bpb
    if task.items is not None:
        return chat_exact_match(model, tokenizer, task.items).accuracy
    return mean_likelihood(model, task.scored, tokenizer.pad_id)


def task_value(task: Task, score: float) -> float:
    """A score in the task's own unit: bits per byte for text (lower is better), else the score."""
    return -math.log2(score) if task.text is not None else score


def format_value(task: Task, score: float) -> str:
    return f"{task_value(task, score):.3f} bpb" if task.text is not None else f"{score:.0%}"


def _read_cached(path: Path) -> dict | None:
    """A score cache this run wrote, or None when it is missing or unreadable (then computed again)."""
    try:
        return read_json(path) if path.is_file() else None
    except OrchardError:
        return None


# --- the run -----------------------------------------------------------------------------------------------


def _lora_config(peft: PeftConfig) -> LoraConfig:
    if peft.method not in ("lora", "dora"):
        raise OrchardError(f"peft.method: strategy=adapters trains one LoRA or DoRA adapter per task, "
                           f"not {peft.method!r}")
    return LoraConfig(r=peft.r, alpha=peft.alpha, dropout=peft.dropout, target_modules=peft.target_modules,
                      use_rslora=peft.rslora, use_dora=peft.method == "dora")


def task_dirs(config: ContinualConfig, tasks: list[Task]) -> list[Path]:
    return [Path(config.out) / f"task-{i}-{task.name}" for i, task in enumerate(tasks)]


def adapter_names(tasks: list[Task]) -> list[str]:
    """One adapter name per task: its name, with its index where a name repeats."""
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.name] = counts.get(task.name, 0) + 1
    return [task.name if counts[task.name] == 1 else f"{task.name}-{i}" for i, task in enumerate(tasks)]


def _evaluate_row(config: ContinualConfig, tasks: list[Task], finals: list[Path], base: Path, upto: int,
                  device: torch.device) -> list[float]:
    """Row `upto` of R: every task scored by the model after task `upto` (`finals`: each task's
    resulting checkpoint so far; with adapters, the base for a task that did not train)."""
    if config.strategy != "adapters":
        checkpoint = load_checkpoint(finals[upto], device)
        return [score_task(checkpoint.model, checkpoint.tokenizer, task) for task in tasks]
    checkpoint = load_checkpoint(base, device)
    names = adapter_names(tasks)
    trained = [j <= upto and finals[j] != base for j in range(len(tasks))]
    for j in range(upto + 1):
        if trained[j]:
            attach_adapter_checkpoint(checkpoint.model, base, finals[j], names[j])
    checkpoint.model.to(device)
    row = []
    for j, task in enumerate(tasks):
        set_active_adapters(checkpoint.model, names[j] if trained[j] else None)
        row.append(score_task(checkpoint.model, checkpoint.tokenizer, task))
    return row


def _save_fisher(fisher: dict[str, torch.Tensor], path: Path, config: ContinualConfig) -> None:
    """Atomically: a run killed while writing leaves no half-written Fisher to be trusted later."""
    atomic_file(path, lambda tmp: save_file(fisher, tmp, metadata={
        "format": "pt", "ewc_gamma": str(config.ewc_gamma), "ewc_batches": str(config.ewc_batches)}))


def run(config: ContinualConfig) -> TrainResult:
    with open_run(config.out, "continual", to_dict(config)):
        return _run(config)


def _run(config: ContinualConfig) -> TrainResult:
    if not config.init:
        raise OrchardError("init: continual needs a checkpoint to start from, e.g. init=runs/quickstart/sft")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OrchardError("continual runs in one process for now; start it without torchrun")
    base = resolve_checkpoint(config.init)
    if config.strategy == "adapters" and is_adapter_checkpoint(base):
        raise OrchardError(f"init: strategy=adapters trains adapters on a full checkpoint, and {base} is an "
                           f"adapter checkpoint; merge it first (e.g. train from its merged export)")
    runtime = Runtime.create(config.train.device, config.train.precision)
    device = runtime.device
    out = Path(config.out)
    start = load_merged(base)
    tokenizer = start.tokenizer
    world = World()
    tasks = [load_task(spec, config, tokenizer, world) for spec in config.tasks]
    dirs = task_dirs(config, tasks)
    names = [task.name for task in tasks]
    recipe = to_dict(config)

    # Cached scores are reused only for the same scored items.
    key = {"tasks": names, "sources": [t.source for t in tasks], "eval_items": config.eval_items,
           "eval_on": config.eval_on, "world_seed": config.world_seed, "max_length": config.data.max_length,
           "train_items": config.data.train_items}
    cached = _read_cached(out / "baseline.json")
    if cached is not None and cached.get("key") == key:
        baseline = cached["baseline"]
    else:
        model = start.model.to(device)
        baseline = [score_task(model, tokenizer, task) for task in tasks]
        write_json(out / "baseline.json", {"key": key, "baseline": baseline})
        start.model.cpu()
    del start

    R: list[list[float]] = []
    result: TrainResult | None = None
    fisher: dict[str, torch.Tensor] | None = None
    steps = config.task_steps or [config.train.max_steps] * len(tasks)
    finals: list[Path] = []  # each task's resulting checkpoint
    for i, task in enumerate(tasks):
        parent = base if (i == 0 or config.strategy == "adapters") else finals[i - 1]
        current = task.method(config, tokenizer.pad_id)
        if steps[i] == 0:
            print(f"task {i} ({task.name}): scored, not trained (task_steps 0)", file=sys.stderr)
            finals.append(parent)
        else:
            result = _train_task(config, i, task, tasks, current, parent, dirs[i], fisher, recipe,
                                 replace(config.train, max_steps=steps[i]), runtime, tokenizer)
            finals.append(dirs[i] / FINAL_DIR)

        if config.strategy == "ewc":
            fisher_file = dirs[i] / FISHER_FILE
            try:
                stored = read_weights(fisher_file) if fisher_file.is_file() else None
            except OrchardError as problem:
                print(f"{problem}; computing it again", file=sys.stderr)
                stored = None
            if stored is not None:
                fisher = stored
            else:
                trained = load_checkpoint(finals[i], device).model.float()
                new = diagonal_fisher(trained, current, config.ewc_batches, device)
                fisher = new if fisher is None else {k: config.ewc_gamma * fisher[k] + new[k] for k in new}
                _save_fisher(fisher, fisher_file, config)

        scores = _read_cached(dirs[i] / SCORES_FILE)
        if scores is None or scores.get("key") != key:
            row = _evaluate_row(config, tasks, finals, base, i, device)
            write_json(dirs[i] / SCORES_FILE, {"key": key, "scores": row})
        else:
            row = scores["scores"]
        R.append(row)

    summary = continual_metrics.summary(R, baseline)
    write_json(out / "continual.json", {
        "strategy": config.strategy, "tasks": names, "sources": [t.source for t in tasks],
        "metrics": [t.metric for t in tasks], "R": R, "baseline": baseline, "summary": summary,
        "values": [[task_value(t, v) for t, v in zip(tasks, row)] for row in R],
        "baseline_values": [task_value(t, v) for t, v in zip(tasks, baseline)],
        "task_steps": steps, "checkpoints": [str(path) for path in finals]})
    title = f"continual ({config.strategy})"
    cell = lambda j, score: format_value(tasks[j], score)  # noqa: E731
    scale = "score (text: 2^-bits per byte)" if any(t.text is not None for t in tasks) else "score"
    png = continual_metrics.plot_matrix(R, names, out / "R.png", title, cell, scale)
    report = Report(title=title, directory=out)
    report.heading("Scores after each task")
    report.table(["after training", *names], continual_metrics.markdown_table(R, names, cell))
    report.table(["before training", *names], [["init"] + [cell(j, v) for j, v in enumerate(baseline)]])
    report.image(png, "R matrix")
    report.heading("Summary")
    report.table(["metric", "value"], [[k, "n/a" if v is None else v] for k, v in summary.items()])
    report.write()
    assert result is not None  # task_steps trains at least one task
    return result


def _train_task(config: ContinualConfig, i: int, task: Task, tasks: list[Task], current, parent: Path,
                run_dir: Path, fisher: dict[str, torch.Tensor] | None, recipe: dict, train: TrainConfig,
                runtime: Runtime, tokenizer) -> TrainResult:
    """Task i trained from `parent` with the strategy's changes, into `run_dir` (resumable)."""
    checkpoint = load_merged(parent)
    model = checkpoint.model.float().train()
    if config.strategy == "adapters":
        add_lora(model, _lora_config(config.peft), name=adapter_names(tasks)[i], seed=train.seed)
    trainable, total = trainable_parameter_count(model)

    replay = penalty = None
    buffer: list = []
    if config.strategy == "replay" and i > 0 and config.replay_size > 0:
        earlier = (example for t in tasks[:i] for example in t.examples())
        buffer = reservoir(earlier, config.replay_size, train.seed)
        replay = conversation_modeling(buffer, [], config, tokenizer.pad_id)
    if config.strategy == "ewc" and i > 0:
        if fisher is None:
            raise OrchardError("ewc: the previous task's Fisher is missing")
        anchor = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        penalty = EWCPenalty(model, fisher, anchor, config.ewc_lambda)
    method = ContinualLanguageModeling(current, replay, config.replay_ratio, train.seed, penalty)

    data_record = {"task": task.name, "source": task.source, "metric": task.metric,
                   "train": task.train_size(), "scored": len(task.scored) or config.eval_items,
                   "replay_buffer": len(buffer)}
    record = new_record("continual", recipe, data_record, parent=checkpoint.path,
                        peft_method=config.peft.method if config.strategy == "adapters" else "none",
                        parameters=(trainable, total))
    record["continual"] = {"strategy": config.strategy, "task": task.name, "index": i,
                           "tasks": [t.name for t in tasks]}
    print(f"task {i} ({task.name}): {config.strategy}, {train.max_steps} steps", file=sys.stderr)
    trainer = Trainer(train, model, method, tokenizer, run_dir, record,
                      flops_per_token=model.config.training_flops_per_token(config.data.max_length), runtime=runtime)
    return trainer.fit()
