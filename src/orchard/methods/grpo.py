"""GRPO: online RL with group-relative advantages (DeepSeekMath), and its DAPO and Dr. GRPO forms.

Run it with `orchard grpo init=CKPT [rewards=[...]] [key=value ...]`; with no data it trains on
the built-in world's questions, rewarded by exact match, and validates on held-out ones. Each
optimizer step, read top to bottom:

1. `batch_size` prompts per micro-batch, each answered `num_generations` times by the current
   policy (orchard's KV-cache sampler, `methods.rollouts`); with `environment=calculator,lookup`
   each answer is a multi-turn episode with tools, whose tool results are read, not trained on;
2. the replies scored by the weighted rewards (`orchard.rewards`: programs, a reward model, a
   judge); a reply whose reward failed is counted and gets no advantage; with `dynamic_sampling`,
   groups whose rewards are all equal are replaced by other prompts' groups (DAPO);
3. advantages relative to each prompt's group: (r - mean) / std (`scale_rewards=false` leaves out
   the std, as Dr. GRPO), or RLOO's leave-one-out baseline, or REINFORCE++'s batch std
   (`advantage_estimator`);
4. the clipped surrogate loss per token (one update per rollout, so the ratio is 1 and the clip
   guards nothing until `epsilon` matters with several micro-batches of one step), or per reply
   (GSPO, `importance_sampling_level=sequence`), plus beta times
   the k3 KL to the reference model (the parent; with LoRA the adapters switched off, costing no
   memory), aggregated per sequence (GRPO), per token (DAPO) or by a constant (Dr. GRPO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..losses.rl import (aggregate, batch_scaled_advantages, group_advantages, grpo_token_loss, gspo_token_loss, k3_kl,
                        normalised_advantages, rloo_advantages)
from ..peft.config import ReferenceModel
from ..training import TrainResult
from ..training.run_directory import in_run_directory
from .prompts import Prompt
from .rollouts import OnlineConfig, Rollouts, completion_log_probs, prepare_online_run, train_online


@dataclass
class GRPOConfig(OnlineConfig):
    out: str = "runs/grpo"
    num_generations: int = 8
    """Replies sampled per prompt (the group size G)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of the rollouts."""
    beta: float = 0.04
    """Coefficient of the k3 KL to the reference; 0 drops the reference model altogether."""
    epsilon: float = 0.2
    """Lower clip range of the ratio: 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clip range: 1 + epsilon_high (DAPO's clip-higher uses 0.28); None means epsilon."""
    loss_aggregation: Literal["sequence", "token", "dr_grpo"] = "sequence"
    """sequence: mean over each reply's tokens, then over replies (GRPO); token: mean over all
    tokens (DAPO); dr_grpo: token sum over replies x max_new_tokens (Dr. GRPO)."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (GRPO); false as Dr. GRPO recommends. With
    advantage_estimator=rloo: normalise the batch's advantages to mean 0 and std 1."""
    advantage_estimator: Literal["grpo", "rloo", "reinforce++"] = "grpo"
    """grpo: each reward against its group's mean (and std, scale_rewards); rloo: against the mean of
    the group's other rewards (RLOO, an unbiased leave-one-out baseline); reinforce++: against the
    group's mean, over the std of the whole rollout batch's rewards (REINFORCE++ with a group
    baseline: a group whose rewards barely differ is not blown up)."""
    dynamic_sampling: int = 0
    """DAPO's dynamic sampling: up to this many extra rollout rounds per micro-batch replace the
    groups whose rewards are all equal (they give no gradient) with groups of other prompts; 0
    keeps every group."""
    environment: str | None = None
    """Tools the policy may call in multi-turn episodes: built-in ones joined by commas
    (calculator, lookup: the built-in world's facts) or module:function making an environment
    (`orchard.environments`). The prompts are rendered with the tools' schemas."""
    max_turns: int = 3
    """Replies per episode with an environment (tool calls and the final answer)."""
    tool_listing: Literal["template", "brief"] = "template"
    """How the prompts offer a built-in environment's tools: template (their JSON schemas in the
    system turn, Qwen2.5's format, ~700 tokens for the built-in tools with the quickstart's
    tokenizer) or brief (one system line naming them, as the built-in tool SFT data does: for
    models of a few hundred positions)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: a ratio per token (GRPO); sequence: one ratio per reply, from the mean of its tokens' log
    ratios, clipped per reply (GSPO; its clip ranges are ~1e-4: epsilon=3e-4 epsilon_high=4e-4, and
    it needs loss_aggregation=sequence). Different from token only when a rollout serves several
    updates (num_iterations > 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 (advantages compare replies), got "
                             f"{self.num_generations}")
        if self.beta < 0:
            raise ValueError(f"beta must not be negative, got {self.beta}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError(f"epsilon must be in (0, 1) and epsilon_high positive, got {self.epsilon}, "
                             f"{self.epsilon_high}")
        if self.dynamic_sampling < 0 or self.max_turns < 1:
            raise ValueError(f"dynamic_sampling must not be negative and max_turns must be positive, got "
                             f"{self.dynamic_sampling}, {self.max_turns}")
        if self.importance_sampling_level == "sequence" and self.loss_aggregation != "sequence":
            raise ValueError("importance_sampling_level=sequence (GSPO) weighs each reply once: it needs "
                             f"loss_aggregation=sequence, got {self.loss_aggregation}")


class GRPO:
    """The engine's view of GRPO: each micro-batch a fresh rollout, the clipped group-relative loss."""

    name = "grpo"
    trainable_modules = None

    def __init__(self, config: GRPOConfig, rollouts: Rollouts, val: list[Prompt], reference: ReferenceModel | None):
        self.config, self.rollouts, self.val, self.reference = config, rollouts, val, reference

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        return self.rollouts.reused(step, micro, rank, world, self.prepare)

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Advantages, and the log-probabilities the loss compares with: the reference's (for the KL)
        and, when a rollout serves several steps, the sampling policy's (for the ratio)."""
        batch["advantages"] = advantages(batch["rewards"], batch["reward_valid"], self.config)
        device = self.rollouts.policy.lm_head.weight.device
        on_device = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), self.rollouts.runtime.autocast():
            if self.reference is not None:
                with self.reference.model() as reference:
                    batch["ref_logps"] = completion_log_probs(reference, on_device, self.config.temperature).cpu()
            if self.config.num_iterations > 1:
                batch["old_logps"] = completion_log_probs(self.rollouts.policy, on_device, self.config.temperature).cpu()
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(aggregate(torch.zeros(batch["completion_mask"].shape), batch["completion_mask"],
                             self.config.loss_aggregation, self.config.max_new_tokens)[1])

    def loss(self, model, batch):
        c = self.config
        mask = batch["completion_mask"]
        logps = completion_log_probs(model, batch, self.config.temperature)
        epsilon_high = c.epsilon_high if c.epsilon_high is not None else c.epsilon
        if c.importance_sampling_level == "sequence":
            per_token = gspo_token_loss(logps, batch.get("old_logps"), batch["advantages"], mask,
                                        batch.get("ref_logps"), c.beta, c.epsilon, epsilon_high)
        else:
            per_token = grpo_token_loss(logps, batch.get("old_logps"), batch["advantages"], batch.get("ref_logps"),
                                        c.beta, c.epsilon, epsilon_high)
        total, _ = aggregate(per_token, mask, c.loss_aggregation, c.max_new_tokens)
        metrics = self.metrics(batch, logps)
        if "old_logps" in batch:
            log_ratio = logps.detach() - batch["old_logps"]
            if c.importance_sampling_level == "sequence":  # one ratio per reply
                log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
                mask = torch.ones_like(log_ratio, dtype=torch.bool)
            ratio = torch.exp(log_ratio)
            clipped = ((ratio < 1 - c.epsilon) | (ratio > 1 + epsilon_high)) & mask
            metrics["clip_ratio"] = clipped.sum().item() / max(mask.sum().item(), 1)
        return total, metrics

    def metrics(self, batch, logps) -> dict[str, float]:
        mask = batch["completion_mask"]
        valid = batch["reward_valid"]
        rewards = batch["rewards"][valid]
        groups = batch["rewards"].view(-1, self.config.num_generations)
        metrics = {"reward": rewards.mean().item() if len(rewards) else math.nan,
                   "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                   "reward_failures": float((~valid).sum()),
                   "frac_reward_zero_std": (groups.std(1) == 0).float().mean().item(),
                   "completion_length": mask.sum(1).float().mean().item()}
        for name in ("tool_failed", "tool_calls", "resample_rounds"):
            if name in batch:
                metrics[name] = batch[name].float().mean().item()
        for name, column in zip(self.rollouts.rewards.names, batch["rewards_by_function"].T):
            found = column[~torch.isnan(column)]
            metrics[f"rewards/{name}"] = found.mean().item() if len(found) else math.nan
        if "ref_logps" in batch:
            kl = k3_kl(logps.detach(), batch["ref_logps"])
            metrics["kl"] = (kl * mask).sum().item() / max(mask.sum().item(), 1)
        return metrics

    def evaluate(self, model, shard) -> dict[str, float]:
        return self.rollouts.evaluation(self.val, self.config.data)


def advantages(rewards: torch.Tensor, valid: torch.Tensor, config: GRPOConfig) -> torch.Tensor:
    """The rollout batch's advantages by `config.advantage_estimator` (see GRPOConfig)."""
    G = config.num_generations
    if config.advantage_estimator == "rloo":
        found = rloo_advantages(rewards, G, valid)
        return normalised_advantages(found, valid) if config.scale_rewards else found
    if config.advantage_estimator == "reinforce++":
        return batch_scaled_advantages(rewards, G, valid)
    return group_advantages(rewards, G, valid, scale=config.scale_rewards)


@in_run_directory("grpo")
def run(config: GRPOConfig) -> TrainResult:
    online = prepare_online_run(config, "grpo", config.num_generations, keep_reference=config.beta != 0,
                                environment=config.environment, max_turns=config.max_turns,
                                tool_listing=config.tool_listing,
                                dynamic_sampling=config.dynamic_sampling)
    return train_online(config, online, GRPO(config, online.rollouts, online.val, online.reference))
