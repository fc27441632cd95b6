"""Prefix tuning (Li & Liang 2021): learned keys and values that every query of every layer attends
to, as if P virtual tokens preceded each sequence; the model's weights stay frozen and unrenamed.

The prefixes reach attention through the model's one generic hook, `Attention.extra_kv`: each
attention layer gets a child `prefix` holding its keys and values, and the hook hands them to the
layer, which places them before the sequence's own keys with P always-visible mask columns. Their
tensors live under the layer's name:

    model.layers.0.self_attn.prefix.key      (num_kv_heads, P, head_dim)
    model.layers.0.self_attn.prefix.value    (num_kv_heads, P, head_dim)

With `projection_hidden` set, the prefixes are instead computed by Li & Liang's reparametrisation
(PEFT's `prefix_projection`), one module for the whole model, laid out as PEFT's `PrefixEncoder`:

    model.prefix.embedding.weight            (P, num_kv_heads * head_dim)
    model.prefix.transform.0.weight/bias     Linear(num_kv_heads * head_dim, projection_hidden), then tanh
    model.prefix.transform.2.weight/bias     Linear(projection_hidden, layers * 2 * num_kv_heads * head_dim)

which trains more stably; `fold_prefix_projection` then replaces it by the plain per-layer prefixes
it computes, as Li & Liang do after training. Every prefix tensor's name contains ".prefix.".

Positions. The virtual tokens have no position: their keys are used as learned, without rotary, and
the real tokens keep positions 0, 1, ... as without a prefix (so packing, padding and the KV cache
work unchanged, and the cache holds real tokens only: its length is the sequence's). PEFT instead
puts the prefix in the KV cache, so the real tokens start at position P there. Rotary scores depend
only on the difference of positions, and the prefix keys are free parameters, so the two are the
same family of functions: a PEFT prefix key k equals an orchard one rotated by -P positions
(R(P + i) q . k = R(i) q . R(-P) k), and values are the same in both.

Initialisation. As Li & Liang recommend, the prefixes start as the keys and values the model itself
computes for P real tokens (`init_token_ids`, e.g. a task description, or tokens drawn at random):
in distribution for every layer, so training starts from a model that behaves as if given a short
prompt. (With the projection, its last linear layer starts as the least-squares fit that computes them.)
Unlike LoRA or adapters, a prefix therefore changes the output from the start.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OrchardError
from ..model.transformer import Attention


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 16
    """P, the number of virtual tokens every layer's queries attend to."""
    projection_hidden: int | None = None
    """Width of Li & Liang's reparametrisation MLP (PEFT's encoder_hidden_size); None learns the
    prefixes directly."""
    init_token_ids: list[int] | None = None
    """P token ids whose keys and values the prefixes start as; None draws them at random."""

    def __post_init__(self) -> None:
        p = self.num_virtual_tokens
        if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
            raise OrchardError(f"prefix.num_virtual_tokens must be a positive integer, got {p!r}")
        h = self.projection_hidden
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h <= 0):
            raise OrchardError(f"prefix.projection_hidden must be a positive integer or None, got {h!r}")
        if self.init_token_ids is not None:
            ids = list(self.init_token_ids)
            if len(ids) != p or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise OrchardError(f"prefix.init_token_ids must be {p} token ids (num_virtual_tokens), "
                                   f"got {self.init_token_ids!r}")
            self.init_token_ids = ids


class PrefixKV(nn.Module):
    """One attention layer's prefix (its child `prefix`): (K, P, D) keys and values."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.key = nn.Parameter(key)
        self.value = nn.Parameter(value)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's `extra_kv` hook (a bound method, so a deep copy of the model hooks the copy)."""
        return self.key, self.value


class PrefixEncoder(nn.Module):
    """Li & Liang's reparametrisation: every layer's prefix from one embedding through a tanh MLP,
    with PEFT's `PrefixEncoder` layout (output row layout: layer, key|value, head, dimension)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, config: PrefixConfig,
                 generator: torch.Generator | None, device: torch.device, dtype: torch.dtype):
        super().__init__()
        width = num_kv_heads * head_dim
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.embedding = nn.Embedding(config.num_virtual_tokens, width, device=device, dtype=dtype)
        self.transform = nn.Sequential(nn.Linear(width, config.projection_hidden, device=device, dtype=dtype),
                                       nn.Tanh(),
                                       nn.Linear(config.projection_hidden, num_layers * 2 * width,
                                                 device=device, dtype=dtype))
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(self.embedding.weight.shape, generator=generator))
            first = self.transform[0]
            bound = 1 / width ** 0.5  # nn.Linear's init (its kaiming-uniform weight has the same bound)
            first.weight.copy_(torch.empty(first.weight.shape).uniform_(-bound, bound, generator=generator))
            first.bias.copy_(torch.empty(first.bias.shape).uniform_(-bound, bound, generator=generator))

    @torch.no_grad()
    def start_at(self, prefixes: torch.Tensor) -> None:
        """Set the last linear layer so the encoder computes `prefixes` (L, 2, K, P, D): its bias the
        mean over the P tokens, its weight the least-squares (minimum-norm) fit of the rest from the
        tanh features, which is exact when projection_hidden >= P (the P feature rows are then
        independent, but for measure-zero bad luck)."""
        last = self.transform[2]
        P = prefixes.shape[3]
        target = prefixes.permute(3, 0, 1, 2, 4).reshape(P, -1).double()            # (P, L 2 K D)
        hidden = torch.tanh(self.transform[0](self.embedding.weight)).double()      # (P, hidden)
        bias = target.mean(0)
        weight = torch.linalg.pinv(hidden) @ (target - bias)                        # (hidden, L 2 K D)
        last.bias.copy_(bias)
        last.weight.copy_(weight.T)

    def layer_kv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s (K, P, D) keys and values: only its rows of the last linear layer."""
        first, last = self.transform[0], self.transform[2]
        hidden = torch.tanh(first(self.embedding.weight))                          # (P, hidden)
        rows = slice(2 * layer * self.num_kv_heads * self.head_dim, 2 * (layer + 1) * self.num_kv_heads * self.head_dim)
        out = F.linear(hidden, last.weight[rows], last.bias[rows])                  # (P, 2 K D)
        out = out.view(-1, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2, K, P, D)
        return out[0], out[1]


