"""What keeps a model from forgetting: replay of earlier examples, and EWC's penalty."""

from __future__ import annotations

import random

import torch

from ...errors import OrchardError
from ...losses.tokens import IGNORE_INDEX
from ...training.objectives import ConversationLanguageModeling, summed_token_loss


def reservoir(stream, size: int, seed: int) -> list:
    """Algorithm R: a uniform sample of `size` items of `stream` in one pass, deterministic in `seed`."""
    rng = random.Random(f"reservoir:{seed}")
    buffer: list = []
    for seen, item in enumerate(stream):
        if seen < size:
            buffer.append(item)
        else:
            slot = rng.randint(0, seen)
            if slot < size:
                buffer[slot] = item
    return buffer


class ContinualLanguageModeling:
    """The engine's view of one task: the task's own batches (conversations or text windows), plus
    replay micro-batches from a buffer of earlier tasks and an EWC penalty, as the strategy asks.
    The loss reads whatever a batch carries (a packed conversation batch brings its block mask and
    positions; a text batch neither), so replayed conversations mix into a text task and back."""

    name = "continual"
    trainable_modules = None

    def __init__(self, current, replay: ConversationLanguageModeling | None = None,
                 replay_ratio: float = 0.0, seed: int = 0, penalty: EWCPenalty | None = None):
        self.current, self.replay, self.replay_ratio = current, replay, replay_ratio
        self.seed, self.penalty = seed, penalty

    def is_replay(self, step: int, micro: int) -> bool:
        """Whether micro-batch `micro` of step `step` comes from the buffer (the same on every rank)."""
        if self.replay is None or self.replay_ratio <= 0:
            return False
        return random.Random(f"replay:{self.seed}:{step}:{micro}").random() < self.replay_ratio

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        source = self.replay if self.is_replay(step, micro) else self.current
        return source.batch(step, micro, rank, world)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model, batch):
        total, metrics = summed_token_loss(model, batch), {}
        if self.penalty is not None:
            # The engine divides the summed loss by count(): a per-token penalty is added count times.
            penalty = self.penalty()
            total = total + penalty * self.count(batch)
            metrics["ewc_penalty"] = float(penalty.detach())
        return total, metrics

    def evaluate(self, model, shard) -> dict[str, float]:
        return self.current.evaluate(model, shard)


# --- EWC ----------------------------------------------------------------------------------------------


def diagonal_fisher(model: torch.nn.Module, method, batches: int, device: torch.device, world: int = 1,
                    grad_accum: int = 1) -> dict[str, torch.Tensor]:
    """Mean over `batches` of the squared gradients of each batch's mean token loss (the empirical
    diagonal Fisher of the log-likelihood, per batch), for every trainable parameter, on the CPU.
    The mean, not the sum, so the Fisher keeps its scale whatever the batch size and sequence
    length, as the per-token penalty it weighs does. A batch is a training step's global batch (all
    `grad_accum` micro-batches of all `world` processes, taken here in one process), so the Fisher
    is the same however the run is split over processes."""
    model = model.to(device).train()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, device="cpu") for name, p in params.items()}
    for step in range(batches):
        parts = [{k: v.to(device) for k, v in method.batch(step, micro, rank, world).items()}
                 for micro in range(grad_accum) for rank in range(world)]
        count = max(sum(method.count(part) for part in parts), 1)
        model.zero_grad(set_to_none=True)
        for part in parts:
            total, _ = method.loss(model, part)
            (total / count).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float().cpu() ** 2
    model.zero_grad(set_to_none=True)
    return {name: (f / batches).contiguous() for name, f in fisher.items()}


class EWCPenalty:
    """(lambda / 2) * sum_k F_k (theta_k - theta*_k)^2 over the parameters the Fisher names."""

    def __init__(self, model: torch.nn.Module, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                 ewc_lambda: float):
        self.ewc_lambda = ewc_lambda
        named = dict(model.named_parameters())
        missing = sorted(set(fisher) - set(named))
        if missing:
            raise OrchardError(f"ewc: the Fisher names {missing[0]}, which the model does not have")
        self.terms = [(named[name], fisher[name], anchor[name]) for name in sorted(fisher)]

    def __call__(self) -> torch.Tensor:
        total = None
        for i, (p, f, a) in enumerate(self.terms):
            if f.device != p.device:  # the engine moved the model after this was built
                f, a = f.to(p.device), a.to(p.device)
                self.terms[i] = (p, f, a)
            term = (f * (p.float() - a) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.ewc_lambda * total
