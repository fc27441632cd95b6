"""A decoder-only transformer of the Llama/Qwen2/Qwen3 family, and its KV cache.

Pre-norm RMSNorm, rotary position embeddings (optionally Llama 3.1- or linearly scaled), SwiGLU MLP,
grouped-query attention through `scaled_dot_product_attention`, optional q/k/v bias (Qwen2), optional
per-head q/k RMSNorm (Qwen3), tied or untied embeddings. One generic hook, `Attention.extra_kv`,
lets a parameter-efficient method (prefix tuning) add keys and values that every query attends to.
Module and parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
state dict moves between orchard and `transformers` without renaming.

This file knows nothing about training: no losses, no optimizers. Shapes in comments use
B batch, T new tokens, S tokens attended to (cache + new), H query heads, K key/value heads,
D head dimension.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from ..losses.tokens import linear_token_cross_entropy, linear_token_log_probs, token_cross_entropy, token_log_probs
from .attention import (BlockMask, attention, document_block_mask, document_mask, kernel_mask, packed_attention,
                        uses_flex)
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses too much in bf16.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The (head_dim / 2,) rotation speeds, in float64, stretched as `scaling` says (see
    `ModelConfig.rope_scaling`); the same formulas as transformers' `modeling_rope_utils`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: wavelengths longer than the pretraining context (/ low_freq_factor) slow down by
        # `factor`, those shorter than it / high_freq_factor stay, and the ones between are interpolated.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelength - low) / (high - low)
        between = (wavelength >= context / high) & (wavelength <= context / low)
        return torch.where(between, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, indexed by position id (so left padding and packed
    sequences get the right rotation)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        if self.cos.device.type != "meta":  # on the meta device there is nothing to compute until reset()
            self.reset()

    def reset(self) -> None:
        """Compute the tables (again, after a model built on the meta device is materialised)."""
        inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling)
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)  # (max_positions, D/2)
        device = self.cos.device if self.cos.device.type != "meta" else None
        # Llama's half-split layout: frequency i turns dimensions i and i + D/2. Doubled after the
        # cast to float32, which keeps the float64 temporaries small for 128k-position models.
        self.cos = angles.cos().float().repeat(1, 2).to(device)
        self.sin = angles.sin().float().repeat(1, 2).to(device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T) -> two (B, 1, T, D) tables that broadcast over heads
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


class KVCache:
    """Keys and values of every layer, preallocated for `max_length` positions.

    Each layer writes its new keys/values at `length` and reads back everything up to there; the
    model advances `length` once per forward pass, after all layers have written.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, config.num_key_value_heads, max_length, config.resolved_head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_length = max_length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. to drop finished sequences)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]

    def advance(self, tokens: int) -> None:
        self.length += tokens


