"""What every evaluation task shares: the options of a run, the checkpoint under evaluation (a
`Subject`: model, tokenizer, lineage record, whether it answers in its chat template, the runtime
it runs in) and a task's result."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..data.synthetic import World
from ..lineage import ancestry
from ..serve.engine import Sampling
from .scoring import generate_replies

CHAT_STAGES = ("sft", "dpo", "grpo", "ppo", "continual", "kto")
"""Stages (and their `-lora`, `-dora` ... variants) after which a model answers in its chat template."""
LOWER_IS_BETTER = ("bits_per_byte", "perplexity", "loss")


@dataclass
class EvalOptions:
    limit: int | None = None
    """Items per task (windows for bpb); None: all."""
    batch_size: int = 16
    shots: int = 5
    """Worked examples before each GSM8K question for base models."""
    samples: int = 1
    """Sampled answers per GSM8K question besides the greedy one (maj@k, pass@k, mean@k when > 1)."""
    temperature: float = 0.7
    max_new_tokens: int = 256
    seq_len: int = 256
    """Window of bpb."""
    seed: int = 0
    judge: str | None = None
    reference: str | None = None
    """The reference checkpoint of judge (the replies compared against) and pairs (the implicit reward's)."""
    judge_mode: str = "pairwise"
    """judge: "pairwise" (both replies shown, in both orders) or "grade" (each graded 0-10 alone)."""
    chat: bool | None = None
    """Whether the checkpoints answer in their chat template; None: from their lineage (`is_chat_model`)."""


@dataclass
class Subject:
    """A checkpoint under evaluation, with how it runs."""
    path: Path
    model: torch.nn.Module
    tokenizer: object
    record: dict
    chat: bool
    runtime: object
    """`orchard.training.runtime.Runtime`: device, precision, autocast."""

    @classmethod
    def load(cls, path, runtime, chat: bool | None = None) -> Subject:
        checkpoint = load_checkpoint(path, device=runtime.device, dtype=runtime.inference_dtype)
        return cls(checkpoint.path, checkpoint.model.eval(), checkpoint.tokenizer, checkpoint.record,
                   is_chat_model(checkpoint.path) if chat is None else chat, runtime)

    def autocast(self):
        return self.runtime.autocast()

    def end_ids(self) -> list[int]:
        return [self.tokenizer.eos_id, *[i for i in (self.tokenizer.token_to_id("<|im_end|>"),) if i is not None]]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def replies(self, prompts: list[list[int]], samplings: list[Sampling], options: EvalOptions, what: str) -> list[str]:
        """Replies through the serving engine, with a progress bar; prompts that leave too little room
        for their reply lose their beginning (as lm-eval cuts them), and the run says how many."""
        positions = self.model.config.max_position_embeddings
        cut = sum(len(p) > positions - s.max_tokens for p, s in zip(prompts, samplings))
        if cut:
            print(f"{what}: {cut} of {len(prompts)} prompts do not fit in the {positions} positions of {self.path} "
                  f"beside a reply of {max(s.max_tokens for s in samplings)} tokens: they lose their beginning",
                  file=sys.stderr)
        with progress_bar(len(prompts), what, "reply") as bar:
            return generate_replies(self.model, self.tokenizer, prompts, samplings, self.end_ids(),
                                    max(options.batch_size, 2), self.runtime.autocast, bar.update)


def progress_bar(total: int, what: str, unit: str) -> tqdm:
    """A progress bar on the terminal (none when stderr is not one: logs, CI)."""
    return tqdm(total=total, desc=what, unit=unit, file=sys.stderr, disable=None, leave=False)


def is_chat_model(path) -> bool:
    """Whether a checkpoint went through a chat stage (SFT, preference or RL training) in its lineage."""
    return any(str(entry.get("stage", "")).split("-")[0] in CHAT_STAGES for entry in ancestry(path))


@dataclass
class TaskResult:
    metrics: dict[str, float]
    headline: str
    """The metric a comparison's chart shows."""
    count: int
    seconds: float = 0.0
    examples: list[dict] = field(default_factory=list)
    """A few items with the model's answers, for the report."""


_WORLD: list[World] = []


def builtin_world() -> World:
    """The built-in world, built once (its facts take a moment) and shared by every checkpoint."""
    if not _WORLD:
        _WORLD.append(World())
    return _WORLD[0]


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def mean(values) -> float:
    values = list(values)
    return sum(map(float, values)) / len(values) if values else float("nan")


