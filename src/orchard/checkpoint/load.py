"""Loading a checkpoint: orchard's own, a Hugging Face model directory (one `model.safetensors` or
shards) or Hub id, an adapter checkpoint on its base, or a quantized checkpoint. The weights are
memory-mapped and become the model's parameters without a copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OrchardError
from ..files import read_json
from ..model import CausalLM, ModelConfig
from ..model.quantization import apply_quantization_layout, prepare_quantized, quantization_tensor_names
from ..peft.lora import adapter_configs, merge_adapter, remove_adapter
from ..tokenizer import Tokenizer
from .adapters import restore_adapters
from .layout import (ADAPTER_SETTINGS_FILE, QUANTIZATION_FILE, RECORD_FILE, inference_only_error, is_adapter_checkpoint,
                     is_quantized_checkpoint, read_model_config, read_quantization, read_record, read_weights,
                     resolve_checkpoint)



@dataclass
class Checkpoint:
    path: Path
    model: CausalLM
    tokenizer: Tokenizer
    record: dict


def checked_weights(model: CausalLM, path: Path) -> dict[str, torch.Tensor]:
    """`read_weights(path)`, after checking it holds exactly the tensors `model` needs, in the shapes
    it needs (the model may be on the meta device: only names and shapes are compared)."""
    state = read_weights(path)
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # some Hugging Face files store the tied copy as well
    for name in [name for name in state if name.endswith("rotary_emb.inv_freq")]:
        del state[name]  # a table older transformers versions saved; orchard computes its own
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise OrchardError(f"{path}: weights do not match config.json ({what})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise OrchardError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                               f"config.json implies {tuple(expected[name].shape)}")
    return state


def load_weights(model: CausalLM, path: Path, assign: bool = False, dtype: torch.dtype | None = None) -> None:
    """Load a checkpoint directory's (or a safetensors file's) weights into `model`.

    By default the values are copied into the model's existing parameters (which an optimizer may
    already hold). `assign=True` makes the memory-mapped tensors themselves the parameters, which is
    how a model built on the meta device is loaded without a second copy of its weights; they keep
    the file's dtype unless `dtype` is given (a file mixing dtypes is brought to its embedding's).
    """
    state = checked_weights(model, path)
    if assign:
        dtype = dtype or state["model.embed_tokens.weight"].dtype
        keep = quantization_tensor_names(model)  # codes, scales and zeros keep the format's dtypes
        for name, tensor in state.items():
            if tensor.dtype != dtype and name not in keep:
                state[name] = tensor.to(dtype)  # one tensor at a time, so at most one extra copy exists
    model.load_state_dict(state, strict=False, assign=assign)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def check_tokenizer_matches(tokenizer: Tokenizer, config: ModelConfig, where: Path, record: dict) -> None:
    """Reject a tokenizer that does not belong to the model: one that produces ids the model has no
    embedding for, or, in an orchard checkpoint, any tokenizer.json other than the one its record
    names (a smaller vocabulary from another model would otherwise be read as garbage). A Hugging Face
    model with more embeddings than tokens is fine (vocab_size is padded to a round number), and so
    is an eos_token_id in config.json that differs from the tokenizer's (Llama 3 instruct lists
    several)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise OrchardError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
                           f"vocab_size is {config.vocab_size}: they do not belong together")
    expected = record.get("tokenizer_sha256")
    if expected and tokenizer.fingerprint() != expected:
        raise OrchardError(f"{where / 'tokenizer.json'}: not the tokenizer this model was trained with "
                           f"({RECORD_FILE} records another); put the checkpoint's own tokenizer back")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Checkpoint:
    """Load model, tokenizer and lineage record from a checkpoint or run directory, a Hugging Face
    model directory or a Hub model id (see `resolve_checkpoint`).

    The model is built on the meta device and takes the memory-mapped tensors as its parameters, so
    loading costs about the weights' size in memory (and only as their pages are used). The weights
    keep their dtype (orchard's own checkpoints are float32, most Hugging Face models bfloat16)
    unless `dtype` is given.
    """
    path = resolve_checkpoint(path)
    if is_adapter_checkpoint(path):
        return _load_adapter_checkpoint(path, device, dtype)
    config = read_model_config(path)
    tokenizer = Tokenizer.load(path)
    record = read_record(path)
    check_tokenizer_matches(tokenizer, config, path, record)
    with torch.device("meta"):
        model = CausalLM(config)
    quantization = read_quantization(path)
    if quantization is not None:
        apply_quantization_layout(model, quantization, str(path / QUANTIZATION_FILE))
    load_weights(model, path, assign=True, dtype=dtype)
    model.model.rotary.reset()
    model = model.to(device).eval()
    if quantization is not None:
        prepare_quantized(model)  # the CPU kernels' weight layout, once, rather than at the first token
    return Checkpoint(path=path, model=model, tokenizer=tokenizer, record=record)


def load_merged(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint as one plain model, every weight trainable: an adapter checkpoint's LoRA (or
    DoRA) merged into its base. What a stage that trains further, or an export, starts from; a
    quantized checkpoint is refused (one-line error naming its parent)."""
    path = resolve_checkpoint(path)
    if is_quantized_checkpoint(path):
        raise inference_only_error(path, "train from")
    checkpoint = load_checkpoint(path, device)
    if not is_adapter_checkpoint(checkpoint.path):
        return checkpoint
    if any(key in read_json(checkpoint.path / ADAPTER_SETTINGS_FILE) for key in ("bottleneck", "prefix")):
        raise OrchardError(f"{checkpoint.path}: bottleneck adapters and prefixes cannot be merged into the base's "
                           f"weights; this works for LoRA and DoRA checkpoints")
    names = list(adapter_configs(checkpoint.model))
    if len(names) != 1:
        raise OrchardError(f"{checkpoint.path}: holds {len(names)} adapters; merging needs exactly one")
    merge_adapter(checkpoint.model, names[0])
    remove_adapter(checkpoint.model, names[0])  # a merged adapter's removal keeps the merged weights
    checkpoint.model.requires_grad_(True)
    checkpoint.record = {**checkpoint.record, "merged_adapter": str(checkpoint.path)}
    return checkpoint


def _load_adapter_checkpoint(path: Path, device, dtype) -> Checkpoint:
    """The base named by the record's parent, with this checkpoint's adapters attached and active."""
    record = read_record(path)
    parent = (record.get("parent") or {}).get("path")
    if not parent or not Path(parent).exists():
        raise OrchardError(f"{path}: adapter checkpoint whose base model {parent!r} is not available")
    base = load_checkpoint(parent, device, dtype)
    restore_adapters(base.model, path, create=True)
    return Checkpoint(path=path, model=base.model.eval(), tokenizer=base.tokenizer, record=record)


def restore_trained_weights(model: CausalLM, path: Path) -> None:
    """Put a step checkpoint's trained weights back into a model being trained (for resuming)."""
    if is_adapter_checkpoint(path):
        restore_adapters(model, path)
    else:
        load_weights(model, path)
