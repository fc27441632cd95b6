"""Naming rewards in a recipe, and combining them with weights, failures counted.

A recipe lists rewards as strings `[WEIGHT*]SOURCE`:

* a built-in function: `exact_match`, `0.2*answer_format`, ... (`orchard.rewards.functions`);
* a Python callable `package.module:function` (importable from the working directory);
* `model:PATH`, a reward model trained with `orchard reward` (RLHF);
* `judge:PATH`, a chat model asked to grade each reply, its parsed grade the reward (RLAIF).

The reward of a sample is the weighted sum of its rewards. A sample whose any reward failed (an
exception, None, NaN or infinity; an unparseable judgement) is marked invalid: the methods give it
no advantage, so training goes on without it, and the failures are counted per reward.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import import_callable
from ..errors import OrchardError
from .functions import BUILTIN_REWARDS

RewardFunction = Callable[..., list]


@dataclass
class RewardSpec:
    name: str
    """The source as written, without the weight: used in metric names."""
    weight: float
    function: RewardFunction


def parse_reward_spec(text: str, device: str | torch.device = "cpu", key: str = "rewards") -> RewardSpec:
    """One `[WEIGHT*]SOURCE` string -> its weight and a callable (models are loaded here)."""
    weight, star, source = text.partition("*")
    if star:
        try:
            value = float(weight)
        except ValueError:
            raise OrchardError(f"{key}: {text!r}: the weight before '*' must be a number") from None
    else:
        value, source = 1.0, text
    source = source.strip()
    if not math.isfinite(value):
        raise OrchardError(f"{key}: {text!r}: the weight must be finite")
    if source.startswith("model:"):
        from .models import RewardModelScorer

        function = RewardModelScorer(source.removeprefix("model:"), device)
    elif source.startswith("judge:"):
        from .models import JudgeScorer

        function = JudgeScorer(source.removeprefix("judge:"), device)
    elif ":" in source:
        function = import_callable(source, key)
    elif source in BUILTIN_REWARDS:
        function = BUILTIN_REWARDS[source]
    else:
        raise OrchardError(f"{key}: unknown reward {source!r}; built-in ones are {', '.join(BUILTIN_REWARDS)}, "
                           f"or name module:function, model:PATH or judge:PATH")
    return RewardSpec(source, value, function)


@dataclass
class RewardResult:
    total: torch.Tensor
    """(N,) weighted sum of each sample's rewards; 0 where the sample is invalid."""
    valid: torch.Tensor
    """(N,) bool: every reward of the sample was computed."""
    by_reward: dict[str, list[float | None]] = field(default_factory=dict)
    """Each reward's values, None where it failed."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed samples per reward."""


class Rewards:
    """The weighted rewards a recipe lists, called on batches of completions."""

    def __init__(self, specs: list[str], device: str | torch.device = "cpu", key: str = "rewards"):
        if not specs:
            raise OrchardError(f"{key}: name at least one reward")
        self.specs = [parse_reward_spec(text, device, key) for text in specs]
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise OrchardError(f"{key}: a reward is listed twice ({names})")
        self._warned: set[str] = set()

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def __call__(self, prompts: list[list[dict]], completions: list[str], answers: list, **extra) -> RewardResult:
        """Every reward on the batch; ``extra`` keyword arguments (per-sample lists, e.g. the tool
        calls of each episode) go to every function, as a dataset's extra columns do in TRL."""
        n = len(completions)
        total = torch.zeros(n)
        valid = torch.ones(n, dtype=torch.bool)
        result = RewardResult(total, valid)
        for spec in self.specs:
            values = self._values(spec, prompts, completions, answers, extra)
            failed = [i for i, v in enumerate(values) if v is None]
            result.by_reward[spec.name] = values
            result.failures[spec.name] = len(failed)
            for i, value in enumerate(values):
                if value is None:
                    valid[i] = False
                else:
                    total[i] += spec.weight * value
        total[~valid] = 0.0
        return result

    def _values(self, spec: RewardSpec, prompts, completions, answers, extra: dict) -> list[float | None]:
        """The function on the whole batch; when that raises or returns the wrong number of values,
        on each sample alone, so one bad sample fails alone."""
        try:
            values = list(spec.function(prompts=prompts, completions=completions, answers=answers, **extra))
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
        except Exception as error:  # a user's reward function may raise anything
            self._warn(spec.name, error)
            values = []
            for i in range(len(completions)):
                try:
                    (value,) = spec.function(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                                             answers=answers[i:i + 1],
                                             **{key: column[i:i + 1] for key, column in extra.items()})
                except Exception as sample_error:
                    self._warn(spec.name, sample_error)
                    value = None
                values.append(value)
        return [_finite(value) for value in values]

    def _warn(self, name: str, error: Exception) -> None:
        if name not in self._warned:
            self._warned.add(name)
            print(f"reward {name} failed ({type(error).__name__}: {error}); its samples are counted as failed "
                  f"and left out of training (reported as reward_failures)", file=sys.stderr)


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
