"""LoRA, rsLoRA and DoRA adapters, added to an already-built model by surgery that renames nothing.

Each adapted `nn.Linear` keeps its `weight` and `bias` where they are and gains a child `lora` (an
`nn.ModuleDict` of adapters by name) and a forward hook that adds the active adapters' share to the
layer's output. So the base model's state-dict keys stay exactly what they were, a checkpoint of the
base loads into the adapted model unchanged, and removing the adapters (children and hook) gives back
the original model. An adapter's tensors live under the layer's name:

    model.layers.0.self_attn.q_proj.lora.<adapter>.A           (r, in_features)
    model.layers.0.self_attn.q_proj.lora.<adapter>.B           (out_features, r)
    model.layers.0.self_attn.q_proj.lora.<adapter>.magnitude   (out_features,), DoRA only

which is PEFT's `lora_A`/`lora_B` layout, so `adapter_state_dict` hands them to
`orchard.peft.format` without transposing. The layer computes

    LoRA:  W x + b + s B A x                      s = alpha / r  (alpha / sqrt(r) with rsLoRA)
    DoRA:  m / ||W + s B A|| * (W x + s B A x) + b, the norm taken over each output row

as PEFT does, so adapters move between orchard and PEFT computing the same function.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OrchardError
from .format import LoraAdapterConfig, load_lora_adapter, save_lora_adapter

AdapterWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoraConfig:
    r: int = 8
    """Rank of the update B @ A."""
    alpha: float = 16.0
    """The update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in training mode only."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear layers to adapt: a name matches a module's last name component (or a dotted tail of its
    name), anything else is a regex the module's full name must match entirely (as PEFT)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r), so higher ranks do not learn slower."""
    use_dora: bool = False
    """DoRA: learn each output row's magnitude apart from its direction (Liu et al. 2024)."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise OrchardError(f"lora.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise OrchardError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise OrchardError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise OrchardError(f"lora.target_modules must be a non-empty list of names, got {self.target_modules!r}")

    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraAdapter(nn.Module):
    """One adapter on one linear layer: its weights, and the share it adds to the layer's output."""

    def __init__(self, linear: nn.Linear, config: LoraConfig, generator: torch.Generator | None):
        super().__init__()
        self.config = config
        self.scaling = config.scaling()
        # Half-precision bases get float32 adapters: the optimizer's updates to them are small.
        dtype = torch.promote_types(linear.weight.dtype, torch.float32)
        device = linear.weight.device
        a = torch.empty(config.r, linear.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's init, as PEFT
        self.A = nn.Parameter(a.to(device, dtype))
        self.B = nn.Parameter(torch.zeros(linear.out_features, config.r, device=device, dtype=dtype))
        self.magnitude = nn.Parameter(self.row_norm(linear.weight)) if config.use_dora else None
        # The layer's weight from before merge_adapter, so unmerge_adapter restores it bit for bit
        # (subtracting the update again would not). Not saved: a checkpoint holds the merged weight.
        self.register_buffer("original_weight", None, persistent=False)

    @torch.no_grad()
    def row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B @ A|| of each output row, in the adapter's dtype: DoRA's initial magnitude."""
        dtype = self.A.dtype
        return torch.linalg.vector_norm(weight.to(dtype) + self.scaling * (self.B @ self.A), dim=1)

    def added_to(self, result: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """`result` plus this adapter's share. Plain LoRA folds s into B and lets the second matmul
        add its product to `result` (addmm): one pass over the layer's output instead of three (scale,
        cast, add), ~7% of a LoRA step on the CPU."""
        if self.magnitude is not None or (self.training and self.config.dropout > 0):
            return result + self(x, base_out, linear).to(result.dtype)
        down = F.linear(x, self.A.to(x.dtype))                                       # (..., r)
        up = (self.B * self.scaling).to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.size(-1)), down.to(result.dtype).reshape(-1, down.size(-1)), up.T)
        return out.view(result.shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """What this adapter adds to `base_out` = linear(x), computed in x's dtype."""
        a, b = self.A.to(x.dtype), self.B.to(x.dtype)
        dropped = self.training and self.config.dropout > 0
        if dropped:
            x = F.dropout(x, self.config.dropout, training=True)
        lora = self.scaling * F.linear(F.linear(x, a), b)
        if self.magnitude is None:
            return lora
        weight = linear.weight.to(x.dtype)
        with torch.no_grad():
            # A constant in backward, as the DoRA paper (section 4.3) and PEFT have it: that saves
            # the memory its gradient would need, at little cost in accuracy.
            norm = torch.linalg.vector_norm(weight + self.scaling * (b @ a), dim=1)
        scale = self.magnitude.to(x.dtype) / norm
        if dropped:  # the base's share must see the same dropped input (as PEFT)
            base = F.linear(x, weight)
        else:
            base = base_out if linear.bias is None else base_out - linear.bias
        return (scale - 1) * base + scale * lora

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W + s B @ A (DoRA: scaled to `magnitude` row by row), computed in float32 or wider."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        merged = weight.to(dtype) + self.scaling * (self.B.to(dtype) @ self.A.to(dtype))
        if self.magnitude is not None:
            merged = (self.magnitude.to(dtype) / torch.linalg.vector_norm(merged, dim=1))[:, None] * merged
        return merged.to(weight.dtype)


