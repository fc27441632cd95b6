"""What keeps a model from forgetting: replay of earlier examples, and EWC's penalty."""

from __future__ import annotations

import random

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ...errors import OrchardError
from ...losses.tokens import IGNORE_INDEX
from ...training.distributed import Distributed
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
        return summed_token_loss(model, batch), {}

    def regularize(self, model, distributed) -> tuple[float, dict[str, float]]:
        """EWC's penalty, its gradient added once per step (see `EWCPenalty`)."""
        if self.penalty is None:
            return 0.0, {}
        penalty = self.penalty.add_gradient(model, distributed.all_reduce_sum)
        return penalty, {"ewc_penalty": penalty}

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
    """(lambda / 2) * sum_k F_k (theta_k - theta*_k)^2 over the parameters the Fisher names.

    Not a term of the loss: once per step its gradient, lambda * F_k (theta_k - theta*_k), is added
    to the weights' gradients (`add_gradient`), by each process to the weights or shards it holds.
    That is exact whether the model is whole, replicated (DDP) or sharded (FSDP2); inside the loss
    the penalty would be weighted by each process's share of the batch's tokens."""

    def __init__(self, model: torch.nn.Module, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                 ewc_lambda: float):
        self.ewc_lambda = ewc_lambda
        missing = sorted(set(fisher) - {name for name, _ in model.named_parameters()})
        if missing:
            raise OrchardError(f"ewc: the Fisher names {missing[0]}, which the model does not have")
        self.fisher, self.anchor = fisher, anchor
        self._placed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _like(self, name: str, parameter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Fisher and anchor of `name` where `parameter` is: on its device, and for a shard
        (a DTensor) the same slice of the whole tensors."""
        if name not in self._placed:
            f, a = self.fisher[name].float(), self.anchor[name].float()
            if isinstance(parameter, DTensor):
                mesh, placements = parameter.device_mesh, parameter.placements
                f = distribute_tensor(f.to(mesh.device_type), mesh, placements, src_data_rank=None).to_local()
                a = distribute_tensor(a.to(mesh.device_type), mesh, placements, src_data_rank=None).to_local()
            self._placed[name] = f.to(parameter.device), a.to(parameter.device)
        return self._placed[name]

    @torch.no_grad()
    def add_gradient(self, model: torch.nn.Module, sum_over_processes=lambda value: value) -> float:
        """Add the penalty's gradient to the model's gradients; return the penalty (of the whole
        model: `sum_over_processes` adds the shards' parts)."""
        total = 0.0
        for name, parameter in model.named_parameters():
            if name not in self.fisher:
                continue
            f, a = self._like(name, parameter)
            difference = Distributed.local(parameter).float() - a
            total += float((f * difference ** 2).sum())
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grad = Distributed.local(parameter.grad)
            grad.add_((self.ewc_lambda * f * difference).to(grad.dtype))
        if any(isinstance(p, DTensor) for p in model.parameters()):
            total = sum_over_processes(total)
        return 0.5 * self.ewc_lambda * total
