"""Rewards for online RL: programs, reward models (RLHF) and judge models (RLAIF), combined with weights.

Every reward is a callable `fn(prompts, completions, answers) -> list[float | None]` over a batch:
`prompts` are message lists, `completions` the sampled replies, `answers` the reference answers
(None where the data has none). `None`, NaN, infinity or an exception mark a sample's reward as
failed; `Rewards` counts and reports failures and never lets one reach the loss.
"""

from .combine import RewardResult, Rewards, parse_reward_spec
from .functions import BUILTIN_REWARDS

__all__ = ["BUILTIN_REWARDS", "RewardResult", "Rewards", "parse_reward_spec"]