class LoraAdapters(nn.ModuleDict):
    """The adapters of one linear layer (its child `lora`), and the forward hook that applies them.

    The hook is a bound method rather than a closure so that a deep copy of the model hooks the
    copied adapters, not the original's."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[str] = []
        self.routing: list[str | None] | None = None

    def hook(self, linear: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.routing is not None:
            return self._routed(linear, x, output)
        result = output
        for name in self.active:
            if name in self and self[name].original_weight is None:  # a merged one is in the weight
                result = self[name].added_to(result, x, output, linear)
        return result

    def _routed(self, linear: nn.Linear, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Each adapter's share computed over the whole batch and kept in its own rows: a row's result
        then does not depend on how many rows share its adapter (a matmul's rounding depends on its
        row count), which a server needs to give each request the text it gives alone."""
        if x.shape[0] != len(self.routing):
            raise OrchardError(f"adapter_routing names {len(self.routing)} sequences, "
                               f"but the batch has {x.shape[0]}")
        result = output
        for name in dict.fromkeys(self.routing):
            if name is None or name not in self:
                continue
            rows = torch.tensor([n == name for n in self.routing], device=x.device)
            rows = rows.view(-1, *[1] * (output.dim() - 1))
            result = torch.where(rows, self[name].added_to(output, x, output, linear), result)
        return result


# --- model-level operations ----------------------------------------------------------------------


def _adapted(model: nn.Module) -> dict[str, tuple[nn.Linear, LoraAdapters]]:
    """Every adapted linear layer: name -> (layer, its adapters)."""
    return {name: (module, module.lora) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and isinstance(getattr(module, "lora", None), LoraAdapters)}


def _adapter_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(name for _, adapters in _adapted(model).values() for name in adapters))


def _require(model: nn.Module, names) -> None:
    known = _adapter_names(model)
    for name in names:
        if name not in known:
            raise OrchardError(f"no LoRA adapter named {name!r} (the model has {', '.join(known) or 'none'})")


def _merged(model: nn.Module) -> str | None:
    for _, adapters in _adapted(model).values():
        for name, adapter in adapters.items():
            if adapter.original_weight is not None:
                return name
    return None


def _layers_of(model: nn.Module, name: str) -> dict[str, tuple[nn.Linear, LoraAdapter]]:
    _require(model, [name])
    return {module: (linear, adapters[name]) for module, (linear, adapters) in _adapted(model).items()
            if name in adapters}


def _config_of(model: nn.Module, name: str) -> LoraConfig:
    return next(iter(_layers_of(model, name).values()))[1].config


