"""Bottleneck adapters and prefix tuning added to a built orchard model: base weights keep their names
and values, adapters start as the identity and compute the documented formulas, prefixes are the
attention hand-computed with extra keys/values and work with padding, packing and the KV cache,
only the new parameters train, and removal gives back the exact original model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from orchard.data.conversations import PackedExample, collate_packed
from orchard.errors import OrchardError
from orchard.model import CausalLM, ModelConfig
from orchard.model.generation import SamplingConfig, generate
from orchard.model.transformer import apply_rotary
from orchard.peft import (
    AdapterConfig,
    LoraConfig,
    PrefixConfig,
    adapter_modules,
    add_adapters,
    add_lora,
    add_prefix,
    fold_prefix_projection,
    has_prefix,
    remove_adapter,
    remove_adapters,
    remove_prefix,
    trainable_parameter_count,
)

VOCAB = 96
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2, 32, 4, 2, 8
IDS = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))


def base_model() -> CausalLM:
    model = CausalLM(ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norms too, so a norm applied in the wrong place shows
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model.eval()


def logits(model, ids=IDS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def randomize(model, marker: str, seed: int = 1, scale: float = 0.3) -> None:
    """Random values in every tensor whose name contains `marker`, so the new parameters matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if marker in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def train_steps(model, steps: int = 5) -> list[float]:
    """A few AdamW steps of next-token loss on IDS; the losses before each step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        out = model(IDS[:, :-1]).logits
        loss = F.cross_entropy(out.reshape(-1, VOCAB), IDS[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def assert_base_untouched(model, base_state) -> None:
    state = model.state_dict()
    for name, tensor in base_state.items():
        assert torch.equal(state[name], tensor), name


# --- bottleneck adapters -------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["serial", "parallel"])
@pytest.mark.parametrize("targets", [["mlp"], ["self_attn", "mlp"], ["down_proj"]])
def test_adapters_keep_the_base_and_start_as_the_identity(placement, targets):
    model = base_model()
    base_state, expected = snapshot(model), logits(model)
    adapted = add_adapters(model, AdapterConfig(bottleneck=4, placement=placement, targets=targets), seed=0)
    assert adapted == adapter_modules(model)
    assert len(adapted) == LAYERS * len(targets)
    assert torch.equal(logits(model), expected)  # exactly: `up` is zero
    state = model.state_dict()
    assert set(base_state) <= set(state)
    assert all(".adapter." in name for name in set(state) - set(base_state))
    assert_base_untouched(model, base_state)


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_adapter_computes_the_documented_formula(placement):
    model = base_model()
    add_adapters(model, AdapterConfig(bottleneck=4, placement=placement, scaling=0.5, targets=["mlp"]), seed=0)
    randomize(model, ".adapter.up.")
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        source = base if placement == "serial" else x
        a = mlp.adapter
        expected = base + 0.5 * F.linear(F.silu(F.linear(source, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        assert torch.allclose(mlp(x), expected, atol=1e-6)
    assert not torch.allclose(mlp(x), base, atol=1e-3)


def test_adapters_train_alone_and_report_their_count():
    model = base_model()
    base_state, (_, base_total) = snapshot(model), trainable_parameter_count(model)
    add_adapters(model, AdapterConfig(bottleneck=4, targets=["self_attn", "mlp"]), seed=0)
    trainable, total = trainable_parameter_count(model)
    per_adapter = (HIDDEN * 4 + 4) + (4 * HIDDEN + HIDDEN)
    assert trainable == 2 * LAYERS * per_adapter
    assert total == base_total + trainable
    assert all(p.requires_grad == (".adapter." in n) for n, p in model.named_parameters())
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    assert_base_untouched(model, base_state)
    assert not torch.equal(model.model.layers[0].mlp.adapter.up.weight, torch.zeros(HIDDEN, 4))


def test_removing_adapters_restores_the_model():
    model = base_model()
    base_state, expected = snapshot(model), logits(model)
    add_adapters(model, AdapterConfig(bottleneck=4, placement="parallel", targets=["self_attn", "mlp"]), seed=0)
    randomize(model, ".adapter.")
    assert not torch.allclose(logits(model), expected, atol=1e-3)
    twin = copy.deepcopy(model)  # a deep copy's hooks use the copy's adapters
    randomize(twin, ".adapter.", seed=5)
    assert not torch.allclose(logits(twin), logits(model), atol=1e-3)
    remove_adapters(model)
    assert torch.equal(logits(model), expected)
    assert list(model.state_dict()) == list(base_state)
    assert adapter_modules(model) == []
    assert all(not layer.mlp._forward_hooks and not layer.self_attn._forward_hooks for layer in model.model.layers)
    remove_adapters(twin)  # the copy's hooks are found and removed too
    assert torch.equal(logits(twin), expected)


def test_adapter_config_and_targets_are_checked():
    for bad in [{"bottleneck": 0}, {"bottleneck": 2.0}, {"placement": "beside"}, {"dropout": 1.0},
                {"targets": []}, {"scaling": math.nan}]:
        with pytest.raises(OrchardError):
            AdapterConfig(**bad)
    model = base_model()
    with pytest.raises(OrchardError, match="match no module"):
        add_adapters(model, AdapterConfig(targets=["feed_forward"]))
    add_adapters(model, AdapterConfig(bottleneck=2))
    with pytest.raises(OrchardError, match="already has"):
        add_adapters(model, AdapterConfig(bottleneck=2))


def test_adapter_dropout_only_in_training():
    model = base_model()
    add_adapters(model, AdapterConfig(bottleneck=8, dropout=0.5), seed=0)
    randomize(model, ".adapter.up.")
    assert torch.equal(logits(model), logits(model))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(logits(model), logits(model))


# --- prefix tuning -------------------------------------------------------------------------------


def prefixed(P: int = 3, seed: int = 0, **config) -> CausalLM:
    model = base_model()
    add_prefix(model, PrefixConfig(num_virtual_tokens=P, **config), seed=seed)
    return model


def reference_attention(attn, x, cos, sin, prefix_k, prefix_v):
    """Attention by hand: rotated q/k, the prefix's keys/values first, softmax over visible keys."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2).repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2).repeat_interleave(HEADS // KV_HEADS, dim=1)
    P = prefix_k.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)                        # (B, H, T, P + T)
    visible = torch.cat([torch.ones(T, P, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
    scores = scores.masked_fill(~visible, float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


@torch.no_grad()
def test_prefix_attention_equals_a_hand_computed_reference():
    model = prefixed(P=3)
    randomize(model, ".prefix.", scale=1.0)
    attn = model.model.layers[1].self_attn
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(4))
    cos, sin = model.model.rotary(torch.arange(6).expand(2, 6))
    expected = reference_attention(attn, x, cos, sin, attn.prefix.key, attn.prefix.value)
    assert torch.allclose(attn(x, cos, sin, None, None), expected, atol=1e-5)
    # An explicit boolean mask and the equivalent additive one give the same.
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~causal, float("-inf"))
    assert torch.allclose(attn(x, cos, sin, causal, None), expected, atol=1e-5)
    assert torch.allclose(attn(x, cos, sin, additive, None), expected, atol=1e-5)


@torch.no_grad()
def test_prefix_starts_as_the_keys_and_values_of_real_tokens():
    """A prefix initialised from tokens X, with the real tokens placed after it (positions P...),
    computes exactly what the model computes on X followed by them: the prefixes are X's keys and
    values in every layer. (This is also how PEFT places real tokens after a prefix.)"""
    model = base_model()
    prompt = [7, 30, 61, 12]
    full = logits(model, torch.cat([torch.tensor([prompt]), IDS[:1]], dim=1))[:, len(prompt):]
    plain = logits(model, IDS[:1])
    add_prefix(model, PrefixConfig(num_virtual_tokens=4, init_token_ids=prompt))
    assert has_prefix(model)
    positions = torch.arange(4, 4 + IDS.shape[1])[None]
    assert torch.allclose(logits(model, IDS[:1], position_ids=positions), full, atol=1e-5)
    assert not torch.allclose(logits(model, IDS[:1]), plain, atol=1e-3)  # a prefix changes the output


@torch.no_grad()
def test_prefix_with_padding_and_packing_equals_sequences_alone():
    model = prefixed(P=3)
    randomize(model, ".prefix.", scale=1.0)
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 3, 4)]
    alone = [logits(model, torch.tensor([s]))[0] for s in seqs]

    # Left padding with a (B, S) mask.
    longest = max(map(len, seqs))
    ids = torch.full((3, longest), 2)
    mask = torch.zeros(3, longest, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, longest - len(s):], mask[row, longest - len(s):] = torch.tensor(s), 1
    padded = logits(model, ids, attention_mask=mask)
    for row, s in enumerate(seqs):
        assert torch.allclose(padded[row, longest - len(s):], alone[row], atol=1e-5)

    # Packed: the three in one row with SFT's block-diagonal mask (plus padding), and a second row.
    packed = PackedExample(input_ids=[t for s in seqs for t in s], labels=[-100] * 12,
                           position_ids=[i for s in seqs for i in range(len(s))],
                           document_ids=[d for d, s in enumerate(seqs) for _ in s])
    single = PackedExample(input_ids=seqs[1], labels=[-100] * 3, position_ids=[0, 1, 2], document_ids=[0] * 3)
    batch = collate_packed([packed, single], pad_id=2, pad_to=14)
    out = logits(model, batch["input_ids"], document_ids=batch["document_ids"], position_ids=batch["position_ids"])
    start = 0
    for row, s in enumerate(seqs):
        assert torch.allclose(out[0, start:start + len(s)], alone[row], atol=1e-5)
        start += len(s)
    assert torch.allclose(out[1, :3], alone[1], atol=1e-5)
    assert torch.isfinite(out).all()  # padding rows see the prefix and themselves


