"""An adapter checkpoint: only the adapters' tensors (`adapters.safetensors`), the surgery that
rebuilds them (`adapters.json`), and for plain LoRA the same adapter in PEFT's format; its record's
parent names the base. Writing one, and putting its adapters back on a base."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import OrchardError
from ..files import file_sha256, read_json, write_json
from ..model import CausalLM
from ..peft.lora import save_adapter
from ..peft.surgery import describe, has_trained_head, is_peft_tensor, rebuild
from .layout import (ADAPTER_SETTINGS_FILE, ADAPTER_WEIGHTS_FILE, PEFT_DIR, is_adapter_checkpoint, read_record,
                     read_weights, resolve_checkpoint)



def adapter_tensors(model: CausalLM, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every adapter tensor under its module path (`...q_proj.lora.default.A`), DoRA magnitudes
    included, and a trainable score head trained with them: of `model`, or of `weights`, its whole
    state dict, when the model holds only a shard of it."""
    state = model.state_dict() if weights is None else weights
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items() if is_peft_tensor(name)}
    if tensors and has_trained_head(model):
        tensors.update({name: t.detach().contiguous() for name, t in state.items() if name.startswith("score.")})
    return tensors


def write_adapters(tmp: Path, model: CausalLM, base: dict | None, tensors: dict[str, torch.Tensor]) -> str:
    """An adapter checkpoint of `tensors` (`adapter_tensors`): orchard's own file (exact, DoRA
    included) and, for plain LoRA, the same adapter in PEFT's format for transformers users.
    Returns the adapter file's hash."""
    settings = describe(model)
    tensors = {k: v.to("cpu") for k, v in tensors.items()}
    save_file(tensors, tmp / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    write_json(tmp / ADAPTER_SETTINGS_FILE, settings)
    lora = settings.get("lora", {})
    if list(settings) == ["lora"] and len(lora) == 1 and not next(iter(lora.values()))["use_dora"]:
        save_adapter(model, next(iter(lora)), tmp / PEFT_DIR, base_model_name_or_path=(base or {}).get("path"),
                     tensors=tensors)
    return file_sha256(tmp / ADAPTER_WEIGHTS_FILE)


def restore_adapters(model: CausalLM, path: Path, create: bool = False, rename: str | None = None) -> list[str]:
    """Load an adapter checkpoint's tensors into `model`, adding the adapters first with `create`
    (under the name `rename` when given, so several checkpoints' adapters can share one base).
    Returns the adapter names."""
    settings = read_json(path / ADAPTER_SETTINGS_FILE)
    lora = settings.get("lora", {})
    if not isinstance(lora, dict):
        raise OrchardError(f"{path / ADAPTER_SETTINGS_FILE}: \"lora\" must map adapter names to settings")
    tensors = dict(read_weights(path / ADAPTER_WEIGHTS_FILE))
    if rename is not None:
        if list(settings) != ["lora"] or len(lora) != 1:
            raise OrchardError(f"{path}: only a checkpoint with a single LoRA adapter can join other adapters "
                               f"on one base")
        (old_name,) = lora
        tensors = {k.replace(f".lora.{old_name}.", f".lora.{rename}."): v for k, v in tensors.items()}
    before = set(adapter_tensors(model))
    if create:
        rebuild(model, settings, rename)
    expected = set(adapter_tensors(model)) - before if create else set(adapter_tensors(model))
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
        raise OrchardError(f"{path / ADAPTER_WEIGHTS_FILE}: adapters do not match the model ({missing[0]})")
    model.load_state_dict(tensors, strict=False)
    return [rename] if rename is not None else list(lora)


def attach_adapter_checkpoint(model: CausalLM, base_path: Path, adapter_path: str | Path, name: str) -> None:
    """Add the adapters of another adapter checkpoint to an already loaded base, as `name`,
    refusing adapters that were trained on a different base."""
    adapter_dir = resolve_checkpoint(adapter_path)
    if not is_adapter_checkpoint(adapter_dir):
        raise OrchardError(f"{adapter_dir}: not an adapter checkpoint (no {ADAPTER_WEIGHTS_FILE})")
    parent = read_record(adapter_dir).get("parent") or {}
    base_sha = read_record(base_path).get("weights_sha256")
    if parent.get("weights_sha256") and base_sha and parent["weights_sha256"] != base_sha:
        raise OrchardError(f"{adapter_dir}: trained on the base {parent.get('path')}, not on {base_path}")
    restore_adapters(model, adapter_dir, create=True, rename=name)