class StaticKVCache:
    """Keys and values of every layer in buffers of a fixed `max_length`, for a compiled decoding
    step: a pass writes its keys and values at the slots in `positions` (a tensor the caller sets,
    so no shape or Python number changes from one step to the next) and attends over all the slots,
    the caller's (B, 1, T, max_length) mask hiding those not written yet. The model's forward then
    needs `position_ids` and that mask; `length` stays 0."""

    length = 0

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, config.num_key_value_heads, max_length, config.resolved_head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        if torch.device(device).type == "cuda":
            # A CUDA graph of the decoding step then writes into these buffers, not into copies of them
            # (as transformers' StaticCache does).
            for buffer in (*self.keys, *self.values):
                torch._dynamo.mark_static_address(buffer)
        self.positions = torch.zeros(1, dtype=torch.long, device=device)
        self.max_length = max_length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer][:, :, self.positions] = k
        self.values[layer][:, :, self.positions] = v
        return self.keys[layer], self.values[layer]

    def advance(self, tokens: int) -> None:
        """The caller moves `positions`."""


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        d, q, kv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, q, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, kv, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(q, d, bias=False)
        # Qwen3 normalises each head's queries and keys (over D) before the rotation.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        # Extra keys/values every query may attend to (prefix tuning sets it; None, the default, adds
        # nothing): called with the layer's input x (B, T, d), it returns (keys, values), each
        # (K, P, D), (1, K, P, D) or (B, K, P, D), placed before the sequence's keys as they are: not
        # rotated (the sequence's positions still start at 0), not written to the cache (whose length
        # counts real tokens only), and visible to every query whatever the mask. A plain attribute,
        # not a module, so it adds nothing to the state dict.
        self.extra_kv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | BlockMask | None, cache: KVCache | StaticKVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)                      # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)                   # (B, T, K, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                                       # (B, H|K, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if getattr(cache, "attends", False):
            # A cache that attends itself (the server's, whose rows have lengths of their own).
            return self.o_proj(cache.attend(self.layer_index, q, k, v).transpose(1, 2).reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)                                   # (B, K, S, D)
        if isinstance(mask, BlockMask):  # packed documents through FlexAttention (model/attention.py)
            return self.o_proj(packed_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))
        if self.extra_kv is not None:
            k, v, mask = self._with_extra_kv(x, k, v, mask)                               # (B, K, P+S, D)
        if self.num_kv_heads != self.num_heads:
            # Each key/value head serves a group of query heads.
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)    # (B, H, S, D)
        if mask is None and T == 1:
            # A single query (a decoding step) sees every cached key, which a causal mask aligned to
            # the first key would hide.
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _with_extra_kv(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`extra_kv`'s P keys/values before the S others, and the mask with P visible columns first."""
        extra_k, extra_v = self.extra_kv(x)
        B, _, S, _ = k.shape
        T = x.shape[1]
        k = torch.cat([extra_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([extra_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        if mask is None:  # SDPA's is_causal would align the diagonal to the extra keys: spell it out
            mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(S - T)[None, None]
        visible = torch.ones if mask.dtype == torch.bool else torch.zeros  # boolean or additive mask
        extra = visible(*mask.shape[:-1], extra_k.shape[-2], dtype=mask.dtype, device=mask.device)
        return k, v, torch.cat([extra, mask], dim=-1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embeddings, blocks and final norm: Hugging Face's `model.` prefix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # Given a `_weight`, nn.Embedding skips its own initialisation, which CausalLM.reset_parameters
        # redoes anyway and which on the meta device costs a second of torch's lazy imports.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.resolved_head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    """(B, T, vocab) next-token logits (only the last `logits_to_keep` positions when asked; None
    with compute_logits=False)."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """The embeddings and each layer's output, the last one after the final norm (as Hugging Face)."""
    cache: KVCache | StaticKVCache | None = None
    scores: torch.Tensor | None = None
    """(B, T, num_labels) outputs of the score head at every position, when the model has one."""
    loss: torch.Tensor | None = None
    """With `labels`: the summed next-token cross-entropy (`losses.tokens.token_cross_entropy`)."""
    log_probs: torch.Tensor | None = None
    """With `log_probs_of`: each target's log-probability (`losses.tokens.token_log_probs`)."""


def _run_block(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | BlockMask | None, cache: KVCache | StaticKVCache | None) -> torch.Tensor:
    return layer(x, cos, sin, mask, cache)


@functools.cache
def _compiled_block() -> Callable:
    """`_run_block` compiled: one compilation serves every block (their weights are its inputs) and
    every batch shape (compiled for symbolic shapes from the start, as fast here as for one shape,
    which would compile twice: for the first shape, then for any)."""
    return torch.compile(_run_block, dynamic=True)


def causal_mask(attention_mask: torch.Tensor | None, position_ids: torch.Tensor, past_length: int,
                total_length: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: query i may see key j when j is not padding and j <= i.

    `attention_mask` is (B, S) with 1 for real tokens over the cache and the new tokens, the
    convention `transformers` uses for left-padded batches.
    """
    B, T = position_ids.shape
    device = position_ids.device
    query_index = torch.arange(past_length, past_length + T, device=device)
    key_index = torch.arange(total_length, device=device)
    mask = (key_index[None, :] <= query_index[:, None])[None, None]          # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :total_length].bool()    # (B, 1, T, S)
        # A fully padded query row would make softmax return NaN; let it see itself instead.
        mask = mask | (key_index[None, :] == query_index[:, None])[None, None]
    return mask.expand(B, 1, T, total_length)


class CausalLM(nn.Module):
    """The language model: `model.*` (the decoder stack) and `lm_head`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if config.num_labels:
            self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.checkpoint_every = 0  # recompute every k-th block's activations (set_activation_checkpointing)
        self.compiled_blocks = False
        """Run each decoder block compiled in passes with gradients and no cache (training): regional
        compilation, as torchtitan's, which lets batches change shape, unlike compiling the whole model
        with its loss (`train.compile` for methods whose batches do)."""
        self.packed_attention = "auto"
        """How packed documents attend (`document_ids`): auto, flex or mask (see model/attention.py)."""
        if self.lm_head.weight.device.type != "meta":  # a model built on the meta device is about to be loaded
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms (as Llama). A sharded model
        (FSDP2, built on the meta device) gets in each process its shards of the same weights: each
        whole weight is drawn on the CPU, one at a time, and this process keeps its part."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    weight = torch.empty(module.weight.shape).normal_(0.0, std, generator=generator)
                    if isinstance(module.weight, DTensor):
                        weight = distribute_tensor(weight.to(module.weight.device), module.weight.device_mesh,
                                                   module.weight.placements, src_data_rank=None)
                    module.weight.copy_(weight)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | StaticKVCache | None = None,
                output_hidden_states: bool = False, logits_to_keep: int = 0,
                compute_logits: bool = True, document_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, log_probs_of: torch.Tensor | None = None,
                temperature: float = 1.0) -> ModelOutput:
        """`attention_mask` is either (B, S) with 1 for real tokens (padding) or a boolean (B, 1, T, S)
        mask used as is; `position_ids` default to 0.. after any padding. `document_ids` (B, T) makes
        packed documents attend only within themselves (-1 at padding; model/attention.py).
        `compute_logits=False` skips the output projection (a reward model needs only its scores).
        `labels` (B, T), aligned with the logits (see `token_cross_entropy`), adds their summed loss;
        a plain output projection then computes it with the loss, a chunk of rows at a time, and
        the (B, T, vocab) logits are never made (`logits` is None). `log_probs_of` (B, T), aligned the
        same way, gives each target's log-probability at `temperature` (DPO's and RL's), computed the
        same way."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        explicit_mask = attention_mask is not None and attention_mask.dim() == 4
        if position_ids is None:
            if attention_mask is not None and not explicit_mask:
                # Left padding: a sequence's first real token is position 0.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        # Plain causal attention over a fresh sequence takes SDPA's fast is_causal path.
        if document_ids is not None:
            prefixed = any(layer.self_attn.extra_kv is not None for layer in self.model.layers)
            flex = uses_flex(self.packed_attention, input_ids.device) and not prefixed and cache is None
            mask = document_block_mask(document_ids) if flex else document_mask(document_ids)
        elif explicit_mask:
            mask = attention_mask.bool()  # (B, 1, T, S) built by the caller, e.g. block-diagonal for packed sequences
        elif attention_mask is not None or (past > 0 and T > 1):
            mask = causal_mask(attention_mask, position_ids, past, past + T)
        else:
            mask = None  # causal over the new tokens; one new token sees every key (see Attention)
        mask = kernel_mask(mask)

        stack = self.model
        x = stack.embed_tokens(input_ids)                                           # (B, T, d)
        cos, sin = stack.rotary(position_ids)
        hidden_states = [x] if output_hidden_states else None
        training = torch.is_grad_enabled() and cache is None
        recompute = self.checkpoint_every and self.training and training
        run = _compiled_block() if self.compiled_blocks and training else _run_block
        for index, layer in enumerate(stack.layers):
            if recompute and index % self.checkpoint_every == 0:
                x = checkpoint(run, layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = run(layer, x, cos, sin, mask, cache)
            if output_hidden_states:
                hidden_states.append(x)
        x = stack.norm(x)
        if output_hidden_states:
            hidden_states[-1] = x
        if cache is not None:
            cache.advance(T)
        scores = self.score(x) if self.config.num_labels else None
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        loss = log_probs = None
        targets = labels is not None or log_probs_of is not None
        if targets and self._plain_head():
            logits = None
            if labels is not None:
                loss = linear_token_cross_entropy(x, self.lm_head.weight, labels)
            if log_probs_of is not None:
                log_probs = linear_token_log_probs(x, self.lm_head.weight, log_probs_of, temperature)
        else:
            logits = self.lm_head(x) if compute_logits or targets else None
            if labels is not None:
                loss = token_cross_entropy(logits, labels)
            if log_probs_of is not None:
                log_probs = token_log_probs(logits, log_probs_of, temperature)
        return ModelOutput(logits=logits, hidden_states=tuple(hidden_states) if hidden_states else None,
                           cache=cache, scores=scores, loss=loss, log_probs=log_probs)

    def _plain_head(self) -> bool:
        """Whether the output projection is a bare weight (no bias, no adapter or quantization hooked
        on it), which the fused head-and-loss can use directly."""
        head = self.lm_head
        return type(head) is nn.Linear and head.bias is None and not head._forward_hooks \
            and not head._forward_pre_hooks and not head._modules

    def set_activation_checkpointing(self, every: int) -> None:
        """Keep only the input of every `every`-th block during training and recompute its
        activations in the backward pass (0 turns it off): less memory for about a third more
        compute. Only the forward pass changes, so gradients are the same and the weights' names too."""
        if every < 0:
            raise ValueError(f"activation checkpointing every {every} blocks: expected 0 or more")
        self.checkpoint_every = every

    def add_score_head(self, num_labels: int = 1, seed: int | None = None) -> None:
        """Give the model a `score` head (a reward model's or a value function's), initialised as
        the other weights; it is trainable even when the rest of the model is frozen."""
        self.config.num_labels = num_labels
        parameter = self.lm_head.weight
        self.score = nn.Linear(self.config.hidden_size, num_labels, bias=False, device=parameter.device)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            self.score.weight.copy_(torch.empty(self.score.weight.shape).normal_(
                0.0, self.config.initializer_range, generator=generator))

    def new_cache(self, batch_size: int, max_length: int, static: bool = False) -> KVCache | StaticKVCache:
        """A KV cache in the dtype the model computes in; `static`: a StaticKVCache."""
        parameter = self.lm_head.weight
        dtype = torch.get_autocast_dtype(parameter.device.type) if torch.is_autocast_enabled(parameter.device.type) \
            else parameter.dtype
        kind = StaticKVCache if static else KVCache
        return kind(self.config, batch_size, max_length, dtype=dtype, device=parameter.device)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        return self.config.num_parameters(include_embeddings)
