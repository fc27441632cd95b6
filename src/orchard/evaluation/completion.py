"""Completion accuracy: does greedy decoding continue a prompt with the expected answer?

The common currency of orchard's task metrics: fact recall and arithmetic after pretraining,
exact-match answers after fine-tuning. An answer counts when the greedy continuation, with
leading spaces removed, starts with it and does not go on with a digit (so 82 is not 820).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data.synthetic import World, arithmetic_problem
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
                        batch_size: int = 32) -> CompletionResult:
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    examples = []
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        outputs = generate_text(model, tokenizer, [prompt for prompt, _ in chunk], greedy)
        for (prompt, answer), output in zip(chunk, outputs):
            examples.append((prompt, answer, output, is_correct(output, answer)))
    accuracy = sum(e[3] for e in examples) / max(len(examples), 1)
    return CompletionResult(accuracy=accuracy, examples=examples)


def fact_completion_items(world: World, lang: str, limit: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, answer) pairs that cut a fact's sentence just before its answer,
    e.g. ("Tom Snow lives in", "Greenfield")."""
    items = []
    for fact in world.facts:
        sentence, answer = fact.sentence(lang), fact.answer(lang)
        cut = sentence.find(answer)
        if cut > 0:
            items.append((sentence[:cut].rstrip(" ") if lang == "en" else sentence[:cut], answer))
    random.Random(seed).shuffle(items)
    return items[:limit]


def arithmetic_items(lang: str, limit: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [arithmetic_problem(rng, lang) for _ in range(limit)]
