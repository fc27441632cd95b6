"""Reward functions that ship with orchard: answer checkers, format checks, a length penalty.

Each has the reward signature `fn(prompts, completions, answers, **kwargs) -> list[float | None]`
(see `orchard.rewards`), so they combine with user functions named `module:function`.
"""

from __future__ import annotations

import re

from ..data.synthetic import answer_matches, prompt_text

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact_match(prompts, completions, answers, rivals=None, **kwargs) -> list[float | None]:
    """1 when the reply's first line contains the reference answer as a whole word and, where the
    prompt lists ``rivals`` (its other possible answers), names none of them beside it (the built-in
    world's check, `answer_matches`), else 0; no reference answer is a failure."""
    rivals = rivals or [None] * len(completions)
    return [None if answer is None else float(answer_matches(reply, str(answer), others, prompt_text(prompt)))
            for prompt, reply, answer, others in zip(prompts, completions, answers, rivals)]


def final_number(text: str) -> str | None:
    """The number a reply ends on: the one after `####` if it writes one (GSM8K's form), else its
    last number; commas and a trailing `.0` removed."""
    marked = "####" in text
    numbers = _NUMBER.findall(text.rsplit("####", 1)[1] if marked else text)
    if not numbers:
        return None
    number = (numbers[0] if marked else numbers[-1]).replace(",", "")  # "#### 42 (in 3 steps)" is 42
    return number[:-2] if number.endswith(".0") else number


def numeric_match(prompts, completions, answers, **kwargs) -> list[float | None]:
    """1 when the reply's final number (`final_number`) equals the reference answer, else 0: the
    usual check for math word problems (GSM8K)."""
    rewards = []
    for reply, answer in zip(completions, answers):
        if answer is None:
            rewards.append(None)
            continue
        found = final_number(reply)
        rewards.append(float(found is not None and found == final_number(str(answer))))
    return rewards


def answer_format(prompts, completions, answers, **kwargs) -> list[float | None]:
    """1 when the reply ends its reasoning with `#### <number>` (GSM8K's answer format), else 0."""
    return [float(re.search(r"####\s*-?\d[\d,]*(?:\.\d+)?\s*$", reply.strip()) is not None)
            for reply in completions]


def single_line(prompts, completions, answers, **kwargs) -> list[float | None]:
    """1 when the reply is one non-empty line (short-answer questions), else 0."""
    return [float(len([line for line in reply.strip().splitlines() if line.strip()]) == 1) for reply in completions]


def length_penalty(prompts, completions, answers, **kwargs) -> list[float | None]:
    """Minus the reply's length in words over 100 (0 for an empty reply, -1 for 100 words): weight
    it to trade correctness for brevity."""
    return [-len(reply.split()) / 100 for reply in completions]


def tool_use(prompts, completions, answers, tool_calls=None, **kwargs) -> list[float | None]:
    """1 when the episode called a tool (with an environment: `orchard grpo environment=...`; its
    calls all succeeded, since a failed call zeroes every reward of the episode), else 0: a shaping
    term that teaches a model to reach for its tools. Without an environment it fails (None)."""
    if tool_calls is None:
        return [None] * len(completions)
    return [float(calls > 0) for calls in tool_calls]


BUILTIN_REWARDS = {fn.__name__: fn for fn in (exact_match, numeric_match, answer_format, single_line,
                                               length_penalty, tool_use)}
"""Rewards a recipe can name without a module."""
