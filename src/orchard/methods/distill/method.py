"""The engine's view of distillation: batches (windows, or the student's own continuations), the
divergence to the teacher (cached or online) and the hidden-state alignment."""

from __future__ import annotations

import random

import torch
from torch import nn

from ...data.packing import EpochOrder, PackedSequences, micro_batch_samples
from ...evaluation.language_modeling import evaluate_language_modeling
from ...losses.distillation import (SparseTeacher, distillation_loss, forward_kl, generalized_jsd, hidden_state_loss,
                                    reverse_kl)
from ...losses.tokens import IGNORE_INDEX
from ...model import CausalLM
from ...model.generation import SamplingConfig, generate
from ...training.runtime import Runtime
from .cache import TeacherCache
from .config import DistillConfig
from .models import matched_layers


class Distillation:
    """Batches of packed windows with the teacher's side of the loss: from the cache (offline) or
    from the teacher itself (online, on_policy)."""

    name = "distill"

    def __init__(self, config: DistillConfig, train: PackedSequences, val: PackedSequences, num_train: int,
                 num_val: int, token_bytes, student: CausalLM, teacher: CausalLM | None,
                 cache: TeacherCache | None, end_ids: list[int], pad_id: int, runtime: Runtime):
        self.config, self.train, self.val = config, train, val
        self.num_val, self.token_bytes = num_val, token_bytes
        self.student, self.teacher, self.cache = student, teacher, cache
        self.end_ids, self.pad_id, self.runtime = end_ids, pad_id, runtime
        self.order = EpochOrder(num_train, config.train.seed)
        self.trainable_modules = None
        if config.hidden_weight > 0:
            self.layer_map = matched_layers(config, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
            widths = (student.config.hidden_size, teacher.config.hidden_size)
            generator = torch.Generator().manual_seed(config.train.seed)
            self.trainable_modules = nn.ModuleList(
                [nn.Linear(*widths, bias=False) if widths[0] != widths[1] else nn.Identity() for _ in self.layer_map])
            for projection in self.trainable_modules:
                if isinstance(projection, nn.Linear):
                    with torch.no_grad():
                        projection.weight.copy_(torch.empty(projection.weight.shape).normal_(
                            0.0, projection.in_features ** -0.5, generator=generator))

    def _on_policy(self, step: int, micro: int) -> bool:
        if self.config.mode != "on_policy":
            return False
        return random.Random(f"{self.config.train.seed}:{step}:{micro}").random() < self.config.lmbda

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        c = self.config.train
        windows = [self.order[s] for s in micro_batch_samples(step, micro, rank, world, c.batch_size, c.grad_accum)]
        batch = self.train.batch(windows)
        if self.cache is not None:
            sparse = self.cache.teacher("train", windows)
            batch["teacher_ids"], batch["teacher_log_probs"] = sparse.ids, sparse.log_probs
        if self._on_policy(step, micro):
            seed = c.seed * 1_000_003 + (step * c.grad_accum + micro) * 1009 + rank
            batch = self.student_continuations(batch["input_ids"][:, :self.config.prompt_tokens], seed)
        return batch

    @torch.no_grad()
    def student_continuations(self, prompts: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """The student's continuations of `prompts`, laid out as a batch whose labels are only the
        generated tokens (the divergence is taken where the student wrote)."""
        was_training = self.student.training
        self.student.eval()
        sampling = SamplingConfig(max_new_tokens=self.config.max_new_tokens,
                                  temperature=self.config.sampling_temperature, top_p=1.0, seed=seed)
        with self.runtime.distributed.gathered(self.student), self.runtime.autocast():
            completions = generate(self.student, prompts.tolist(), sampling, self.end_ids, self.pad_id)
        self.student.train(was_training)
        P, C = prompts.shape[1], max(1, max(len(c) for c in completions))
        input_ids = torch.full((len(prompts), P + C), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        input_ids[:, :P], attention_mask[:, :P] = prompts, 1
        for row, completion in enumerate(completions):
            if completion:
                input_ids[row, P:P + len(completion)] = torch.tensor(completion)
                attention_mask[row, P:P + len(completion)] = 1
                labels[row, P - 1:P - 1 + len(completion)] = torch.tensor(completion)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "on_policy": torch.ones(len(prompts), dtype=torch.bool)}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def teacher_outputs(self, batch: dict[str, torch.Tensor], hidden: bool):
        device = self.teacher.lm_head.weight.device  # teacher_device: perhaps not the student's
        student_device = batch["input_ids"].device
        mask = batch.get("attention_mask")
        with torch.no_grad():
            output = self.teacher(batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device),
                                  output_hidden_states=hidden)
        hidden_states = None if output.hidden_states is None else tuple(h.to(student_device) for h in output.hidden_states)
        return output.logits.to(student_device), hidden_states

    def _teacher(self, batch):
        if "teacher_ids" in batch:
            return SparseTeacher(batch["teacher_ids"], batch["teacher_log_probs"]), None
        return self.teacher_outputs(batch, self.config.hidden_weight > 0)

    def loss(self, model, batch):
        c = self.config
        hidden = c.hidden_weight > 0
        teacher, teacher_hidden = self._teacher(batch)
        output = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), output_hidden_states=hidden)
        logits = output.logits
        if isinstance(teacher, torch.Tensor) and teacher.size(-1) != logits.size(-1):
            width = min(teacher.size(-1), logits.size(-1))  # a Hugging Face vocabulary padded to a round size
            teacher, logits = teacher[..., :width], logits[..., :width]
        # On-policy tokens were written by the student: there is no data token to imitate there.
        alpha = 1.0 if "on_policy" in batch else c.alpha
        total, parts = distillation_loss(logits, teacher, batch["labels"], divergence=c.divergence,
                                         temperature=c.temperature, alpha=alpha, beta=c.beta)
        metrics = {"kd_loss": float(parts["kd"]) / max(self.count(batch), 1),
                   "hard_loss": float(parts["ce"]) / max(self.count(batch), 1)}
        if hidden:
            mask = batch["labels"] != IGNORE_INDEX
            hidden_total = sum(hidden_state_loss(output.hidden_states[j + 1], teacher_hidden[t], mask,
                                                 projection if isinstance(projection, nn.Linear) else None)
                               for j, (t, projection) in enumerate(zip(self.layer_map, self.trainable_modules)))
            total = total + c.hidden_weight * hidden_total
            metrics["hidden_loss"] = float(hidden_total.detach()) / max(self.count(batch), 1)
        return total, metrics

    def evaluate(self, model: CausalLM, shard) -> dict[str, float]:
        c = self.config
        metrics = evaluate_language_modeling(model, self.val, self.token_bytes, c.train.batch_size,
                                             max_sequences=self.num_val, shard=shard)
        sums, tokens = {"forward_kl": 0.0, "reverse_kl": 0.0, "jsd": 0.0}, 0
        device = next(model.parameters()).device
        for index, start in enumerate(range(0, self.num_val, c.train.batch_size)):
            if not shard.takes(index):
                continue
            windows = range(start, min(start + c.train.batch_size, self.num_val))
            batch = {k: v.to(device) for k, v in self.val.batch(windows).items()}
            if self.cache is not None:
                sparse = self.cache.teacher("val", windows)
                teacher = SparseTeacher(sparse.ids.to(device), sparse.log_probs.to(device))
            else:
                teacher, _ = self.teacher_outputs(batch, hidden=False)
            logits = model(batch["input_ids"]).logits
            sums["forward_kl"] += forward_kl(logits, teacher, batch["labels"]).item()
            sums["reverse_kl"] += reverse_kl(logits, teacher, batch["labels"]).item()
            sums["jsd"] += generalized_jsd(logits, teacher, batch["labels"], beta=c.beta).item()
            tokens += batch["labels"].numel()
        sums = shard.sum({**sums, "tokens": tokens})
        tokens = max(sums.pop("tokens"), 1)
        metrics.update({f"val_{name}": value / tokens for name, value in sums.items()})
        return metrics