@torch.no_grad()
def test_prefix_with_the_kv_cache():
    model = prefixed(P=3)
    randomize(model, ".prefix.", scale=1.0)
    ids = IDS[:2]
    full = logits(model, ids)
    cache = model.new_cache(2, ids.shape[1])
    pieces = [model(ids[:, :4], cache=cache).logits]
    assert cache.length == 4  # the cache holds real tokens only
    pieces.append(model(ids[:, 4:7], cache=cache).logits)
    for t in range(7, ids.shape[1]):
        pieces.append(model(ids[:, t:t + 1], cache=cache).logits)
    assert cache.length == ids.shape[1]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)

    prompts = [[5, 17, 33, 8, 91, 40, 12], [60], [3, 77, 21]]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    cached = generate(model, prompts, greedy, eos_id=-1, pad_id=2, use_cache=True)
    recomputed = generate(model, prompts, greedy, eos_id=-1, pad_id=2, use_cache=False)
    assert cached == recomputed
    remove_prefix(model)
    assert generate(model, prompts, greedy, eos_id=-1, pad_id=2) != cached  # the prefix mattered


def test_prefix_trains_alone_and_reports_its_count():
    model = base_model()
    base_state, (_, base_total) = snapshot(model), trainable_parameter_count(model)
    names = add_prefix(model, PrefixConfig(num_virtual_tokens=5), seed=0)
    assert names == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    trainable, total = trainable_parameter_count(model)
    assert trainable == LAYERS * 2 * KV_HEADS * 5 * HEAD_DIM
    assert total == base_total + trainable
    new = set(model.state_dict()) - set(base_state)
    assert new == {f"model.layers.{i}.self_attn.prefix.{kv}" for i in range(LAYERS) for kv in ("key", "value")}
    assert all(p.requires_grad == (".prefix." in n) for n, p in model.named_parameters())
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    assert_base_untouched(model, base_state)


