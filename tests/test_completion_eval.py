"""Completion items and their scoring, used by the quickstart's and the benchmarks' exact match."""

from __future__ import annotations

from orchard.data.synthetic import World
from orchard.evaluation.completion import fact_completion_items, is_correct


def test_fact_items_cut_the_sentence_before_the_answer_and_split_like_the_world():
    world = World()
    everything = fact_completion_items(world, "en")
    held_out = fact_completion_items(world, "en", split="held_out")
    train = fact_completion_items(world, "en", split="train")
    assert sorted(held_out + train) == sorted(everything)
    kept, held = world.split_facts()
    assert len(held_out) == len(held) and len(train) == len(kept)
    sentences = {fact.sentence("en") for fact in held}
    assert all(f"{prompt} {answer}" in " ".join(sentences) for prompt, answer in held_out)
    assert fact_completion_items(world, "zh", limit=5, split="held_out") == \
        fact_completion_items(world, "zh", split="held_out")[:5]


def test_a_completion_is_correct_only_with_the_whole_answer():
    assert is_correct(" 82 is the answer", "82")
    assert not is_correct(" 820", "82")
    assert not is_correct(" 8", "82")
