"""Offline preference optimisation: DPO, IPO, SimPO and ORPO on pairs of replies.

Run it with `orchard dpo init=CKPT [loss=dpo|ipo|simpo|orpo] [key=value ...]`; with no data it
trains on the built-in world's pairs (a correct answer preferred to a wrong or unhelpful one) and
validates on the held-out split. Read top to bottom, a run is:

1. the parent checkpoint (usually an SFT model) and its chat template;
2. pairs rendered as a chosen and a rejected sequence with one shared prompt (`methods.pairs`);
3. for DPO and IPO, the reference model's log-probabilities of every reply, computed once with the
   parent before training and cached in the run directory, so training holds one model in memory
   (SimPO and ORPO need no reference);
4. with `peft.method`, adapters on the frozen parent, else every weight trains;
5. the shared engine: each micro-batch scores its chosen and rejected rows in one forward pass and
   applies the loss of `orchard.losses.preference`; it logs what TRL users know (the implicit rewards of
   chosen and rejected replies, their margin, and how often the chosen one wins) and validates
   the same on held-out pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..losses.preference import dpo_loss, ipo_loss, orpo_loss, simpo_loss
from ..peft.config import apply_peft
from ..training import TrainConfig, TrainResult
from ..training.launch import MethodConfig, finish, start_from
from ..training.run_directory import in_run_directory
from .pairs import (PairBatches, PreferenceDataConfig, TokenizedPair, cached_reference, held_out_batches, load_pairs,
                    pair_training_defaults, sequence_log_probs)


@dataclass
class DPOConfig(MethodConfig):
    out: str = "runs/dpo"
    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    """dpo: sigmoid DPO (Rafailov et al.); ipo: IPO (Azar et al.); simpo: reference-free,
    length-normalised SimPO (Meng et al.); orpo: odds-ratio preference plus the chosen reply's NLL
    (Hong et al.)."""
    beta: float = 0.1
    """DPO/IPO/SimPO's beta (IPO's tau). The SimPO paper uses 2 to 2.5."""
    label_smoothing: float = 0.0
    """Probability that a pair's label is flipped (conservative DPO), for dpo and simpo."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    orpo_lambda: float = 0.1
    """Weight of ORPO's odds-ratio term beside the NLL."""
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=pair_training_defaults)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @property
    def uses_reference(self) -> bool:
        return self.loss in ("dpo", "ipo")


class PreferenceOptimization:
    """The engine's view of DPO and its relatives: batches of pairs, one of four losses."""

    name = "dpo"
    trainable_modules = None

    def __init__(self, config: DPOConfig, train: list[TokenizedPair], val: list[TokenizedPair], pad_id: int,
                 reference: dict[str, torch.Tensor] | None):
        self.config, self.val, self.pad_id, self.reference = config, val, pad_id, reference
        c = config.train
        self.batches = PairBatches(train, c.batch_size, c.grad_accum, c.seed, pad_id)

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        batch = self.batches.batch(step, micro, rank, world)
        if self.reference is not None:
            batch["reference"] = self.reference["train"][batch["pair_index"]]
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["pair_index"])

    def pair_losses(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses, and per-pair implicit rewards of the chosen and rejected replies."""
        c = self.config
        summed, mean = sequence_log_probs(model, batch)
        pairs = len(batch["pair_index"])
        chosen, rejected = summed[:pairs], summed[pairs:]
        chosen_mean, rejected_mean = mean[:pairs], mean[pairs:]
        if c.uses_reference:
            ref_chosen, ref_rejected = batch["reference"][:, 0], batch["reference"][:, 1]
            if c.loss == "dpo":
                losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, c.beta, c.label_smoothing)
            else:
                losses = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, c.beta)
            rewards = (c.beta * (chosen - ref_chosen).detach(), c.beta * (rejected - ref_rejected).detach())
        elif c.loss == "simpo":
            losses = simpo_loss(chosen_mean, rejected_mean, c.beta, c.simpo_gamma, c.label_smoothing)
            rewards = (c.beta * chosen_mean.detach(), c.beta * rejected_mean.detach())
        else:
            losses = orpo_loss(chosen_mean, rejected_mean, -chosen_mean, c.orpo_lambda)
            rewards = (c.orpo_lambda * chosen_mean.detach(), c.orpo_lambda * rejected_mean.detach())
        return losses, {"chosen": rewards[0], "rejected": rewards[1], "logps_chosen": chosen.detach(),
                        "logps_rejected": rejected.detach(), "mean_chosen": chosen_mean.detach(),
                        "mean_rejected": rejected_mean.detach()}

    def loss(self, model, batch):
        losses, parts = self.pair_losses(model, batch)
        margin = parts["chosen"] - parts["rejected"]
        return losses.sum(), {"rewards/chosen": parts["chosen"].mean().item(),
                              "rewards/rejected": parts["rejected"].mean().item(),
                              "rewards/margins": margin.mean().item(),
                              "rewards/accuracies": (margin > 0).float().mean().item(),
                              "logps/chosen": parts["logps_chosen"].mean().item(),
                              "logps/rejected": parts["logps_rejected"].mean().item()}

    def evaluate(self, model, shard) -> dict[str, float]:
        device = next(model.parameters()).device
        totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0,
                  "likelihood_accuracy": 0.0}
        pairs = 0
        c = self.config.train
        for batch in held_out_batches(self.val, c.batch_size, self.pad_id, c.eval_batches, shard):
            if self.reference is not None:
                batch["reference"] = self.reference["val"][batch["pair_index"]]
            batch = {k: v.to(device) for k, v in batch.items()}
            losses, parts = self.pair_losses(model, batch)
            margin = parts["chosen"] - parts["rejected"]
            totals["loss"] += losses.sum().item()
            totals["accuracy"] += (margin > 0).sum().item()
            totals["margin"] += margin.sum().item()
            totals["reward_chosen"] += parts["chosen"].sum().item()
            totals["reward_rejected"] += parts["rejected"].sum().item()
            # Whether the model itself (not its change since the reference) finds the chosen reply
            # more likely per token: meaningful before training too, when implicit rewards are all 0.
            totals["likelihood_accuracy"] += (parts["mean_chosen"] > parts["mean_rejected"]).sum().item()
            pairs += len(batch["pair_index"])
        totals = shard.sum({**totals, "pairs": pairs})
        pairs = max(totals.pop("pairs"), 1)
        return {f"val_{k}": v / pairs for k, v in totals.items()}


@in_run_directory("dpo")
def run(config: DPOConfig) -> TrainResult:
    start = start_from(config.init, "dpo", config.train)
    model, tokenizer = start.model, start.tokenizer
    train, val, data_record = load_pairs(config.data, tokenizer, config.train.seed)

    reference = None
    if config.uses_reference:
        reference = cached_reference(Path(config.out), model, train, val, tokenizer.pad_id,
                                     2 * config.train.batch_size, start.checkpoint.record.get("weights_sha256"),
                                     start.runtime)
    trainable, total = apply_peft(model, config.peft, config.train.seed)
    method = PreferenceOptimization(config, train, val, tokenizer.pad_id, reference)
    return finish(start, config, method, config.loss, data_record, (trainable, total), config.data.max_length)