def test_prefix_trains_on_a_packed_batch():
    model = prefixed(P=2)
    before = model.model.layers[0].self_attn.prefix.key.detach().clone()
    batch = collate_packed([PackedExample(input_ids=[5, 6, 7, 8, 9], labels=[6, 7, -100, 9, -100],
                                          position_ids=[0, 1, 2, 0, 1], document_ids=[0, 0, 0, 1, 1])], pad_id=2)
    out = model(batch["input_ids"], document_ids=batch["document_ids"], position_ids=batch["position_ids"])
    F.cross_entropy(out.logits[0], batch["labels"][0]).backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert not torch.equal(model.model.layers[0].self_attn.prefix.key, before)


def test_removing_the_prefix_restores_the_model():
    model = base_model()
    base_state, expected = snapshot(model), logits(model)
    add_prefix(model, PrefixConfig(num_virtual_tokens=3), seed=0)
    twin = copy.deepcopy(model)  # a deep copy's hook reads the copy's prefix
    randomize(twin, ".prefix.", seed=5)
    assert not torch.allclose(logits(twin), logits(model), atol=1e-3)
    with pytest.raises(OrchardError, match="already"):
        add_prefix(model, PrefixConfig(num_virtual_tokens=3))
    remove_prefix(model)
    assert not has_prefix(model)
    assert torch.equal(logits(model), expected)
    assert list(model.state_dict()) == list(base_state)
    assert all(layer.self_attn.extra_kv is None for layer in model.model.layers)
    remove_prefix(twin)
    assert torch.equal(logits(twin), expected)


