"""Reward models: a scalar head on the language model, trained on preference pairs.

Run it with `orchard reward init=CKPT [key=value ...]`; with no data it trains on the built-in
world's pairs. The result scores a (prompt, reply) at the reply's last token, and serves as the
reward of `orchard grpo` / `orchard ppo` with `rewards=[model:PATH]` (RLHF). Read top to bottom:

1. the parent checkpoint gets a `score` head (hidden size -> 1, transformers'
   ...ForSequenceClassification layout), trainable even on a frozen base with `peft.method`;
2. pairs as in `orchard dpo` (`methods.pairs`), chosen rows and rejected rows in one forward pass;
3. the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin), with an optional margin
   (a pair's `margin` field is not read: the margin is one number, as in Llama 2's binary form) and
   optional reward centring coef * (r_chosen + r_rejected)^2 (Eisenstein et al.), which keeps scores
   near zero so rewards from different runs are comparable;
4. validation by pairwise accuracy: how often the held-out chosen reply scores higher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..peft.config import apply_peft
from ..rewards.models import sequence_scores
from ..training import TrainConfig, TrainResult
from ..training.launch import MethodConfig, finish, start_from
from ..training.run_directory import in_run_directory
from .pairs import (PairBatches, PreferenceDataConfig, TokenizedPair, held_out_batches, load_pairs,
                    pair_training_defaults)


@dataclass
class RewardConfig(MethodConfig):
    out: str = "runs/reward"
    margin: float = 0.0
    """Required score gap: the loss is -log sigmoid(chosen - rejected - margin)."""
    center_rewards_coefficient: float = 0.0
    """Weight of (chosen + rejected)^2, which pulls scores towards zero (TRL's name)."""
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=pair_training_defaults)

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must not be negative, got {self.center_rewards_coefficient}")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair reward-model loss: -log sigmoid(chosen - rejected - margin) + c (chosen + rejected)^2."""
    return -F.logsigmoid(chosen - rejected - margin) + center_coefficient * (chosen + rejected) ** 2


class RewardModeling:
    """The engine's view of reward modelling: batches of pairs, the Bradley-Terry loss."""

    name = "reward"
    trainable_modules = None

    def __init__(self, config: RewardConfig, train: list[TokenizedPair], val: list[TokenizedPair], pad_id: int):
        self.config, self.val, self.pad_id = config, val, pad_id
        c = config.train
        self.batches = PairBatches(train, c.batch_size, c.grad_accum, c.seed, pad_id)

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        return self.batches.batch(step, micro, rank, world)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["pair_index"])

    def scores(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        pairs = len(batch["pair_index"])
        return scores[:pairs], scores[pairs:]

    def loss(self, model, batch):
        chosen, rejected = self.scores(model, batch)
        losses = bradley_terry_loss(chosen, rejected, self.config.margin, self.config.center_rewards_coefficient)
        return losses.sum(), {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                              "rewards/margins": (chosen - rejected).mean().item(),
                              "rewards/accuracies": (chosen > rejected).float().mean().item()}

    def evaluate(self, model, shard) -> dict[str, float]:
        device = next(model.parameters()).device
        loss = correct = margin = 0.0
        pairs = 0
        c = self.config.train
        for batch in held_out_batches(self.val, c.batch_size, self.pad_id, c.eval_batches, shard):
            batch = {k: v.to(device) for k, v in batch.items()}
            chosen, rejected = self.scores(model, batch)
            loss += bradley_terry_loss(chosen, rejected, self.config.margin,
                                       self.config.center_rewards_coefficient).sum().item()
            correct += (chosen > rejected).sum().item()
            margin += (chosen - rejected).sum().item()
            pairs += len(chosen)
        totals = shard.sum({"loss": loss, "correct": correct, "margin": margin, "pairs": pairs})
        pairs = max(totals["pairs"], 1)
        return {"val_loss": totals["loss"] / pairs, "val_accuracy": totals["correct"] / pairs,
                "val_margin": totals["margin"] / pairs}


@in_run_directory("reward")
def run(config: RewardConfig) -> TrainResult:
    start = start_from(config.init, "reward", config.train)
    model, tokenizer = start.model, start.tokenizer
    train, val, data_record = load_pairs(config.data, tokenizer, config.train.seed)
    trainable, total = apply_peft(model, config.peft, config.train.seed)
    if not model.config.num_labels:
        model.add_score_head(1, seed=config.train.seed)  # after apply_peft, which freezes what exists
        trainable += model.config.hidden_size
        total += model.config.hidden_size  # the head is part of the model too: never more trainable than total
    method = RewardModeling(config, train, val, tokenizer.pad_id)
    return finish(start, config, method, "reward", data_record, (trainable, total), config.data.max_length)
