"""What parameter-efficient surgery a model carries, as plain data, and how to redo it.

An adapter checkpoint stores this description (`adapters.json`) beside the adapter tensors, so
loading it rebuilds the same LoRA, bottleneck adapters or prefix on the base and then fills in
the trained values.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import OrchardError

from .adapters import AdapterConfig, BottleneckAdapter, add_adapters, adapter_modules
from .lora import LoraConfig, adapter_configs, add_lora, set_active_adapters
from .prefix import PrefixConfig, PrefixKV, add_prefix, has_prefix

MARKERS = (".lora.", ".adapter.", ".prefix.")
"""Every tensor the surgery adds has one of these in its name; base tensors have none."""


def is_peft_tensor(name: str) -> bool:
    return any(marker in name for marker in MARKERS)


def describe(model: nn.Module) -> dict:
    settings: dict = {}
    lora = adapter_configs(model)
    if lora:
        settings["lora"] = {name: dataclasses.asdict(config) for name, config in lora.items()}
    modules = adapter_modules(model)
    if modules:
        config = next(m.adapter.config for _, m in model.named_modules() if isinstance(getattr(m, "adapter", None),
                                                                                    BottleneckAdapter))
        settings["bottleneck"] = {**dataclasses.asdict(config), "targets": modules}
    if has_prefix(model):
        prefix = next((m for m in model.modules() if isinstance(m, PrefixKV)), None)
        if prefix is None:
            raise OrchardError("a prefix still produced by its projection network is saved after "
                               "orchard.peft.fold_prefix_projection(model)")
        settings["prefix"] = {"num_virtual_tokens": prefix.key.shape[1]}
    if settings and has_trained_head(model):
        settings["score_head"] = {"num_labels": model.score.out_features}
    return settings


def has_trained_head(model: nn.Module) -> bool:
    """Whether the model has a trainable score head (a reward model's or a value function's), which
    an adapter checkpoint then stores beside its adapters (PEFT's modules_to_save)."""
    score = getattr(model, "score", None)
    return score is not None and score.weight.requires_grad


def rebuild(model: nn.Module, settings: dict, rename: str | None = None) -> None:
    """Redo the surgery `settings` describes (with fresh values, to be overwritten by a load).
    `rename` gives a single LoRA adapter another name, so several can share a base."""
    lora = settings.get("lora", {})
    if rename is not None:
        lora = {rename: config for config in lora.values()}
    for name, fields in lora.items():
        add_lora(model, LoraConfig(**fields), name=name)
    if lora:
        set_active_adapters(model, list(lora))
    if "bottleneck" in settings:
        add_adapters(model, AdapterConfig(**settings["bottleneck"]))
    if "prefix" in settings:
        add_prefix(model, PrefixConfig(**settings["prefix"]))
    if "score_head" in settings and getattr(model, "score", None) is None:
        model.add_score_head(settings["score_head"]["num_labels"])
