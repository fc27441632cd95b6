"""Growing a trained model into a larger one, reusing what it learned instead of starting afresh.

Each function takes a `CausalLM` and returns a NEW one (float32, with a new `ModelConfig`), leaving
its input untouched. Except where said, the grown model computes exactly the function its parent
did (the same logits, up to float rounding), so training continues from the parent's loss rather
than from a random model's, and the extra capacity is free to learn what the parent could not:

- depth (LLaMA Pro, Wu et al. 2024): each new block is a copy of the block below it with `o_proj`
  and `down_proj` zeroed, so it adds nothing to the residual stream until it is trained. The other
  method, `stack` (G_stack, Du et al. 2024), repeats the whole stack; it is NOT function preserving
  (every copy adds to the residual stream again) but is the better start measured in that paper.
- MLP width: new SwiGLU units whose `down_proj` columns are zero, or (Net2Net, Chen et al. 2016)
  copies of existing units with each copied unit's `down_proj` column split between it and its copies.
- attention heads: new query heads whose `o_proj` columns are zero; under grouped-query attention
  the group size is kept by adding whole key/value groups.
- hidden size: new residual dimensions that stay exactly zero: nothing writes to them (zero
  embedding columns, zero new output rows of `o_proj` and `down_proj`) and the RMSNorms are rescaled
  so that averaging over the extra zeros leaves their outputs as they were.

A zero weight has a non-zero gradient wherever what it multiplies is not zero, so the new parts
learn from the first step. Where a new weight only ever multiplies zeros (the columns that read
the new residual dimensions, the query rows of new heads) it gets the model's own random
initialisation instead: were both it and what it multiplies zero, neither would ever get a gradient.

`grow` applies any combination (width first, then depth) and says which parameters are entirely
new (the inserted blocks), for training only those. This module knows nothing about checkpoints or
training; `orchard.checkpoint.grow` wraps it for `orchard grow`.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from .config import ModelConfig
from .transformer import CausalLM

DEPTH_METHODS = ("identity", "stack")
MLP_METHODS = ("zero", "net2net")

State = dict[str, torch.Tensor]


# --- the checks and plans, on configs alone (no weights needed) --------------------------------


def insert_positions(num_layers: int, new_layers: int) -> list[int]:
    """Where LLaMA Pro puts `new_layers` blocks among `num_layers`: the old blocks split into
    `new_layers` groups as even as can be, one new block after each group (4 + 2 -> [b0 b1 N b2 b3 N]).
    Returns the new blocks' indices in the grown stack."""
    positions = []
    for i in range(new_layers):
        before = -(-(i + 1) * num_layers // new_layers)  # old blocks below the i-th new one: ceil((i+1) L / n)
        positions.append(before + i)
    return positions


def depth_plan(num_layers: int, target: int, positions: list[int] | None = None,
               method: str = "identity") -> tuple[list[int], list[int]]:
    """(sources, new): for each block of the grown stack, the index of the old block it copies, and
    the indices of the inserted blocks. Raises ValueError naming the bad argument."""
    if method not in DEPTH_METHODS:
        raise ValueError(f"depth_method: {method!r} is not one of {', '.join(DEPTH_METHODS)}")
    if target < num_layers:
        raise ValueError(f"layers: {target} is fewer than the model's {num_layers} (growing never removes blocks)")
    if method == "stack":
        if positions is not None:
            raise ValueError("positions: only for depth_method identity (stack repeats the whole stack)")
        if target % num_layers:
            raise ValueError(f"layers: depth_method stack repeats the whole stack, so {target} must be a multiple "
                             f"of the model's {num_layers}")
        return [i % num_layers for i in range(target)], list(range(num_layers, target))
    new_layers = target - num_layers
    if positions is None:
        positions = insert_positions(num_layers, new_layers)
    else:
        positions = [int(p) for p in positions]
        if len(positions) != new_layers:
            raise ValueError(f"positions: {len(positions)} given for {new_layers} new blocks "
                             f"({num_layers} -> {target} layers)")
        if len(set(positions)) != len(positions):
            raise ValueError(f"positions: {positions} repeats an index")
        if any(not 0 <= p < target for p in positions):
            raise ValueError(f"positions: indices in the grown stack run from 0 to {target - 1}, got {positions}")
        positions = sorted(positions)
    inserted = set(positions)
    sources, old = [], 0
    for index in range(target):
        if index in inserted:
            # A copy of the block just below; a new first block has none and copies the one above.
            sources.append(max(old - 1, 0))
        else:
            sources.append(old)
            old += 1
    return sources, positions


def kv_plan(config: ModelConfig, num_attention_heads: int, num_key_value_heads: int | None = None
            ) -> tuple[int, list[int | None]]:
    """(new kv head count, source): for each key/value head of the grown model, the old head whose
    keys and values it repeats, or None for a new one. Query head h uses key/value head h // group;
    the old query heads keep their keys and values when the new group size divides the old one (the
    default keeps it; a smaller one duplicates old key/value heads). Raises ValueError naming the
    bad argument."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv_heads
    if num_attention_heads < heads:
        raise ValueError(f"num_attention_heads: {num_attention_heads} is fewer than the model's {heads}")
    if num_key_value_heads is None:
        if num_attention_heads % group:
            raise ValueError(f"num_attention_heads: {num_attention_heads} is not a multiple of {group}, the query "
                             f"heads per key/value head ({heads} / {kv_heads}), which growing keeps")
        num_key_value_heads = num_attention_heads // group
    if num_key_value_heads < kv_heads:
        raise ValueError(f"num_key_value_heads: {num_key_value_heads} is fewer than the model's {kv_heads}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(f"num_key_value_heads: {num_key_value_heads} does not divide the "
                         f"{num_attention_heads} query heads")
    new_group = num_attention_heads // num_key_value_heads
    if group % new_group:
        raise ValueError(f"num_key_value_heads: {num_key_value_heads} puts {new_group} query heads on each "
                         f"key/value head; the model's {group} per head must be a multiple of that for its "
                         f"heads to keep their keys and values")
    kept = heads // new_group  # key/value heads serving the old query heads
    return num_key_value_heads, [j * new_group // group if j < kept else None for j in range(num_key_value_heads)]


def grown_config(config: ModelConfig, layers: int | None = None, hidden_size: int | None = None,
                 intermediate_size: int | None = None, num_attention_heads: int | None = None,
                 num_key_value_heads: int | None = None, depth_method: str = "identity",
                 positions: list[int] | None = None, mlp_method: str = "zero") -> ModelConfig:
    """The config `grow` would produce, checking every argument first (ValueError naming it), so a
    caller can refuse bad values before loading any weights."""
    if mlp_method not in MLP_METHODS:
        raise ValueError(f"mlp_method: {mlp_method!r} is not one of {', '.join(MLP_METHODS)}")
    if depth_method not in DEPTH_METHODS:
        raise ValueError(f"depth_method: {depth_method!r} is not one of {', '.join(DEPTH_METHODS)}")
    if positions is not None and layers is None:
        raise ValueError("positions: given without layers")
    new = copy.deepcopy(config)
    if hidden_size is not None:
        grown = _hidden_config(new, hidden_size)
        new = grown if hidden_size != config.hidden_size else new
    if num_attention_heads is not None or num_key_value_heads is not None:
        heads = new.num_attention_heads if num_attention_heads is None else num_attention_heads
        kv, _ = kv_plan(new, heads, num_key_value_heads)
        if (heads, kv) != (new.num_attention_heads, new.num_key_value_heads):
            new = dataclasses.replace(new, num_attention_heads=heads, num_key_value_heads=kv,
                                      head_dim=new.resolved_head_dim)
    if intermediate_size is not None:
        if intermediate_size < config.intermediate_size:
            raise ValueError(f"intermediate_size: {intermediate_size} is smaller than the model's "
                             f"{config.intermediate_size}")
        new = dataclasses.replace(new, intermediate_size=intermediate_size)
    if layers is not None:
        depth_plan(config.num_hidden_layers, layers, positions, depth_method)
        new = dataclasses.replace(new, num_hidden_layers=layers)
    return new


def _hidden_config(config: ModelConfig, hidden_size: int) -> ModelConfig:
    if hidden_size < config.hidden_size:
        raise ValueError(f"hidden_size: {hidden_size} is smaller than the model's {config.hidden_size}")
    # head_dim is spelled out: hidden_size / heads no longer gives it. rms_norm_eps scales with the
    # mean of squares it is added to (see grow_hidden).
    return dataclasses.replace(config, hidden_size=hidden_size, head_dim=config.resolved_head_dim,
                               rms_norm_eps=config.rms_norm_eps * config.hidden_size / hidden_size)


# --- the weights -------------------------------------------------------------------------------


def _plain_state(model: CausalLM) -> State:
    """A float32 CPU copy of the model's weights, refusing anything but a plain model: an adapter's
    or a quantized layer's tensors would not be grown."""
    with torch.device("meta"):
        expected = set(CausalLM(model.config).state_dict())
    state = model.state_dict()
    if set(state) != expected:
        extra, missing = set(state) - expected, expected - set(state)
        odd = f"it has {min(extra)}" if extra else f"it lacks {min(missing)}"
        raise ValueError(f"model: growing needs a plain model (no adapters, not quantized); {odd}")
    return {name: tensor.detach().to("cpu", torch.float32, copy=True) for name, tensor in state.items()}


def _build(config: ModelConfig, state: State, like: CausalLM) -> CausalLM:
    """A model of `config` holding `state`, on `like`'s device and in its train/eval mode."""
    with torch.device("meta"):
        model = CausalLM(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)  # shapes are checked against the config
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.reset()
    device = like.lm_head.weight.device
    return model.to(device if device.type != "meta" else "cpu").train(like.training)


def _normal(rows: int, columns: int, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(rows, columns).normal_(0.0, std, generator=generator)


def grow_depth(model: CausalLM, num_layers: int, positions: list[int] | None = None,
               method: str = "identity") -> CausalLM:
    """`num_layers` blocks in all. `identity` (function preserving, LLaMA Pro): new blocks at
    `positions` (indices in the grown stack; default one after every L/n-th block, see
    `insert_positions`), each a copy of the block just below it (the first block's copy for
    position 0) with `o_proj` and `down_proj` zero, so its attention and MLP add nothing to the
    residual stream. `stack` (G_stack): the whole stack repeated, num_layers a multiple of the
    current depth; the copies add to the residual stream again, so it is NOT function preserving."""
    sources, new = depth_plan(model.config.num_hidden_layers, num_layers, positions, method)
    state = _plain_state(model)
    grown = {name: tensor for name, tensor in state.items() if not name.startswith("model.layers.")}
    for index, source in enumerate(sources):
        prefix = f"model.layers.{source}."
        for name, tensor in state.items():
            if name.startswith(prefix):
                grown[f"model.layers.{index}.{name[len(prefix):]}"] = tensor.clone()
        if method == "identity" and index in new:
            grown[f"model.layers.{index}.self_attn.o_proj.weight"].zero_()
            grown[f"model.layers.{index}.mlp.down_proj.weight"].zero_()
    return _build(dataclasses.replace(copy.deepcopy(model.config), num_hidden_layers=num_layers), grown, model)


def grow_mlp(model: CausalLM, intermediate_size: int, method: str = "zero", seed: int = 0) -> CausalLM:
    """Every MLP `intermediate_size` units wide. `zero`: the new units' gate and up rows drawn as the
    model's initialisation (normal(0, initializer_range), from `seed`) and their `down_proj` columns
    zero. `net2net`: each new unit copies a randomly chosen existing unit (no unit is copied twice
    before every unit is copied once), and each copied unit's `down_proj` column is divided equally
    among it and its copies: a SwiGLU unit's output is its activation times its down column, so the
    copies together add what the original did. Note that exact copies get identical gradients and so
    stay identical under training; Net2Net breaks the tie with noise, which would no longer preserve
    the function exactly: use `zero` where the new units should learn something new."""
    config = model.config
    if method not in MLP_METHODS:
        raise ValueError(f"mlp_method: {method!r} is not one of {', '.join(MLP_METHODS)}")
    old = config.intermediate_size
    if intermediate_size < old:
        raise ValueError(f"intermediate_size: {intermediate_size} is smaller than the model's {old}")
    extra = intermediate_size - old
    state = _plain_state(model)
    generator = torch.Generator().manual_seed(seed)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp."
        gate, up, down = (state[prefix + f"{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj"))
        if method == "zero":
            new_gate = _normal(extra, config.hidden_size, config.initializer_range, generator)
            new_up = _normal(extra, config.hidden_size, config.initializer_range, generator)
            new_down = torch.zeros(config.hidden_size, extra)
        else:
            rounds = max(-(-extra // old), 1)
            source = torch.cat([torch.randperm(old, generator=generator) for _ in range(rounds)])[:extra]
            copies = torch.bincount(source, minlength=old) + 1  # the original and its copies
            down = down / copies.to(down.dtype)
            new_gate, new_up, new_down = gate[source], up[source], down[:, source]
        state[prefix + "gate_proj.weight"] = torch.cat([gate, new_gate])
        state[prefix + "up_proj.weight"] = torch.cat([up, new_up])
        state[prefix + "down_proj.weight"] = torch.cat([down, new_down], dim=1)
    return _build(dataclasses.replace(copy.deepcopy(config), intermediate_size=intermediate_size), state, model)


def grow_heads(model: CausalLM, num_attention_heads: int, num_key_value_heads: int | None = None,
               seed: int = 0) -> CausalLM:
    """`num_attention_heads` query heads of the same head_dim (set explicitly in the new config,
    since hidden_size / heads no longer gives it). New query heads get random q_proj rows (zero
    bias) and zero o_proj columns, so they add nothing until trained. Under grouped-query attention
    `num_key_value_heads=None` keeps the group size (queries per key/value head) by adding whole
    groups: new key/value heads with random rows. A smaller group size (more key/value heads than
    that) is allowed where it divides the old one: the old heads' keys and values are then
    duplicated so every old query head still reads its own. Qwen3's q/k norms work per head and are
    shared by all heads: they stay as they are."""
    config = model.config
    kv_heads, kv_sources = kv_plan(config, num_attention_heads, num_key_value_heads)
    heads, head_dim, d = config.num_attention_heads, config.resolved_head_dim, config.hidden_size
    std = config.initializer_range
    state = _plain_state(model)
    generator = torch.Generator().manual_seed(seed)
    new_queries = (num_attention_heads - heads) * head_dim
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        state[prefix + "q_proj.weight"] = torch.cat([state[prefix + "q_proj.weight"],
                                                     _normal(new_queries, d, std, generator)])
        if config.attention_bias:
            state[prefix + "q_proj.bias"] = torch.cat([state[prefix + "q_proj.bias"], torch.zeros(new_queries)])
        for name in ("k_proj", "v_proj"):
            weight = state[prefix + f"{name}.weight"].view(config.num_key_value_heads, head_dim, d)
            rows = [weight[s] if s is not None else _normal(head_dim, d, std, generator) for s in kv_sources]
            state[prefix + f"{name}.weight"] = torch.cat(rows)
            if config.attention_bias:
                bias = state[prefix + f"{name}.bias"].view(config.num_key_value_heads, head_dim)
                state[prefix + f"{name}.bias"] = torch.cat(
                    [bias[s] if s is not None else torch.zeros(head_dim) for s in kv_sources])
        state[prefix + "o_proj.weight"] = torch.cat([state[prefix + "o_proj.weight"], torch.zeros(d, new_queries)],
                                                    dim=1)
    new_config = dataclasses.replace(copy.deepcopy(config), num_attention_heads=num_attention_heads,
                                     num_key_value_heads=kv_heads, head_dim=head_dim)
    return _build(new_config, state, model)


def grow_hidden(model: CausalLM, hidden_size: int, seed: int = 0) -> CausalLM:
    """A residual stream `hidden_size` wide whose new dimensions stay exactly zero.

    Writers get zeros: the embeddings' new columns (so the tied lm_head's too), the new output rows
    of `o_proj` and `down_proj`; an untied lm_head gets zero new columns as well. Readers of the
    residual (q/k/v, gate/up and a score head) get new input columns drawn as the model's
    initialisation: they multiply zeros, so change nothing, and being non-zero they pass gradient to
    the new dimensions (were they zero, the new dimensions would never get any).

    RMSNorm averages over the new zeros too: the mean of squares over d_new dimensions is
    c = d_old / d_new times the old one. Scaling every hidden-size norm's gain by sqrt(c) (its new
    entries are sqrt(c), they multiply zeros) and rms_norm_eps by c gives back exactly the old
    output, eps included. Qwen3's q/k norms share that eps: their q_proj/k_proj rows are scaled by
    sqrt(c) as well, which with the eps scaled by c leaves their outputs as they were. head_dim is
    set explicitly, since hidden_size / heads no longer gives it."""
    config = model.config
    new_config = _hidden_config(copy.deepcopy(config), hidden_size)
    d, extra = config.hidden_size, hidden_size - config.hidden_size
    c = d / hidden_size
    gain = math.sqrt(c)
    std = config.initializer_range
    state = _plain_state(model)
    generator = torch.Generator().manual_seed(seed)
    readers = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
    for name, tensor in list(state.items()):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = torch.cat([tensor, torch.zeros(tensor.shape[0], extra)], dim=1)
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            state[name] = torch.cat([tensor * gain, torch.full((extra,), gain)])
        elif name.endswith(readers) or name == "score.weight":
            if config.qk_norm and name.endswith(("q_proj.weight", "k_proj.weight")):
                tensor = tensor * gain
            state[name] = torch.cat([tensor, _normal(tensor.shape[0], extra, std, generator)], dim=1)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = torch.cat([tensor, torch.zeros(extra, tensor.shape[1])])
    return _build(new_config, state, model)


def layer_parameters(model: CausalLM, layers: list[int]) -> list[str]:
    """The names of the parameters of the blocks `layers`."""
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def grow(model: CausalLM, layers: int | None = None, hidden_size: int | None = None,
         intermediate_size: int | None = None, num_attention_heads: int | None = None,
         num_key_value_heads: int | None = None, depth_method: str = "identity",
         positions: list[int] | None = None, mlp_method: str = "zero", seed: int = 0) -> tuple[CausalLM, dict]:
    """Grow what is given (None leaves a size as it is): hidden size, heads, MLP width, then depth,
    so the inserted blocks are copies at the new width. Every argument is checked before anything
    grows (ValueError naming it); sizes never shrink, and asking for nothing new is an error too.

    Returns the grown model and a description: `grew` (each size that changed: [old, new]),
    `new_layers` and `depth_method` when depth grew, `mlp_method` when the MLP did, `new_parameters`
    (names of the parameters that are entirely new, the inserted blocks', for training only them;
    empty after width-only growth, where every new weight sits inside an old tensor),
    `function_preserving` (False only for depth_method stack) and `parameters` ([old, new] counts)."""
    config = model.config
    target = grown_config(config, layers, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
                          depth_method, positions, mlp_method)
    fields = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers")
    grew = {name: [getattr(config, name), getattr(target, name)] for name in fields
            if getattr(config, name) != getattr(target, name)}
    if not grew:
        raise ValueError("nothing to grow: every size given is the model's own (give a larger one)")
    grown = model
    if "hidden_size" in grew:
        grown = grow_hidden(grown, hidden_size, seed=seed)
    if "num_attention_heads" in grew or "num_key_value_heads" in grew:
        grown = grow_heads(grown, target.num_attention_heads, target.num_key_value_heads, seed=seed + 1)
    if "intermediate_size" in grew:
        grown = grow_mlp(grown, intermediate_size, mlp_method, seed=seed + 2)
    description = {"grew": grew}
    new_layers: list[int] = []
    if "num_hidden_layers" in grew:
        _, new_layers = depth_plan(config.num_hidden_layers, layers, positions, depth_method)
        grown = grow_depth(grown, layers, positions, depth_method)
        description.update(depth_method=depth_method, new_layers=new_layers)
    if "intermediate_size" in grew:
        description["mlp_method"] = mlp_method
    description["new_parameters"] = layer_parameters(grown, new_layers)
    description["function_preserving"] = not (new_layers and depth_method == "stack")
    description["parameters"] = [config.num_parameters(), grown.config.num_parameters()]
    return grown, description
