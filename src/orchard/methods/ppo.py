"""PPO for language models (InstructGPT's RLHF recipe): a policy with a value head, GAE, clipped
policy and value losses, and a per-token KL penalty to the reference.

Run it with `orchard ppo init=CKPT rewards=[model:REWARD_MODEL] [key=value ...]`; any reward of
`orchard.rewards` works (with no data it trains on the built-in world's questions, rewarded by
exact match). Each optimizer step, read top to bottom:

1. `batch_size` prompts per micro-batch, one reply each, sampled by the current policy;
2. the reply's score from the rewards; the policy's log-probabilities and value estimates, and the
   reference's log-probabilities, at every reply token;
3. per-token rewards: -kl_coef * (log pi - log pi_ref) at every token, the score added at the last
   (optionally scaled by the batch's std first: reward whitening);
4. GAE advantages (whitened over the batch) and returns;
5. the clipped surrogate on the policy and the clipped squared error on the value head (weighted
   by vf_coef), averaged over reply tokens. With num_iterations > 1 a rollout serves several
   steps and both clips bound how far each moves from the rollout.

The value head is a `score` head on the policy's last hidden state (shared trunk, as TRL's
AutoModelForCausalLMWithValueHead); it is saved with the policy (with LoRA, beside the adapters).
A reply whose reward failed is left out of the loss and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..losses.rl import aggregate, clipped_surrogate, clipped_value_loss, gae, token_rewards_with_kl, whiten
from ..peft.config import ReferenceModel
from ..training import TrainConfig, TrainResult
from ..training.run_directory import in_run_directory
from .prompts import Prompt
from .rollouts import OnlineConfig, Rollouts, completion_log_probs, prepare_online_run, train_online


@dataclass
class PPOConfig(OnlineConfig):
    out: str = "runs/ppo"
    kl_coef: float = 0.05
    """Per-token KL penalty to the reference, subtracted from the reward."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """GAE's lambda."""
    cliprange: float = 0.2
    """Clip range of the policy ratio."""
    cliprange_value: float = 0.2
    """How far the value head may move from its rollout-time estimate."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Scale the per-token rewards by their batch std before GAE (as TRL's whiten_rewards)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=1e-5, warmup_steps=5,
                                                                   weight_decay=0.0, batch_size=16, eval_every=25,
                                                                   save_every=25, log_every=1))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError(f"kl_coef and vf_coef must not be negative, got {self.kl_coef}, {self.vf_coef}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")


class PPO:
    """The engine's view of PPO: each micro-batch a fresh rollout with values and advantages."""

    name = "ppo"
    trainable_modules = None

    def __init__(self, config: PPOConfig, rollouts: Rollouts, val: list[Prompt], reference: ReferenceModel):
        self.config, self.rollouts, self.val, self.reference = config, rollouts, val, reference

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        return self.rollouts.reused(step, micro, rank, world, self.prepare)

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.config
        policy = self.rollouts.policy
        device = policy.lm_head.weight.device
        on_device = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), self.rollouts.runtime.autocast():
            was_training = policy.training
            policy.eval()
            old_logps, old_values = completion_log_probs(policy, on_device, c.temperature, with_values=True)
            policy.train(was_training)
            with self.reference.model() as reference:
                ref_logps = completion_log_probs(reference, on_device, self.config.temperature)
        mask = batch["completion_mask"] & batch["reward_valid"][:, None]
        old_logps, old_values, ref_logps = old_logps.float().cpu(), old_values.float().cpu(), ref_logps.float().cpu()
        rewards = token_rewards_with_kl(batch["rewards"], old_logps, ref_logps, mask, c.kl_coef)
        # Whitened over this micro-batch of every process together: the statistics of the batch
        # one process would see, whatever the number of processes.
        total = self.rollouts.runtime.distributed.sum_tensor
        enough = total(mask.sum().float()) > 1
        if c.whiten_rewards and enough:
            rewards = whiten(rewards, mask, shift_mean=False, total=total)
        advantages, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
        if enough:
            advantages = whiten(advantages, mask, total=total)
        batch.update(loss_mask=mask, old_logps=old_logps, old_values=old_values, ref_logps=ref_logps,
                     advantages=advantages, returns=returns)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["loss_mask"].sum())

    def loss(self, model, batch):
        c = self.config
        mask = batch["loss_mask"]
        logps, values = completion_log_probs(model, batch, c.temperature, with_values=True)
        policy_loss, _ = aggregate(clipped_surrogate(logps, batch["old_logps"], batch["advantages"],
                                                     c.cliprange, c.cliprange), mask, "token")
        value_loss, _ = aggregate(clipped_value_loss(values, batch["old_values"], batch["returns"],
                                                     c.cliprange_value), mask, "token")
        tokens = max(mask.sum().item(), 1)
        valid = batch["reward_valid"]
        ratio = torch.exp(logps.detach() - batch["old_logps"])
        metrics = {"reward": batch["rewards"][valid].mean().item() if valid.any() else math.nan,
                   "reward_failures": float((~valid).sum()),
                   "kl": ((batch["old_logps"] - batch["ref_logps"]) * mask).sum().item() / tokens,
                   "policy_loss": policy_loss.item() / tokens, "value_loss": value_loss.item() / tokens,
                   "clip_ratio": (((ratio - 1).abs() > c.cliprange) & mask).sum().item() / tokens,
                   "completion_length": batch["completion_mask"].sum(1).float().mean().item()}
        return policy_loss + c.vf_coef * value_loss, metrics

    def evaluate(self, model, shard) -> dict[str, float]:
        return self.rollouts.evaluation(self.val, self.config.data)


@in_run_directory("ppo")
def run(config: PPOConfig) -> TrainResult:
    online = prepare_online_run(config, "ppo", 1, keep_reference=True, value_head=True)
    return train_online(config, online, PPO(config, online.rollouts, online.val, online.reference))
