"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021; He et al. 2022's parallel adapter),
added to an already-built model by surgery that renames nothing.

Each adapted module (by default every block's `mlp`) keeps its weights where they are and gains a
child `adapter`, a small bottleneck network, and a forward hook that adds the adapter's share to the
module's output. The base model's state-dict keys stay what they were, a checkpoint of the base
loads into the adapted model unchanged, and `remove_adapters` (child and hook) gives back the
original model. The adapter's tensors live under the module's name:

    model.layers.0.mlp.adapter.down.weight    (bottleneck, d)
    model.layers.0.mlp.adapter.down.bias      (bottleneck,)
    model.layers.0.mlp.adapter.up.weight      (d, bottleneck)
    model.layers.0.mlp.adapter.up.bias        (d,)

so every adapter tensor's name contains ".adapter.". For a module f with input x, the adapted module
computes, with s = `scaling`,

    serial   (Houlsby, Pfeiffer):  f(x) + s * up(SiLU(down(f(x))))
    parallel (He et al. 2022):     f(x) + s * up(SiLU(down(x)))

Because the hook acts on the sub-layer's output before the block adds it to the residual stream,
targeting `mlp` is Pfeiffer's placement (one adapter per block, after the feed-forward), and
targeting `self_attn` and `mlp` is Houlsby's (after both sub-layers). In this pre-norm model the
parallel adapter reads the sub-layer's input, i.e. the normalised hidden state. `up` starts at
zero, so until it is trained the adapted model computes exactly what the base did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OrchardError

PLACEMENTS = ("serial", "parallel")


@dataclass
class AdapterConfig:
    bottleneck: int = 64
    """Width b of the bottleneck: each adapter has about 2 * d * b parameters."""
    placement: Literal["serial", "parallel"] = "serial"
    """serial: the adapter reads the module's output (Houlsby/Pfeiffer); parallel: its input (He et al.)."""
    scaling: float = 1.0
    """The adapter's share is multiplied by this (He et al. use 4 for parallel adapters)."""
    dropout: float = 0.0
    """Dropout on the bottleneck's activations, in training mode only."""
    targets: list[str] = field(default_factory=lambda: ["mlp"])
    """Modules to adapt, by the end of their name: "mlp" and/or "self_attn" (or e.g. "down_proj" or
    "layers.3.mlp"). A non-linear module must map the hidden size to itself."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise OrchardError(f"adapter.bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.placement not in PLACEMENTS:
            raise OrchardError(f"adapter.placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if not math.isfinite(self.scaling):
            raise OrchardError(f"adapter.scaling must be a finite number, got {self.scaling!r}")
        if not 0 <= self.dropout < 1:
            raise OrchardError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise OrchardError(f"adapter.targets must be a non-empty list of module names, got {self.targets!r}")


def _linear(in_features: int, out_features: int, generator: torch.Generator | None, dtype: torch.dtype,
            device: torch.device) -> nn.Linear:
    """nn.Linear with its usual init (kaiming-uniform weight, uniform bias), drawn from `generator`."""
    weight = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(in_features)
    bias = torch.empty(out_features).uniform_(-bound, bound, generator=generator)
    linear = nn.Linear(in_features, out_features, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


class BottleneckAdapter(nn.Module):
    """One adapter on one module (its child `adapter`), and the forward hook that applies it.

    The hook is a bound method rather than a closure so that a deep copy of the model hooks the
    copied adapter, not the original's."""

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig,
                 generator: torch.Generator | None, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        # Half-precision bases get float32 adapters: the optimizer's updates to them are small.
        dtype = torch.promote_types(dtype, torch.float32)
        self.down = _linear(in_features, config.bottleneck, generator, dtype, device)
        self.up = nn.Linear(config.bottleneck, out_features, device=device, dtype=dtype)
        with torch.no_grad():  # zero: the adapted module starts as the module itself
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s * up(SiLU(down(x))), computed in x's dtype."""
        h = F.silu(F.linear(x, self.down.weight.to(x.dtype), self.down.bias.to(x.dtype)))
        if self.training and self.config.dropout > 0:
            h = F.dropout(h, self.config.dropout, training=True)
        return self.config.scaling * F.linear(h, self.up.weight.to(x.dtype), self.up.bias.to(x.dtype))

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        source = output if self.config.placement == "serial" else args[0]
        return output + self(source).to(output.dtype)


def _adapted(model: nn.Module) -> dict[str, nn.Module]:
    """Every module carrying a bottleneck adapter, by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(getattr(module, "adapter", None), BottleneckAdapter)}


def _features(model: nn.Module, name: str, module: nn.Module) -> tuple[int, int]:
    """(input, output) width of a target: a linear layer's own; for another module (a block's
    attention or MLP) the model's hidden size, which such sub-layers map to itself."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise OrchardError(f"adapter.targets selects {name}, a {type(module).__name__}, whose width the model's "
                           f"config (hidden_size) does not give; select linear layers instead")
    return hidden, hidden


def _targets(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    found = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, BottleneckAdapter) or ".adapter." in f".{name}.":
            continue
        if any(name == p or name.endswith("." + p) for p in patterns):
            found[name] = module
    if not found:
        raise OrchardError(f"adapter.targets {patterns} match no module of the model")
    return found


def add_adapters(model: nn.Module, config: AdapterConfig, seed: int | None = None) -> list[str]:
    """Add a bottleneck adapter to every module `config.targets` selects; returns their names.

    Every parameter already in the model is frozen and the adapters are the only trainable ones.
    `down` starts as nn.Linear's init (from `seed` when given), `up` at zero, so the model computes
    exactly what it did before until `up` is trained."""
    if _adapted(model):
        raise OrchardError("the model already has bottleneck adapters; remove them before adding others")
    targets = _targets(model, config.targets)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    adapters = {}
    for name, module in targets.items():
        if hasattr(module, "adapter"):
            raise OrchardError(f"{name} already has an attribute named 'adapter'")
        in_features, out_features = _features(model, name, module)
        reads = out_features if config.placement == "serial" else in_features
        reference = next(module.parameters(), None)
        reference = reference if reference is not None else next(model.parameters())
        adapters[name] = BottleneckAdapter(reads, out_features, config, generator, reference.dtype, reference.device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in targets.items():
        module.adapter = adapters[name].train(module.training)  # a new module would be in training mode
        module.register_forward_hook(module.adapter.hook)
    return list(targets)


def remove_adapters(model: nn.Module) -> None:
    """Delete every bottleneck adapter and its hook: each module is again exactly what it was (the
    base stays frozen, as after `remove_adapter` for LoRA)."""
    for module in _adapted(model).values():
        adapter = module.adapter
        # The hook's handle would not survive a deep copy of the model; its owner identifies it.
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__self__", None) is adapter:
                del module._forward_hooks[key]
        del module.adapter


def adapter_modules(model: nn.Module) -> list[str]:
    """The names of the modules carrying a bottleneck adapter."""
    return list(_adapted(model))