def test_prefix_projection_starts_at_the_same_prefix_and_folds():
    direct = prefixed(P=3, seed=4)
    model = prefixed(P=3, seed=4, projection_hidden=16)
    new = {n for n, _ in model.named_parameters() if n.startswith("model.prefix.")}
    assert new == {"model.prefix.embedding.weight", "model.prefix.transform.0.weight",
                   "model.prefix.transform.0.bias", "model.prefix.transform.2.weight", "model.prefix.transform.2.bias"}
    trainable, _ = trainable_parameter_count(model)
    width = KV_HEADS * HEAD_DIM
    assert trainable == 3 * width + (width * 16 + 16) + (16 * LAYERS * 2 * width + LAYERS * 2 * width)
    assert torch.allclose(logits(model), logits(direct), atol=1e-5)  # exact fit: projection_hidden >= P
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    trained = logits(model)
    twin = copy.deepcopy(model)
    fold_prefix_projection(model)
    assert torch.allclose(logits(model), trained, atol=1e-6)
    assert not any(n.startswith("model.prefix.") for n in model.state_dict())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.prefix.{kv}" for i in range(LAYERS) for kv in ("key", "value")}
    remove_prefix(twin)
    assert list(twin.state_dict()) == list(base_model().state_dict())


def test_prefix_under_bf16_autocast():
    model = prefixed(P=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(IDS).logits
    assert torch.allclose(out.float(), logits(model), atol=0.15)


def test_prefix_adapters_and_lora_compose_and_come_off():
    model = base_model()
    base_state, expected = snapshot(model), logits(model)
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), seed=0)
    add_adapters(model, AdapterConfig(bottleneck=2), seed=0)
    add_prefix(model, PrefixConfig(num_virtual_tokens=2), seed=0)
    # add_* freeze everything before them: only the last added method trains.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.prefix.{kv}" for i in range(LAYERS) for kv in ("key", "value")}
    assert not torch.allclose(logits(model), expected, atol=1e-3)
    remove_prefix(model)
    remove_adapters(model)
    remove_adapter(model, "default")
    assert torch.equal(logits(model), expected)
    assert list(model.state_dict()) == list(base_state)


def test_prefix_config_is_checked():
    for bad in [{"num_virtual_tokens": 0}, {"num_virtual_tokens": True}, {"projection_hidden": 0},
                {"num_virtual_tokens": 2, "init_token_ids": [1]}, {"num_virtual_tokens": 1, "init_token_ids": [-1]}]:
        with pytest.raises(OrchardError):
            PrefixConfig(**bad)
    with pytest.raises(OrchardError, match="vocabulary"):
        add_prefix(base_model(), PrefixConfig(num_virtual_tokens=1, init_token_ids=[VOCAB]))
    with pytest.raises(OrchardError, match="positions"):
        add_prefix(base_model(), PrefixConfig(num_virtual_tokens=65))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations, called by PEFT
@torch.no_grad()
def test_prefix_equals_peft_prefix_tuning_with_keys_rotated_back_by_p():
    """PEFT puts the prefix in the KV cache, so its real tokens start at position P; orchard's start
    at 0 and its prefix keys are not rotated. A PEFT prefix key k is orchard's R(-P) k."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = base_model()
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**model.config.to_hf_dict())).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    P = 5
    peft_model = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    embedding.copy_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(2)))
    kv = embedding.view(P, LAYERS * 2, KV_HEADS, HEAD_DIM).permute(1, 2, 0, 3)  # (2 L, K, P, D)
    add_prefix(model, PrefixConfig(num_virtual_tokens=P))
    cos, sin = model.model.rotary(torch.full((1, 1), P))
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.prefix.key.copy_(apply_rotary(kv[2 * i][None], cos, -sin)[0])  # R(-P): sin -> -sin
        layer.self_attn.prefix.value.copy_(kv[2 * i + 1])
    expected = peft_model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    assert torch.allclose(logits(model), expected, atol=1e-5)
