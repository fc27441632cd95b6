"""Completion accuracy: does greedy decoding continue a prompt with the expected answer?

The common currency of orchard's task metrics: fact recall and arithmetic after pretraining,
exact-match answers after fine-tuning. An answer counts when the greedy continuation, with
leading spaces removed, starts with it and does not go on with a digit (so 82 is not 820).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from ..data.synthetic import World, answer_matches, arithmetic_problem
from ..model.generation import SamplingConfig, generate_text


@dataclass
class CompletionResult:
    accuracy: float
    examples: list[tuple[str, str, str, bool]]
    """(prompt, expected answer, continuation, correct) for every item."""


def is_correct(output: str, answer: str) -> bool:
    text = output.lstrip()
    return text.startswith(answer) and not text[len(answer):len(answer) + 1].isdigit()


def completion_accuracy(model, tokenizer, items: list[tuple[str, str]], max_new_tokens: int = 12,
                        batch_size: int = 32, matches: Callable[[str, str], bool] = is_correct,
                        end_token_ids: Sequence[int] = (), add_bos: bool | None = None) -> CompletionResult:
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    examples = []
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        outputs = generate_text(model, tokenizer, [prompt for prompt, _ in chunk], greedy,
                                end_token_ids=end_token_ids, add_bos=add_bos)
        for (prompt, answer), output in zip(chunk, outputs):
            examples.append((prompt, answer, output, matches(output, answer)))
    accuracy = sum(e[3] for e in examples) / max(len(examples), 1)
    return CompletionResult(accuracy=accuracy, examples=examples)


def chat_exact_match(model, tokenizer, items: list[tuple[list[dict], str]], max_new_tokens: int = 40,
                     batch_size: int = 32) -> CompletionResult:
    """Held-out questions answered in the chat format: the greedy reply to each conversation is
    correct when `answer_matches` finds the expected answer in its first line."""
    prompts = [(tokenizer.apply_chat_template(messages, add_generation_prompt=True), answer)
               for messages, answer in items]
    turn_end = [i for i in (tokenizer.token_to_id("<|im_end|>"),) if i is not None]
    return completion_accuracy(model, tokenizer, prompts, max_new_tokens, batch_size, matches=answer_matches,
                               end_token_ids=turn_end, add_bos=False)


def fact_completion_items(world: World, lang: str, limit: int | None = None, seed: int = 0,
                          split: str | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs that cut a fact's sentence just before its answer,
    e.g. ("Tom Snow lives in", "Greenfield"); `split` "train" or "held_out" keeps the facts of that
    side of `World.split_facts` (None: all)."""
    facts = world.facts if split is None else dict(zip(("train", "held_out"), world.split_facts()))[split]
    items = []
    for fact in facts:
        sentence, answer = fact.sentence(lang), fact.answer(lang)
        cut = sentence.find(answer)
        if cut > 0:
            items.append((sentence[:cut].rstrip(" ") if lang == "en" else sentence[:cut], answer))
    random.Random(seed).shuffle(items)
    return items[:limit]


def arithmetic_items(lang: str, limit: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [arithmetic_problem(rng, lang) for _ in range(limit)]


def world_completion_tasks(world: World, split: str = "held_out", sums: int = 100) -> dict[str, list[tuple[str, str]]]:
    """What a base model's exact match on the world is measured on: completions of `split`'s facts
    ("train" or "held_out") in English and in Chinese, and `sums` arithmetic problems, half in each
    language."""
    return {"facts, en": fact_completion_items(world, "en", split=split),
            "facts, zh": fact_completion_items(world, "zh", split=split),
            "sums": arithmetic_items("en", sums // 2) + arithmetic_items("zh", sums - sums // 2)}
