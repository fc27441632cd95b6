"""The prompts of online RL (`orchard grpo`, `orchard ppo`): files of prompt-only records with
optional reference answers, GSM8K, or the built-in world's questions, split into training and
held-out prompts and rendered once with the chat template (and the environment's tools)."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.preferences import PromptItem, checked_split, read_limited, read_prompts, read_split
from ..data.synthetic import World, verifiable_prompts


@dataclass
class PromptDataConfig:
    path: str | list[str] | None = None
    """Prompt files (.jsonl/.jsonl.gz/.json/.parquet): {"prompt": str or messages, "answer": ...},
    {"messages": [...]} or GSM8K's {"question", "answer": "... #### N"}, each optionally with
    "rivals" (other possible answers, which exact_match rejects beside the answer). None means the
    built-in world's fact questions and word problems, with their answers and rivals."""
    val_path: str | list[str] | None = None
    """Held-out prompts; None holds out data.val_fraction of data.path (the built-in world's
    held-out split when data.path is None)."""
    val_fraction: float = 0.1
    """Fraction of the prompts held out when data.val_path is not given (at least one)."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are skipped (counted)."""
    max_prompts: int | None = None
    """Use at most this many training prompts (from the start)."""
    eval_prompts: int = 200
    """Held-out prompts answered (greedily) at each evaluation."""
    eval_samples: int = 8
    """Replies sampled per held-out prompt at each evaluation, at the training temperature: each
    reward's mean over them (mean@k) and its best per prompt, averaged (pass@k, for a 0/1 reward),
    where RL acts (it sharpens the sampling distribution); 0 evaluates greedy replies only."""
    eval_trained_prompts: int = 0
    """Training prompts (the first this many) evaluated beside the held-out ones, the same way, as
    trained_* metrics (trained_reward/..., trained_mean@8/...): what RL does to the questions it
    trains on, beside what carries over to new ones."""
    on_error: str = "error"
    """A malformed record: error (stop, naming it) or skip (counted)."""

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.on_error not in ("error", "skip"):
            raise ValueError(f"data.on_error must be error or skip, got {self.on_error!r}")
        if self.eval_samples < 0:
            raise ValueError(f"data.eval_samples must not be negative, got {self.eval_samples}")
        if self.eval_trained_prompts < 0:
            raise ValueError(f"data.eval_trained_prompts must not be negative, got {self.eval_trained_prompts}")


@dataclass
class Prompt:
    messages: list[dict]
    answer: str | None
    ids: list[int]
    rivals: tuple[str, ...] | None = None


def load_prompts(config: PromptDataConfig, tokenizer, seed: int,
                 environment=None) -> tuple[list[Prompt], list[Prompt], dict]:
    """(training prompts, held-out prompts, a description for the lineage record); with an
    `environment` (`orchard.environments`), rendered as its episodes start: what its `reset`
    makes of the messages, with its tools."""
    if config.path is None:
        world = World()
        train = [PromptItem(r["prompt"], r["answer"], f"built-in train {i}", tuple(r["rivals"]))
                 for i, r in enumerate(verifiable_prompts(world, "train", num_items=config.max_prompts))]
        val = ([PromptItem(r["prompt"], r["answer"], f"built-in held_out {i}", tuple(r["rivals"]))
                for i, r in enumerate(verifiable_prompts(world, "held_out"))] if config.val_path is None
               else read_limited(read_prompts, config.val_path, config.on_error, "data.val_path", None))
        source = "built-in world questions"
    else:
        train, val = read_split(read_prompts, config.path, config.val_path, config.on_error, config.max_prompts,
                                config.val_fraction, seed)
        source = str(config.path)

    def render(items: list[PromptItem]) -> tuple[list[Prompt], int]:
        prompts, too_long = [], 0
        for item in items:
            messages, tools = (item.prompt, None) if environment is None else \
                (environment.reset(item.prompt), environment.schemas)
            ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools))
            if len(ids) > config.max_prompt_length:
                too_long += 1
            else:
                prompts.append(Prompt(item.prompt, item.answer, ids, item.rivals))
        return prompts, too_long

    (train_prompts, long_train), (val_prompts, long_val) = render(train), render(val[:config.eval_prompts])
    record = checked_split(train_prompts, val_prompts, long_train + long_val, "prompt", "data.max_prompt_length",
                           config.max_prompt_length, source)
    return train_prompts, val_prompts, record
