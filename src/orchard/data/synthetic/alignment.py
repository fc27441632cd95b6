"""Preference pairs and verifiable prompts about the built-in world, for alignment."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

from .documents import write_jsonl
from .instructions import answer_matches, exact_match_items, instruction_items, prompt_text, rival_answers
from .world import LANGUAGES, Entity, Fact, World

# --- preference pairs and verifiable prompts -------------------------------------------------------
#
# For alignment: the instruction questions again (same splits), each with its correct answer chosen
# over a wrong or an unhelpful one, in TRL's conversational preference form; and as prompts with an
# answer a reply can be checked against, for methods that sample their own replies.

_UNHELPFUL = {
    "en": ("I don't know.", "I'm not sure, sorry.", "Sorry, I can't help with that.", "I have no idea."),
    "zh": ("我不知道。", "我不太确定，抱歉。", "抱歉，我回答不了这个问题。", "我也不清楚。"),
}
_WRONG_RATE = 0.5
# Wrong numbers (results, ages) are near the right one: plausible, as a careless answer would be.
_NEAR_MISSES = (-3, -2, -1, 1, 2, 3)


def _with_value(fact: Fact, value: Entity | str) -> Fact:
    """``fact`` with another value, an entity of the same kind or a number, to render wrong sentences."""
    if isinstance(value, Entity):
        return replace(fact, value_en=value.name_en, value_zh=value.name_zh, value_entity=value)
    return replace(fact, value_en=value, value_zh=value, value_entity=None)


def _wrong_answers(world: World, fact: Fact | None, lang: str, chosen: str) -> list[str]:
    """Answers of the same form as ``chosen`` with a wrong value: the fact's sentence with another
    entity of the value's kind (never the subject itself) or a near age, or a near number for a
    word problem (``fact`` None)."""
    if fact is None:
        return [str(int(chosen) + d) for d in _NEAR_MISSES if int(chosen) + d >= 0]
    if fact.value_entity is None:
        return [_with_value(fact, str(int(fact.value_en) + d)).sentence(lang) for d in _NEAR_MISSES]
    return [_with_value(fact, other).sentence(lang) for other in world.by_kind(fact.value_entity.kind)
            if other not in (fact.value_entity, fact.subject)]


def _rejection(candidates, chosen: str, expected: str, rng: random.Random) -> str | None:
    """A random one of ``candidates`` that differs from ``chosen`` and `answer_matches` would not
    accept, or None if there is none."""
    usable = [c for c in candidates if c != chosen and not answer_matches(c, expected)]
    return rng.choice(usable) if usable else None


def preference_pairs(world: World, split: str = "train", seed: int = 0,
                     languages: tuple[str, ...] | list[str] = LANGUAGES, num_pairs: int | None = None,
                     held_out_fraction: float = 0.2) -> list[dict]:
    """Deterministic preference pairs in TRL's conversational form, ``{"prompt": [messages],
    "chosen": [assistant message], "rejected": [assistant message], "kind": "wrong"|"unhelpful"}``.

    The prompts and chosen answers are those of `instruction_conversations` with the same arguments
    (so the splits match `exact_match_items`): the fact's sentence or the word problem's number. The
    rejected answer is, for about half, "wrong": the same form with a wrong value (the sentence with
    another city, food, person... of the right kind, or a near age; a number off by 1 to 3), never
    one `answer_matches` accepts; for the rest "unhelpful": "I don't know." or the like in the
    conversation's language.
    """
    items = instruction_items(world, split, seed, languages, num_pairs, held_out_fraction)
    facts = {fact.sentence(lang): fact for fact in world.facts for lang in LANGUAGES}
    rng = random.Random(f"preferences:{seed}:{split}")
    pairs = []
    for messages, expected in items:
        chosen = messages[-1]["content"]
        # English questions are plain ASCII, names included; Chinese ones never are.
        lang = "en" if messages[-2]["content"].isascii() else "zh"
        kind, rejected = "wrong", None
        if rng.random() < _WRONG_RATE:
            rejected = _rejection(_wrong_answers(world, facts.get(chosen), lang, chosen), chosen, expected, rng)
        if rejected is None:
            kind, rejected = "unhelpful", _rejection(_UNHELPFUL[lang], chosen, expected, rng)
        pairs.append({"prompt": messages[:-1], "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}], "kind": kind})
    return pairs


def write_preference_corpus(path: str | os.PathLike, world: World | None = None, split: str = "train",
                            seed: int = 0, **kwargs) -> Path:
    """Write `preference_pairs` as JSONL lines, atomically; ``kwargs`` go to `preference_pairs`;
    ``world`` defaults to ``World()``. `orchard.data.preferences.read_preference_pairs` reads it."""
    records = preference_pairs(world if world is not None else World(), split=split, seed=seed,
                               **kwargs)  # bad arguments fail before anything is written
    return write_jsonl(path, records)


def verifiable_prompts(world: World, split: str = "train", seed: int = 0,
                       languages: tuple[str, ...] | list[str] = LANGUAGES, num_items: int | None = None,
                       held_out_fraction: float = 0.2) -> list[dict]:
    """`exact_match_items` as ``{"prompt": [messages up to the last user turn], "answer": expected,
    "rivals": [the question's other possible answers]}`` records (`orchard.data.preferences.read_prompts`
    reads them), for methods that sample replies and reward the ones `answer_matches` accepts: with
    the rivals, so a reply that lists candidates is not rewarded."""
    return [{"prompt": prompt, "answer": expected, "rivals": list(rival_answers(world, prompt_text(prompt), expected))}
            for prompt, expected in exact_match_items(world, split, seed, languages, num_items, held_out_fraction)]