# --- model-level operations ----------------------------------------------------------------------


def _attention_layers(model: nn.Module) -> list[Attention]:
    layers = sorted((m for m in model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_index)
    if not layers:
        raise OrchardError("prefix tuning needs orchard attention layers; the model has none")
    return layers


def _hook_owner(hook) -> object:
    """The module a prefix hook belongs to (a PrefixKV's bound method, or a partial of a
    PrefixEncoder's), or None for anything else."""
    if isinstance(hook, functools.partial):
        hook = hook.func
    owner = getattr(hook, "__self__", None)
    return owner if isinstance(owner, (PrefixKV, PrefixEncoder)) else None


def has_prefix(model: nn.Module) -> bool:
    return any(_hook_owner(layer.extra_kv) is not None for layer in _attention_layers(model))


@torch.no_grad()
def _token_kv(model: nn.Module, token_ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's (K, P, D) keys and values for `token_ids` run as a sequence, read from a KV cache."""
    was_training = model.training
    model.eval()  # no dropout in adapters the model may carry
    try:
        device = model.lm_head.weight.device
        cache = model.new_cache(1, len(token_ids))
        model(torch.tensor([token_ids], device=device), cache=cache)
    finally:
        model.train(was_training)
    return [k[0].float() for k in cache.keys], [v[0].float() for v in cache.values]


def add_prefix(model: nn.Module, config: PrefixConfig, seed: int | None = None) -> list[str]:
    """Give every attention layer a trainable prefix of `config.num_virtual_tokens` keys and values;
    returns the attention layers' names.

    Every parameter already in the model is frozen and the prefix is the only trainable part. The
    prefixes start as the model's own keys and values for `config.init_token_ids` (or for tokens
    drawn at random from `seed`)."""
    layers = _attention_layers(model)
    if any(layer.extra_kv is not None for layer in layers):
        raise OrchardError("the model's attention already has extra keys/values (a prefix?); remove them first")
    model_config = model.config
    P = config.num_virtual_tokens
    if P > model_config.max_position_embeddings:
        raise OrchardError(f"prefix.num_virtual_tokens={P} exceeds the model's {model_config.max_position_embeddings} "
                           f"positions, which initialising it from token activations needs")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    token_ids = config.init_token_ids
    if token_ids is None:
        token_ids = torch.randint(0, model_config.vocab_size, (P,), generator=generator).tolist()
    elif max(token_ids) >= model_config.vocab_size:
        raise OrchardError(f"prefix.init_token_ids: {max(token_ids)} is not below the vocabulary size "
                           f"{model_config.vocab_size}")
    keys, values = _token_kv(model, token_ids)

    reference = layers[0].k_proj.weight
    dtype = torch.promote_types(reference.dtype, torch.float32)  # float32 prefixes on half-precision bases
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.projection_hidden is None:
        for layer in layers:
            i = layer.layer_index
            layer.prefix = PrefixKV(keys[i].to(reference.device, dtype), values[i].to(reference.device, dtype)
                                    ).train(layer.training)
            layer.extra_kv = layer.prefix.kv
        return _names(model, layers)
    stack = model.model
    if hasattr(stack, "prefix"):
        raise OrchardError("the model's decoder stack already has an attribute named 'prefix'")
    encoder = PrefixEncoder(len(layers), layers[0].num_kv_heads, layers[0].head_dim, config, generator,
                            reference.device, dtype)
    encoder.start_at(torch.stack([torch.stack([keys[layer.layer_index], values[layer.layer_index]])
                                  for layer in layers]))
    stack.prefix = encoder.train(stack.training)
    for layer in layers:
        layer.extra_kv = functools.partial(encoder.layer_kv, layer.layer_index)
    return _names(model, layers)


def _names(model: nn.Module, layers: list[Attention]) -> list[str]:
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] for layer in layers]


@torch.no_grad()
def fold_prefix_projection(model: nn.Module) -> None:
    """Replace the reparametrisation MLP by the per-layer prefixes it computes now (Li & Liang keep
    only these after training): the same function, without the MLP's cost or parameters."""
    stack = getattr(model, "model", None)
    encoder = getattr(stack, "prefix", None)
    if not isinstance(encoder, PrefixEncoder):
        raise OrchardError("the model has no prefix projection to fold")
    for layer in _attention_layers(model):
        key, value = encoder.layer_kv(layer.layer_index, encoder.embedding.weight)
        layer.prefix = PrefixKV(key.detach().clone(), value.detach().clone()).train(layer.training)
        layer.prefix.requires_grad_(encoder.embedding.weight.requires_grad)
        layer.extra_kv = layer.prefix.kv
    del stack.prefix


def remove_prefix(model: nn.Module) -> None:
    """Delete the prefixes and their hooks: attention is again exactly what it was (the base stays
    frozen, as after `remove_adapter` for LoRA)."""
    for layer in _attention_layers(model):
        if _hook_owner(layer.extra_kv) is not None:
            layer.extra_kv = None
        if isinstance(getattr(layer, "prefix", None), PrefixKV):
            del layer.prefix
    stack = getattr(model, "model", None)
    if isinstance(getattr(stack, "prefix", None), PrefixEncoder):
        del stack.prefix