def target_linears(model: nn.Module, patterns: list[str]) -> dict[str, nn.Linear]:
    """The linear layers `patterns` select (see LoraConfig.target_modules), by name."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except re.error as error:
            raise OrchardError(f"lora.target_modules: {pattern!r} is not a valid regex ({error})") from None
    uses = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoraAdapters, LoraAdapter)):
            continue
        if not any(name == p or name.endswith("." + p) or regex.fullmatch(name) for p, regex in compiled):
            continue
        if not isinstance(module, nn.Linear):
            raise OrchardError(f"lora.target_modules selects {name or 'the model'}, "
                               f"a {type(module).__name__}, not a linear layer")
        if uses[id(module.weight)] > 1:
            raise OrchardError(f"lora.target_modules selects {name}, whose weight is shared with another "
                               f"module (tied embeddings); LoRA on it is not supported")
        found[name] = module
    if not found:
        raise OrchardError(f"lora.target_modules {patterns} match no linear layer of the model")
    return found


def _attach(model: nn.Module, config: LoraConfig, name: str, layers: dict[str, nn.Linear],
            seed: int | None) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise OrchardError(f"adapter name {name!r}: must be a non-empty name without '.'")
    if hasattr(LoraAdapters(), name):
        raise OrchardError(f"adapter name {name!r} is reserved (an attribute of the adapters' module)")
    if name in _adapter_names(model):
        raise OrchardError(f"the model already has a LoRA adapter named {name!r}")
    merged = _merged(model)
    if merged is not None:
        # DoRA's magnitude starts from the base weight, which a merged adapter has changed.
        raise OrchardError(f"adapter {merged!r} is merged into the weights; unmerge it before adding another")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for linear in layers.values():
        if not isinstance(getattr(linear, "lora", None), LoraAdapters):
            linear.lora = LoraAdapters()
            linear.register_forward_hook(linear.lora.hook)
        linear.lora[name] = LoraAdapter(linear, config, generator)
        linear.lora.train(linear.training)  # dropout follows the model's mode, as for any new child
    set_active_adapters(model, name)


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default", seed: int | None = None) -> list[str]:
    """Add adapter `name` to every linear layer `config.target_modules` selects; returns their names.

    Every parameter already in the model is frozen; the new adapter becomes the active one, and the
    only trainable one. A starts as nn.Linear's kaiming-uniform init (from `seed` when given), B at
    zero, so the model computes exactly what it did before until B is trained."""
    layers = target_linears(model, config.target_modules)
    _attach(model, config, name, layers, seed)
    return list(layers)


def set_active_adapters(model: nn.Module, names: list[str] | str | None) -> None:
    """Apply `names` (summed, to every sequence of a batch), or no adapter with None. As in PEFT,
    the active adapters are the trainable ones: the others are frozen."""
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    _require(model, names)
    for _, adapters in _adapted(model).values():
        adapters.active = names
        for adapter_name, adapter in adapters.items():
            adapter.requires_grad_(adapter_name in names)


def active_adapter(model: nn.Module) -> str | None:
    """The one adapter the model computes with as loaded (an adapter checkpoint's), or None when none
    is active or it is merged into the weights. Serving and evaluation route each row to one adapter:
    several active at once is an error."""
    names = list(dict.fromkeys(name for _, adapters in _adapted(model).values() for name in adapters.active
                               if name in adapters and adapters[name].original_weight is None))
    if len(names) > 1:
        raise OrchardError(f"adapters {', '.join(names)} are active together; serving and evaluation apply one "
                           f"adapter per sequence (merge the others into the weights first)")
    return names[0] if names else None


@contextmanager
def adapter_routing(model: nn.Module, per_sequence: list[str | None]) -> Iterator[None]:
    """Within the block, row b of every batch uses adapter `per_sequence[b]` (None: the base model
    alone), whatever the active adapters are: many adapters served from one base in one batch."""
    per_sequence = list(per_sequence)
    _require(model, [name for name in dict.fromkeys(per_sequence) if name is not None])
    merged = _merged(model)
    if merged is not None:
        raise OrchardError(f"adapter {merged!r} is merged into the weights, which every row would see; "
                           f"unmerge it before routing")
    layers = [adapters for _, adapters in _adapted(model).values()]
    previous = [adapters.routing for adapters in layers]
    for adapters in layers:
        adapters.routing = per_sequence
    try:
        yield
    finally:
        for adapters, routing in zip(layers, previous):
            adapters.routing = routing


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into its layers' weights (W + s B @ A; DoRA m * (W + s B A) / ||W + s B A||),
    so it costs nothing at inference; its hook then adds nothing. The original weights are kept for
    `unmerge_adapter`. One adapter at a time: other active adapters then act on the merged weights."""
    layers = _layers_of(model, name)
    merged = _merged(model)
    if merged is not None:
        raise OrchardError(f"adapter {merged!r} is merged already; unmerge it first")
    with torch.no_grad():
        for linear, adapter in layers.values():
            adapter.original_weight = linear.weight.detach().clone()
            linear.weight.copy_(adapter.merged_weight(linear.weight))


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Put back the weights `merge_adapter` replaced, bit for bit."""
    layers = _layers_of(model, name)
    if any(adapter.original_weight is None for _, adapter in layers.values()):
        raise OrchardError(f"adapter {name!r} is not merged")
    with torch.no_grad():
        for linear, adapter in layers.values():
            linear.weight.copy_(adapter.original_weight)
            adapter.original_weight = None


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name`; a layer left with no adapter loses its `lora` child and its hook, and
    is the plain nn.Linear it was. A merged adapter stays in the weights: merging then removing is
    how an adapter is baked into the model (unmerge first to get the base back)."""
    for linear, adapter in _layers_of(model, name).values():
        adapters = linear.lora
        del adapters[name]
        adapters.active = [n for n in adapters.active if n != name]
        if not len(adapters):
            # The hook's handle would not survive a deep copy of the model; its owner identifies it.
            for key, hook in list(linear._forward_hooks.items()):
                if getattr(hook, "__self__", None) is adapters:
                    del linear._forward_hooks[key]
            del linear.lora


def adapter_state_dict(model: nn.Module, name: str) -> AdapterWeights:
    """Adapter `name`'s weights as `orchard.peft.format.save_lora_adapter` takes them:
    module name -> (A (r, in), B (out, r))."""
    layers = _layers_of(model, name)
    if _config_of(model, name).use_dora:
        raise OrchardError(f"adapter {name!r} uses DoRA, whose magnitudes the PEFT LoRA format orchard "
                           f"writes cannot hold; keep it in the model's state dict or merge it")
    return {module: (adapter.A.detach(), adapter.B.detach()) for module, (_, adapter) in layers.items()}


def load_adapter_weights(model: nn.Module, name: str, config: LoraConfig | LoraAdapterConfig,
                         weights: AdapterWeights) -> LoraConfig:
    """Add adapter `name` holding `weights` (module name -> (A, B), as `load_lora_adapter` returns
    them) to exactly those modules; returns its LoraConfig. With DoRA, the magnitudes start at the
    loaded update's row norms, so the adapter first computes what plain LoRA would."""
    if isinstance(config, LoraAdapterConfig):
        config = LoraConfig(r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                            target_modules=config.target_modules, use_rslora=config.use_rslora)
    if not weights:
        raise OrchardError(f"adapter {name!r}: no LoRA weights to load")
    modules = dict(model.named_modules())
    for module, (a, b) in weights.items():
        linear = modules.get(module)
        if not isinstance(linear, nn.Linear):
            raise OrchardError(f"LoRA weights for {module}, which is not a linear layer of the model")
        if tuple(a.shape) != (config.r, linear.in_features) or tuple(b.shape) != (linear.out_features, config.r):
            raise OrchardError(f"LoRA weights for {module}: A {tuple(a.shape)} and B {tuple(b.shape)}, but "
                               f"r={config.r} and the layer needs A {(config.r, linear.in_features)} and "
                               f"B {(linear.out_features, config.r)}")
    _attach(model, config, name, {module: modules[module] for module in weights}, seed=None)
    with torch.no_grad():
        for module, (a, b) in weights.items():
            adapter = modules[module].lora[name]
            adapter.A.copy_(a)
            adapter.B.copy_(b)
            if adapter.magnitude is not None:
                adapter.magnitude.copy_(adapter.row_norm(modules[module].weight))
    return config


def _peft_targets(model: nn.Module, adapted: list[str]) -> list[str]:
    """target_modules for PEFT: the layers' short names where they select exactly the adapted
    layers, their full names otherwise (PEFT would add zero adapters to the others)."""
    short = sorted({module.rsplit(".", 1)[-1] for module in adapted})
    selected = {name for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in short}
    return short if selected == set(adapted) else sorted(adapted)


def save_adapter(model: nn.Module, name: str, directory: str | Path,
                 base_model_name_or_path: str | None = None, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter `name` as a PEFT adapter directory (plain LoRA and rsLoRA; not DoRA), which
    `peft.PeftModel.from_pretrained` loads on the exported base model. `tensors`: the adapter's
    whole tensors by state-dict name, when the model holds only shards of them."""
    weights = adapter_state_dict(model, name)
    if tensors is not None:
        weights = {module: (tensors[f"{module}.lora.{name}.A"], tensors[f"{module}.lora.{name}.B"])
                   for module in weights}
    config = _config_of(model, name)
    save_lora_adapter(directory, LoraAdapterConfig(
        r=config.r, lora_alpha=config.alpha, target_modules=_peft_targets(model, list(weights)),
        lora_dropout=config.dropout, use_rslora=config.use_rslora, base_model_name_or_path=base_model_name_or_path,
    ), weights)


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> LoraConfig:
    """Add the PEFT LoRA adapter in `directory` to the model as adapter `name` (active); returns its
    config."""
    config, weights = load_lora_adapter(directory)
    return load_adapter_weights(model, name, config, weights)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """Every adapter on the model and its config, by name."""
    return {name: _config_of(model, name) for name in _adapter_names(model)}


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)
