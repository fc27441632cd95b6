"""One process or many: the few places where the engine needs to know.

Under `torchrun` (WORLD_SIZE > 1) the process group is gloo on CPU and nccl on CUDA, and sums are
all-reduced. The model is wrapped in DistributedDataParallel (`parallel="ddp"`: every process holds
all of it), or sharded with FSDP2 (`parallel="fsdp"`: `fully_shard` on each transformer block, then
on the root, as torchtitan does, so each process holds 1/N of the weights, gradients and optimizer
state and gathers a block's weights only while it computes). As a single process every helper here
is a no-op, so the engine reads the same either way.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel


def _float32(module: torch.nn.Module) -> None:
    """`module`'s floating-point weights not yet sharded made float32, in place (a no-op for those
    already float32: a memory-mapped weight stays mapped until sharding copies this process's part)."""
    for parameter in module.parameters():
        if not isinstance(parameter, DTensor) and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


@dataclass(frozen=True)
class Shard:
    """A validation set of `world` global batches' worth, split over the processes: this one takes
    every `world`-th batch from `rank` on, and `sum` adds the totals of all of them, so every world
    size reports the numbers of one process evaluating every batch. Not `split`, every process
    evaluates every batch (a sharded model: each forward pass needs all the processes, so they must
    make the same number of them)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    split: bool = True

    def takes(self, batch_index: int) -> bool:
        return not self.split or batch_index % self.world == self.rank

    def sum(self, totals: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not self.split:
            return totals
        keys = sorted(totals)
        summed = torch.tensor([float(totals[key]) for key in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return dict(zip(keys, summed.tolist()))


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device_name: str) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
        if use_cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            # Processes on one machine share its cores; oversubscribing them slows every one.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(rank=rank, world_size=world_size, device=device)

    def shards(self, parallel: str) -> bool:
        """Whether `wrap` shards the model: fsdp under torchrun."""
        return self.active and parallel == "fsdp"

    def wrap(self, model: torch.nn.Module, parallel: str = "ddp", bf16: bool = False) -> torch.nn.Module:
        """`model` replicated (ddp) or sharded in place (fsdp; with `bf16`, bf16 weights in the
        forward and backward passes and fp32 gradient reduction, the master weights fp32).

        A model to shard may come as loaded (memory-mapped, in the checkpoint's dtype, on the CPU):
        each block in turn is made float32 and sharded, which moves only this process's shards to
        its device, so no process ever holds the whole model in float32 or on its GPU."""
        if not self.active:
            return model
        if parallel == "fsdp":
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
                else MixedPrecisionPolicy()
            for block in model.model.layers:
                _float32(block)
                fully_shard(block, mesh=mesh, mp_policy=policy)
            _float32(model)  # what the blocks left: embeddings, final norm, heads
            fully_shard(model, mesh=mesh, mp_policy=policy)
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    @contextmanager
    def no_sync(self, model: torch.nn.Module):
        """Gradients of the micro-batches in this block are accumulated locally, not reduced."""
        if isinstance(model, DistributedDataParallel):
            with model.no_sync():
                yield
        elif isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            yield

    # --- sharded models: whole tensors in and out (every rank calls these together) ----------------

    @staticmethod
    def is_sharded(model: torch.nn.Module) -> bool:
        return isinstance(model, FSDPModule)

    @staticmethod
    def full_state_dict(model: torch.nn.Module, trained_only: bool = False) -> dict[str, torch.Tensor]:
        """The sharded model's whole weights (`trained_only`: those that train) on rank 0, gathered
        one tensor at a time onto the CPU."""
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=trained_only))

    @staticmethod
    def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Every rank passes the whole weights (read from the checkpoint); each keeps its shard."""
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    @staticmethod
    def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    @staticmethod
    @contextmanager
    def gathered(model: torch.nn.Module):
        """A sharded model's whole weights in every process for the block, gathered once (not at
        every forward pass, and with no collective inside the block), so that processes may run
        different numbers of forward passes: sampling replies of their own lengths. A model that is
        not sharded is left as it is."""
        if not isinstance(model, FSDPModule):
            yield
            return
        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for module in sharded:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for module in sharded:
                # As fully_shard leaves them: the blocks reshard after their forward, the root does not.
                module.set_reshard_after_forward(module is not model, recurse=False)
                module.reshard()

    @staticmethod
    def local(tensor: torch.Tensor) -> torch.Tensor:
        """This process's part of a tensor (the shard of a sharded one)."""
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def shard(self, split: bool = True) -> Shard:
        return Shard(self.rank, self.world_size, self.device, split)

    def all_reduce_sum(self, value: float) -> float:
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes (every process calls this; it stays on its device)."""
        if not self.active:
            return tensor
        summed = tensor.to(self.device, torch.float64)
        dist.all_reduce(summed)
        return summed.to(tensor.device, tensor.dtype)

    def mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric's mean over the processes that report it (every process calls this): what a
        method measured on its part of the batch (a reward, a KL) becomes the whole batch's."""
        if not self.active:
            return metrics
        everyone: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(everyone, metrics)
        keys = dict.fromkeys(key for reported in everyone for key in reported)
        return {key: sum(r[key] for r in everyone if key in r) / sum(key in r for r in everyone) for key in keys}

    @contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block first (e.g. to write a cache), the others after it is done."""
        if self.rank != 0:
            self.barrier()
        yield
        if self.rank == 0:
            self.barrier()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()



def leave_process_group() -> None:
    """The end of a command under torchrun (after all its training runs: continual trains several):
    every process leaves together, since one that leaves while its peer is still in a collective
    makes gloo abort the peer. Nothing to do in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
