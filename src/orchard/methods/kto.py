"""KTO: preference optimisation from unpaired examples, each a completion labelled desirable or not
(Ethayarajh et al. 2024), for the feedback users actually collect (thumbs up or down on one reply).

Run it with `orchard kto init=CKPT [data.path=FILE] [key=value ...]`; FILE holds TRL's unpaired
records `{"prompt", "completion", "label": true|false}`. With no data it trains on the built-in
world's preference pairs taken apart (each chosen reply desirable, each rejected one not) and
validates on the held-out pairs. Read top to bottom, a run is:

1. the parent checkpoint (an SFT model) and its chat template; every example rendered as one
   sequence, labels on the completion, and beside it its KL sequence: its prompt with the completion
   of the next example that answers another prompt (a reply to another question: TRL pairs them
   the same way within a batch; here the partner is fixed, so the reference scores it once);
2. the reference model's log-probabilities of all of them, computed once with the parent before
   training (held in memory, so training holds one model);
3. the shared engine: each micro-batch scores its examples and their KL sequences in one forward pass;
   the reference point z0 is the batch's mean log-ratio on the KL sequences (clamped at 0, no
   gradient), and `orchard.losses.preference.kto_loss` pushes each desirable reply's log-ratio above
   z0 and each undesirable one's below it;
4. validation on held-out pairs: how often the chosen reply's implicit reward beats the rejected
   one's (DPO's accuracy), and on held-out unpaired examples how often the implicit reward's sign
   matches the label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.conversations import Conversation, collate_padded, tokenize_conversation
from ..data.packing import EpochOrder, micro_batch_samples
from ..data.preferences import (UnpairedExample, read_limited, read_preference_pairs, read_split, read_unpaired,
                                unpaired_from_pairs)
from ..data.records import records, resolve_paths
from ..errors import OrchardError
from ..losses.preference import kto_loss, kto_reference_point
from ..peft.config import apply_peft
from ..training import TrainConfig, TrainResult
from ..training.launch import MethodConfig, finish, start_from
from ..training.run_directory import in_run_directory
from .pairs import (PreferenceDataConfig, builtin_pairs, pair_training_defaults, reference_log_probs,
                    sequence_log_probs)


@dataclass
class KTOConfig(MethodConfig):
    out: str = "runs/kto"
    beta: float = 0.1
    """Scale of the implicit reward beta * (log pi - log pi_ref)."""
    desirable_weight: float = 1.0
    """Weight of a desirable example's loss (TRL: keep desirable_weight * n_desirable /
    (undesirable_weight * n_undesirable) within [1, 4/3])."""
    undesirable_weight: float = 1.0
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    """data.path: unpaired records (prompt, completion, label); data.val_path: held-out preference
    pairs (any file `orchard dpo` reads) or unpaired records."""
    train: TrainConfig = field(default_factory=pair_training_defaults)

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError(f"beta, desirable_weight and undesirable_weight must be positive, got {self.beta}, "
                             f"{self.desirable_weight}, {self.undesirable_weight}")


@dataclass
class Example:
    """One tokenized example and its KL sequence (its prompt, the next example's completion)."""
    sequence: object
    kl_sequence: object
    desirable: bool


def _tokenize(examples: list[UnpairedExample], tokenizer, config: PreferenceDataConfig) -> tuple[list[Example], int]:
    tokenized, skipped = [], 0
    for index, example in enumerate(examples):
        # The next example with another prompt (a pair taken apart puts the same prompt twice in a row).
        later = (examples[(index + step) % len(examples)] for step in range(1, len(examples)))
        partner = next((e for e in later if e.prompt != example.prompt), examples[(index + 1) % len(examples)])
        pair = [tokenize_conversation(Conversation(example.prompt + completion, example.source), tokenizer,
                                      config.max_length, "last_assistant", "skip")
                for completion in (example.completion, partner.completion)]
        if None in pair:
            skipped += 1
        else:
            tokenized.append(Example(pair[0], pair[1], example.desirable))
    return tokenized, skipped


def holds_unpaired(paths) -> bool:
    """Whether held-out files are unpaired examples (their first record has a 'label') rather than
    preference pairs."""
    first = next((record for path in resolve_paths(paths, "data.val_path") for _, record in records(path)), None)
    return isinstance(first, dict) and "label" in first


def load_examples(config: PreferenceDataConfig, tokenizer, seed: int) -> tuple[list[Example], list[Example], dict]:
    """(training examples, held-out examples, a description for the record). Held-out examples made
    from pairs come chosen then rejected, pair by pair (`evaluate` reads them as pairs)."""
    if config.path is None:
        train, source = unpaired_from_pairs(builtin_pairs("train", config.max_pairs)), "built-in world pairs, unpaired"
    else:
        source = str(config.path)
        if config.val_path is None:
            train, val = read_split(read_unpaired, config.path, None, config.on_error, config.max_pairs,
                                    config.val_fraction, seed)
        else:
            train = read_limited(read_unpaired, config.path, config.on_error, "data.path", config.max_pairs)
    if config.val_path is None and config.path is None:
        val, paired = unpaired_from_pairs(builtin_pairs("held_out", None)), True
    elif config.val_path is not None:
        paired = not holds_unpaired(config.val_path)
        val = unpaired_from_pairs(read_limited(read_preference_pairs, config.val_path, config.on_error,
                                               "data.val_path", None)) if paired else \
            read_limited(read_unpaired, config.val_path, config.on_error, "data.val_path", None)
    else:
        paired = False  # a held-out share of the unpaired data.path
    train_examples, skipped_train = _tokenize(train, tokenizer, config)
    val_examples, skipped_val = _tokenize(val, tokenizer, config)
    if not train_examples or not val_examples:
        raise OrchardError(f"data: no {'training' if not train_examples else 'held-out'} example fits in "
                           f"data.max_length {config.max_length}")
    if paired and skipped_val:
        raise OrchardError(f"data.max_length: {skipped_val} held-out replies do not fit in {config.max_length} "
                           "tokens, which would break their pairs; raise data.max_length")
    desirable = sum(e.desirable for e in train_examples)
    return train_examples, val_examples, {
        "source": source, "train_examples": len(train_examples), "desirable": desirable,
        "undesirable": len(train_examples) - desirable, "val_examples": len(val_examples),
        "val_paired": paired, "skipped_too_long": skipped_train + skipped_val}


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 the examples, rows B..2B-1 their KL sequences."""
    batch = collate_padded([e.sequence for e in examples] + [e.kl_sequence for e in examples], pad_id)
    batch["desirable"] = torch.tensor([e.desirable for e in examples])
    return batch


class KTO:
    """The engine's view of KTO: micro-batches of unpaired examples and their KL sequences."""

    name = "kto"
    trainable_modules = None

    def __init__(self, config: KTOConfig, train: list[Example], val: list[Example], paired: bool, pad_id: int,
                 reference: dict[str, torch.Tensor]):
        self.config, self.train, self.val, self.paired = config, train, val, paired
        self.pad_id, self.reference = pad_id, reference
        self.order = EpochOrder(len(train), config.train.seed)

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        c = self.config.train
        indices = [self.order[s] for s in micro_batch_samples(step, micro, rank, world, c.batch_size, c.grad_accum)]
        batch = collate([self.train[i] for i in indices], self.pad_id)
        batch["reference"] = self.reference["train"][indices]
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["desirable"])

    def losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-example losses, implicit rewards, the reference point z0)."""
        c = self.config
        summed, _ = sequence_log_probs(model, batch)
        n = len(batch["desirable"])
        logps, kl_logps = summed[:n], summed[n:]
        reference_point = kto_reference_point(kl_logps, batch["reference"][:, 1])
        losses = kto_loss(logps, batch["reference"][:, 0], batch["desirable"], reference_point, c.beta,
                          c.desirable_weight, c.undesirable_weight)
        return losses, c.beta * (logps.detach() - batch["reference"][:, 0]), reference_point

    def loss(self, model, batch):
        losses, rewards, reference_point = self.losses(model, batch)
        desirable = batch["desirable"].bool()
        metrics = {"kl": reference_point.item()}
        if desirable.any():
            metrics["rewards/desirable"] = rewards[desirable].mean().item()
        if (~desirable).any():
            metrics["rewards/undesirable"] = rewards[~desirable].mean().item()
        return losses.sum(), metrics

    @torch.no_grad()
    def evaluate(self, model, shard) -> dict[str, float]:
        device = next(model.parameters()).device
        c = self.config.train
        totals = {"loss": 0.0, "label_accuracy": 0.0, "accuracy": 0.0}
        examples = pairs = 0
        step = 2 * c.batch_size  # an even number: a held-out pair stays in one batch
        for number, start in enumerate(range(0, len(self.val), step)):
            if not shard.takes(number):
                continue
            chunk = self.val[start:start + step]
            batch = {k: v.to(device) for k, v in collate(chunk, self.pad_id).items()}
            batch["reference"] = self.reference["val"][start:start + len(chunk)].to(device)
            losses, rewards, _ = self.losses(model, batch)
            desirable = batch["desirable"].bool()
            totals["loss"] += losses.sum().item()
            totals["label_accuracy"] += ((rewards > 0) == desirable).sum().item()
            examples += len(chunk)
            if self.paired:
                margins = rewards[0::2] - rewards[1::2]  # chosen, rejected, chosen, ...
                totals["accuracy"] += (margins > 0).sum().item()
                pairs += len(margins)
        totals = shard.sum({**totals, "examples": examples, "pairs": pairs})
        metrics = {"val_loss": totals["loss"] / max(totals["examples"], 1),
                   "val_label_accuracy": totals["label_accuracy"] / max(totals["examples"], 1)}
        if self.paired:
            metrics["val_accuracy"] = totals["accuracy"] / max(totals["pairs"], 1)
        return metrics


@in_run_directory("kto")
def run(config: KTOConfig) -> TrainResult:
    start = start_from(config.init, "kto", config.train)
    model, tokenizer = start.model, start.tokenizer
    train, val, data_record = load_examples(config.data, tokenizer, config.train.seed)
    model.to(start.runtime.device)
    batch_size = 2 * config.train.batch_size
    reference = {split: reference_log_probs(model, examples, tokenizer.pad_id, batch_size, start.runtime.autocast,
                                            collate=collate)
                 for split, examples in (("train", train), ("val", val))}
    trainable, total = apply_peft(model, config.peft, config.train.seed)
    method = KTO(config, train, val, data_record["val_paired"], tokenizer.pad_id, reference)
    return finish(start, config, method, "kto", data_record, (trainable, total), config.data.max_length)
