"""Continual-learning tasks of the built-in world, trained one after another to measure forgetting."""

from __future__ import annotations

import random

from .instructions import SPLITS, word_problem
from .world import LANGUAGES, Fact, World

# --- continual-learning tasks --------------------------------------------------------------------
#
# Three tasks trained one after another, to measure forgetting: word problems, then English fact
# questions, then the same facts asked in Chinese (a new language as the last task). Each is a plain
# one-turn exchange with no system prompt, so the tasks differ in content and language only, and
# the same items serve as training conversations and as exact-match evaluation.

CONTINUAL_TASKS = ("arithmetic", "facts-en", "facts-zh")
# Default word-problem counts: about as many as the fact tasks of a default world have (336 train,
# 84 held-out facts), so no task dominates by size; the operand space holds ~11,900 train and
# ~3,000 held-out problems, so sums and differences rarely repeat (times tables do, there are 121).
_CONTINUAL_ARITHMETIC_ITEMS = {"train": 400, "held_out": 100}


def continual_task(world: World, name: str, split: str = "train", seed: int = 0,
                   num_items: int | None = None,
                   held_out_fraction: float = 0.2) -> list[tuple[list[dict], str]]:
    """One task of the continual stream as ``(messages ending with the assistant's answer, expected
    answer)``; drop the last message to prompt a model and judge its reply with `answer_matches`.

    * "arithmetic": the word problems of the instruction data, in both languages (chosen at
      random per item), answered by the bare number; ``split`` picks problems by the same operand
      hash (`_arithmetic_split`), so no problem is in both splits. Default 400 train / 100 held_out.
    * "facts-en" / "facts-zh": one question about a fact (``fact.question(lang)``) answered by its
      sentence, in English or in Chinese; "train" asks about the facts `World.split_facts` keeps and
      "held_out" about the held-out ones, exactly as the instruction data does, so no held-out item
      asks about a fact a training item states. Facts are dealt from a shuffled deck refilled when
      empty; the default count is one deck, every fact of the split asked once.

    Deterministic in (world, name, split, seed, held_out_fraction); the first ``k`` items of a longer
    list are the ``k``-item list.
    """
    if name not in CONTINUAL_TASKS:
        raise ValueError(f"unknown continual task {name!r}; expected one of {', '.join(CONTINUAL_TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if num_items is not None and num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    rng = random.Random(f"continual:{name}:{seed}:{split}")
    items = []
    if name == "arithmetic":
        count = _CONTINUAL_ARITHMETIC_ITEMS[split] if num_items is None else num_items
        for _ in range(count):
            lang = rng.choice(LANGUAGES)
            question, expected = word_problem(world, rng, lang, split)
            items.append(([{"role": "user", "content": question},
                           {"role": "assistant", "content": expected}], expected))
        return items

    lang = "en" if name == "facts-en" else "zh"
    kept, held = world.split_facts(held_out_fraction)
    facts = kept if split == "train" else held
    if not facts:
        raise ValueError(f"the {split} split has no facts (held_out_fraction={held_out_fraction})")
    count = len(facts) if num_items is None else num_items
    deck: list[Fact] = []
    for _ in range(count):
        if not deck:
            deck = list(facts)
            rng.shuffle(deck)
        fact = deck.pop()
        items.append(([{"role": "user", "content": fact.question(lang)},
                       {"role": "assistant", "content": fact.sentence(lang)}], fact.answer(lang)))
    return items


def continual_task_conversations(world: World, name: str, split: str = "train", seed: int = 0,
                                 num_items: int | None = None,
                                 held_out_fraction: float = 0.2) -> list[dict]:
    """`continual_task` as ``[{"messages": [...]}, ...]`` training records, the form
    `instruction_conversations` returns and `write_jsonl` writes."""
    return [{"messages": messages}
            for messages, _ in continual_task(world, name, split, seed, num_items, held_out_fraction)]
