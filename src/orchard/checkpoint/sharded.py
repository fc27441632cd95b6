"""Step checkpoints of a sharded (FSDP2) run, through `torch.distributed.checkpoint` (DCP).

Each process writes its own shards of the trained weights and of the optimizer state into
`shards/` of the step checkpoint: safetensors files, one per process, whose headers say where each
slice lies in the whole tensor (DCP's `HuggingFaceStorageWriter`; no pickle, so nothing read back
can run code). No process ever holds the whole model or optimizer state to save it. Loading reads
each process's slices of every tensor at whatever number of processes the run continues with (DCP
reshards), one process included.

`final/` of such a run is consolidated from the last step's shards by rank 0, file by file, one
tensor at a time (DCP's `consolidate_safetensors_files`), into the usual `model.safetensors`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..errors import OrchardError
from ..peft.surgery import is_peft_tensor
from .layout import SHARDS_DIR, WEIGHTS_FILE, WEIGHTS_INDEX_FILE

OPTIMIZER_PREFIX = "optimizer."
"""Tensors of the optimizer state are saved as optimizer.PARAMETER.KEY (exp_avg, exp_avg_sq, step)."""

TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)


def is_sharded_checkpoint(directory: Path) -> bool:
    return (directory / SHARDS_DIR).is_dir()


def _state(model: torch.nn.Module, trained: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """The tensors a step checkpoint holds, as this process has them (its shards of a sharded
    model): the model's trained weights under their names (a tied lm_head is the embedding, saved
    once), then the optimizer state of `trained` (the model and any weights trained beside it) under
    OPTIMIZER_PREFIX. Also the optimizer state dict they came from, to load them back into."""
    weights = get_model_state_dict(model, options=TRAINED_ONLY)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    optimizer_state = get_optimizer_state_dict(trained, optimizer)  # allocates the state of a fresh optimizer
    tensors = dict(weights)
    for name, values in optimizer_state["state"].items():
        for key, value in values.items():
            tensors[f"{OPTIMIZER_PREFIX}{name}.{key}"] = value
    return tensors, weights, optimizer_state


def save_shards(directory: Path, model: torch.nn.Module, trained: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards into `directory`/shards (all processes call this together)."""
    tensors, _, _ = _state(model, trained, optimizer)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(directory / SHARDS_DIR), save_distributed=True))


def load_shards(directory: Path, model: torch.nn.Module, trained: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> None:
    """The weights and optimizer state of `directory`'s shards into this run's model and optimizer,
    sharded over any number of processes or whole in one."""
    tensors, weights, optimizer_state = _state(model, trained, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(directory / SHARDS_DIR)),
                     no_dist=not dist.is_initialized())
        except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as error:
            raise OrchardError(f"{directory / SHARDS_DIR}: unreadable shards ({str(error).splitlines()[0][:200]})") \
                from None
    set_model_state_dict(model, {name: tensors[name] for name in weights}, options=StateDictOptions(strict=False))
    for name, values in optimizer_state["state"].items():
        for key in values:
            values[key] = tensors[f"{OPTIMIZER_PREFIX}{name}.{key}"]
    set_optimizer_state_dict(trained, optimizer, optimizer_state)


def consolidate_weights(step_dir: Path, out_dir: Path, names: list[str]) -> None:
    """The whole tensors `names` of `step_dir`'s shards as `out_dir`/model.safetensors, streamed one
    tensor at a time (no process holds the model)."""
    consolidate_safetensors_files(str(step_dir / SHARDS_DIR), str(out_dir), dict.fromkeys(names, 1))
    (out_dir / "model-00001-of-00001.safetensors").rename(out_dir / WEIGHTS_FILE)
    (out_dir / WEIGHTS_INDEX_FILE).unlink()


def consolidated_weight_names(model: torch.nn.Module) -> list[str] | None:
    """The names final/ consolidates from a step's shards: every weight of the model (a tied lm_head
    once, as the embedding) when all of them train and none is an adapter's; else None (what final/
    holds is then gathered instead: the adapters alone, or weights of which some never trained)."""
    named = list(model.named_parameters())  # a tied weight is listed once
    if any(not p.requires_grad or is_peft_tensor(name) for name, p in named):
        return None
    return [name for name, _ in named]
