"""The `peft.*` recipe section every training method shares, and how it is applied to a model.

Fine-tuning, reward modelling, DPO and online RL all train either every weight or adapters on a
frozen base; they describe that choice with one `PeftConfig` and apply it with `apply_peft`.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

from torch import nn

from .adapters import AdapterConfig, add_adapters
from .lora import LoraConfig, _adapted, add_lora, trainable_parameter_count
from .prefix import PrefixConfig, add_prefix
from .quantized import quantize_base_nf4


@dataclass
class PeftConfig:
    method: Literal["none", "lora", "dora", "qlora", "adapter", "prefix"] = "none"
    """none: full fine-tuning; lora or dora: low-rank adapters on the frozen base; qlora: LoRA on a
    base whose targeted layers are frozen in 4-bit NF4 (needs torchao); adapter: bottleneck
    adapters; prefix: trainable key/value prefixes in every attention layer."""
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Adapter scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj"])
    """Linear layers to adapt: names (the last part of a module's name) or regular expressions."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    bottleneck: int = 64
    """Width of a bottleneck adapter (peft.method=adapter)."""
    placement: Literal["serial", "parallel"] = "serial"
    """Bottleneck adapter after its module (serial, Houlsby) or beside it (parallel, He et al.)."""
    adapter_targets: list[str] = field(default_factory=lambda: ["mlp"])
    """Modules that get a bottleneck adapter: mlp and/or self_attn."""
    num_virtual_tokens: int = 16
    """Prefix length in every attention layer (peft.method=prefix)."""


def apply_peft(model: nn.Module, config: PeftConfig, seed: int) -> tuple[int, int]:
    """Attach what `config` asks for (nothing for method=none) and print how many parameters train;
    returns (trainable, total)."""
    if config.method == "qlora":
        quantized = quantize_base_nf4(model, config.target_modules)
        print(f"stored {len(quantized)} linear layers of the frozen base in NF4", file=sys.stderr)
    if config.method == "adapter":
        add_adapters(model, AdapterConfig(bottleneck=config.bottleneck, placement=config.placement,
                                          dropout=config.dropout, targets=config.adapter_targets), seed=seed)
    elif config.method == "prefix":
        add_prefix(model, PrefixConfig(num_virtual_tokens=config.num_virtual_tokens), seed=seed)
    elif config.method != "none":
        add_lora(model, LoraConfig(r=config.r, alpha=config.alpha, dropout=config.dropout,
                                   target_modules=config.target_modules, use_rslora=config.rslora,
                                   use_dora=config.method == "dora"), seed=seed)
    trainable, total = trainable_parameter_count(model)
    print(f"training {trainable:,} of {total:,} parameters ({trainable / total:.2%})", file=sys.stderr)
    return trainable, total


class ReferenceModel:
    """The model a method measures drift from (DPO's and RL's reference policy): the starting point
    of training, frozen.

    With LoRA or DoRA the reference is the policy itself with its adapters switched off, so it costs
    no memory; otherwise it is a frozen copy taken before training starts.
    """

    def __init__(self, policy: nn.Module, peft: PeftConfig):
        self.policy = policy
        self.shares_weights = peft.method in ("lora", "dora", "qlora")
        # float32 as the policy trains, also when the policy still has the checkpoint's dtype (a
        # model to be sharded is made float32 only as it is sharded).
        self.copy = None if self.shares_weights else copy.deepcopy(policy).float().eval().requires_grad_(False)

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        if self.copy is not None:
            yield self.copy
            return
        layers = [adapters for _, adapters in _adapted(self.policy).values()]
        active = [adapters.active for adapters in layers]
        for adapters in layers:
            adapters.active = []
        try:
            yield self.policy
        finally:
            for adapters, names in zip(layers, active):
                adapters.active = names

    def to(self, device) -> ReferenceModel:
        if self.copy is not None:
            self.copy.to(device)
        return self
