"""Writing a checkpoint directory, atomically: a run killed at any moment leaves the old checkpoint
or the new one, never half of one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..files import atomic_directory, file_sha256, write_json
from ..lineage.card import write_model_card
from ..lineage.catalog import record_written
from ..model import CausalLM
from ..model.quantization import quantization_settings
from ..tokenizer import Tokenizer
from ..peft.surgery import is_peft_tensor
from .adapters import adapter_tensors, write_adapters
from .layout import QUANTIZATION_FILE, RECORD_FILE, WEIGHTS_FILE
from .training_state import write_training_state



def model_state_dict(model: CausalLM, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Base weights under Hugging Face names, without the tied lm_head (as `transformers` saves
    them) and without adapters: of `model`, or `weights` when given (its whole state dict, when
    `model` holds only a shard of it)."""
    weights = model.state_dict() if weights is None else weights
    state = {name: tensor.detach().contiguous() for name, tensor in weights.items() if not is_peft_tensor(name)}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(path: str | Path, model: CausalLM, tokenizer: Tokenizer, record: dict,
                    training_state: dict | None = None, weights: dict[str, torch.Tensor] | None = None,
                    write_weights: Callable[[Path], None] | None = None) -> Path:
    """Write a complete checkpoint directory atomically; returns its path. `weights` is the model's
    whole state dict when `model` holds only a shard of it (FSDP2 gathers it onto rank 0);
    `write_weights(tmp)`, when given, writes the weights instead (a sharded run's shards, or
    model.safetensors consolidated from them)."""
    path = Path(path)
    config = model.config
    quantization = quantization_settings(model)
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    generation_config = {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
        "max_new_tokens": 256,
    }

    def write(tmp: Path) -> None:
        adapters = adapter_tensors(model, weights) if write_weights is None else {}
        if write_weights is not None:
            write_json(tmp / "config.json", config.to_hf_dict(dtype))
            write_weights(tmp)
            sha = file_sha256(tmp / WEIGHTS_FILE) if (tmp / WEIGHTS_FILE).is_file() else None
        elif adapters:
            # The base is frozen and stays where it is: only the adapters are written, and the
            # record's parent says which base they belong to.
            sha = write_adapters(tmp, model, record.get("parent"), adapters)
        else:
            write_json(tmp / "config.json", config.to_hf_dict(dtype))
            state = {k: v.to("cpu") for k, v in model_state_dict(model, weights).items()}
            save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            sha = file_sha256(tmp / WEIGHTS_FILE)
            if quantization is not None:
                # Its own file, not a `quantization_config` in config.json, which transformers
                # would take for one of its own formats.
                write_json(tmp / QUANTIZATION_FILE, quantization)
        tokenizer.save(tmp)
        write_json(tmp / "generation_config.json", generation_config)
        write_json(tmp / RECORD_FILE, {**record, "weights_sha256": sha, "tokenizer_sha256": tokenizer.fingerprint()})
        write_model_card(tmp, path, config)
        if training_state is not None:
            write_training_state(tmp, training_state)

    atomic_directory(path, write)
    record_written(path)
    return path
