"""The transformer: shapes, grouped-query attention, causality, the KV cache, left padding, hidden
states, embeddings, parameter names and counts, rotary embeddings and the config."""

import math

import pytest
import torch

from orchard.model import CausalLM, ModelConfig
from orchard.model.transformer import RotaryEmbedding, apply_rotary

VOCAB = 97


def tiny_config(**overrides) -> ModelConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    initializer_range=0.1)
    settings.update(overrides)
    return ModelConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    model = CausalLM(tiny_config(**overrides))
    model.reset_parameters(seed=seed)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    difference = (actual - expected).abs().max().item()
    assert difference <= atol, f"max abs difference {difference}"


# --- shapes and grouped-query attention ------------------------------------------------------


@torch.no_grad()
def test_logits_shape_and_logits_to_keep():
    model = tiny_model()
    ids = random_ids(3, 7)
    logits = model(ids).logits
    assert logits.shape == (3, 7, VOCAB)
    assert torch.isfinite(logits).all()
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (3, 1, VOCAB)
    assert_close(last[:, 0], logits[:, -1])


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@torch.no_grad()
def test_gqa_shapes(kv_heads):
    model = tiny_model(num_attention_heads=4, num_key_value_heads=kv_heads)
    head_dim = 32 // 4
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (4 * head_dim, 32)
    assert attention.k_proj.weight.shape == (kv_heads * head_dim, 32)
    assert attention.v_proj.weight.shape == (kv_heads * head_dim, 32)
    assert attention.o_proj.weight.shape == (32, 4 * head_dim)
    assert model(random_ids(2, 5)).logits.shape == (2, 5, VOCAB)
    cache = model.new_cache(2, 10)
    model(random_ids(2, 5), cache=cache)
    assert cache.keys[0].shape == (2, kv_heads, 10, head_dim)
    assert cache.length == 5


def _repeat_kv_rows(tensor: torch.Tensor, kv_heads: int, group: int) -> torch.Tensor:
    """(kv_heads * D, ...) -> (kv_heads * group * D, ...): each key/value head once per query head."""
    per_head = tensor.reshape(kv_heads, -1, *tensor.shape[1:])
    return per_head.repeat_interleave(group, dim=0).reshape(-1, *tensor.shape[1:])


@pytest.mark.parametrize("kv_heads,bias", [(1, False), (2, False), (2, True)])
@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_weights(kv_heads, bias):
    heads = 4
    gqa = tiny_model(seed=3, num_attention_heads=heads, num_key_value_heads=kv_heads, attention_bias=bias)
    if bias:  # zero-initialised biases would not test how they are grouped
        for layer in gqa.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    mha = tiny_model(seed=4, num_attention_heads=heads, num_key_value_heads=heads, attention_bias=bias)
    group = heads // kv_heads
    state = {}
    for name, tensor in gqa.state_dict().items():
        if ".k_proj." in name or ".v_proj." in name:
            tensor = _repeat_kv_rows(tensor, kv_heads, group)
        state[name] = tensor
    mha.load_state_dict(state)
    ids = random_ids(2, 9, seed=5)
    gqa_logits, mha_logits = gqa(ids).logits, mha(ids).logits
    assert_close(gqa_logits, mha_logits)
    # The check has teeth: a plain tile (head order 0,1,0,1 instead of 0,0,1,1) differs.
    if kv_heads == 2:
        wrong = {name: (t.repeat(group, *[1] * (t.dim() - 1)) if (".k_proj." in name or ".v_proj." in name) else t)
                 for name, t in gqa.state_dict().items()}
        mha.load_state_dict(wrong)
        assert (mha(ids).logits - gqa_logits).abs().max() > 1e-3


# --- causality, cache, padding ---------------------------------------------------------------


@torch.no_grad()
def test_causal_changing_a_token_changes_only_later_logits():
    model = tiny_model()
    ids = random_ids(1, 12)
    changed = ids.clone()
    t = 6
    changed[0, t] = (ids[0, t] + 1) % VOCAB
    before, after = model(ids).logits, model(changed).logits
    assert_close(after[:, :t], before[:, :t], atol=1e-6)
    assert (after[:, t:] - before[:, t:]).abs().amax(-1).min() > 1e-4  # every later position moves


@pytest.mark.parametrize("kv_heads", [1, 4])
@torch.no_grad()
def test_kv_cache_prefill_then_decode_equals_full_forward(kv_heads):
    model = tiny_model(num_key_value_heads=kv_heads)
    ids = random_ids(2, 14, seed=1)
    full = model(ids).logits
    cache = model.new_cache(2, 14)
    pieces = [model(ids[:, :6], cache=cache).logits,       # prefill
              model(ids[:, 6:9], cache=cache).logits]      # a chunk on top of the cache
    for t in range(9, 14):                                 # one token at a time
        pieces.append(model(ids[:, t:t + 1], cache=cache).logits)
    assert cache.length == 14
    assert_close(torch.cat(pieces, dim=1), full)
    with pytest.raises(ValueError, match="KV cache"):
        model(ids[:, :1], cache=cache)


@torch.no_grad()
def test_left_padded_batch_equals_sequences_alone():
    model = tiny_model()
    lengths = [9, 4, 6]
    longest = max(lengths)
    seqs = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.full((3, longest), 2, dtype=torch.long)
    mask = torch.zeros((3, longest), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, longest - len(seq):] = seq
        mask[row, longest - len(seq):] = 1
    batched = model(ids, attention_mask=mask).logits
    for row, seq in enumerate(seqs):
        alone = model(seq[None]).logits[0]
        assert_close(batched[row, longest - len(seq):], alone)

    # Padded prefill plus cached decoding gives the same as well.
    cache = model.new_cache(3, longest + 2)
    model(ids, attention_mask=mask, cache=cache)
    extra = torch.tensor([[5], [6], [7]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    step = model(extra, attention_mask=mask2, cache=cache).logits[:, 0]
    for row, seq in enumerate(seqs):
        alone = model(torch.cat([seq, extra[row]])[None]).logits[0, -1]
        assert_close(step[row], alone)


# --- hidden states, embeddings, biases -------------------------------------------------------


@torch.no_grad()
def test_hidden_states_count_and_last_is_final_norm():
    model = tiny_model()
    ids = random_ids(2, 5)
    out = model(ids, output_hidden_states=True)
    config = model.config
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 5, config.hidden_size) for h in out.hidden_states)
    assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    last = out.hidden_states[-1]
    # Final norm with unit weights: every vector has root mean square 1.
    rms = last.pow(2).mean(-1).sqrt()
    assert_close(rms, torch.ones_like(rms), atol=1e-4)
    assert_close(model.lm_head(last), out.logits)
    # The layers' own outputs are not normalised.
    assert (out.hidden_states[1].pow(2).mean(-1).sqrt() - 1).abs().max() > 1e-2
    assert model(ids).hidden_states is None


def test_tied_and_untied_embeddings():
    tied = tiny_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_attention_bias_adds_qkv_biases_only():
    with_bias = tiny_model(attention_bias=True)
    attention = with_bias.model.layers[0].self_attn
    kv = with_bias.config.num_key_value_heads * with_bias.config.resolved_head_dim
    assert attention.q_proj.bias.shape == (32,)
    assert attention.k_proj.bias.shape == (kv,)
    assert attention.v_proj.bias.shape == (kv,)
    assert attention.o_proj.bias is None
    names = set(dict(with_bias.named_parameters()))
    assert {n for n in names if n.endswith(".bias")} == {
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"}
    without = tiny_model(attention_bias=False)
    assert not any(n.endswith(".bias") for n, _ in without.named_parameters())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_num_parameters_matches_module(tied, bias, kv_heads):
    config = tiny_config(tie_word_embeddings=tied, attention_bias=bias, num_key_value_heads=kv_heads)
    model = CausalLM(config)
    unique = {id(p): p for p in model.parameters()}
    assert config.num_parameters() == sum(p.numel() for p in unique.values())
    assert model.num_parameters() == config.num_parameters()
    embeddings = model.model.embed_tokens.weight.numel() + (0 if tied else model.lm_head.weight.numel())
    assert config.num_parameters(include_embeddings=False) == config.num_parameters() - embeddings


def test_parameter_names_follow_hugging_face():
    model = tiny_model(num_hidden_layers=1, tie_word_embeddings=False)
    names = set(model.state_dict())
    layer = "model.layers.0."
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight",
                *(layer + f"self_attn.{p}_proj.weight" for p in "qkvo"),
                *(layer + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))}
    assert names == expected
    tied = tiny_model(num_hidden_layers=1)
    assert "lm_head.weight" in tied.state_dict()  # present, sharing the embedding's storage


# --- rotary embeddings -----------------------------------------------------------------------


def test_rope_matches_hand_computed_half_split_rotation():
    rotary = RotaryEmbedding(head_dim=4, max_positions=4, theta=10000.0)
    cos, sin = rotary(torch.tensor([[0, 1]]))
    assert cos.shape == (1, 1, 2, 4)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 2, 4)
    rotated = apply_rotary(x, cos, sin)
    # Position 0 is the identity.
    assert_close(rotated[0, 0, 0], x[0, 0, 0], atol=1e-7)
    # head_dim 4: frequencies 1 and 10000^(-1/2) = 0.01; Llama's rotate_half pairs dim i with i + 2.
    a, b = 1.0, 0.01
    x0, x1, x2, x3 = 1.0, 2.0, 3.0, 4.0
    expected = torch.tensor([x0 * math.cos(a) - x2 * math.sin(a),
                             x1 * math.cos(b) - x3 * math.sin(b),
                             x2 * math.cos(a) + x0 * math.sin(a),
                             x3 * math.cos(b) + x1 * math.sin(b)])
    assert_close(rotated[0, 0, 1], expected, atol=1e-6)


@torch.no_grad()
def test_rope_scores_depend_on_relative_position_only():
    rotary = RotaryEmbedding(head_dim=8, max_positions=64, theta=10000.0)
    q, k = torch.randn(8, generator=torch.Generator().manual_seed(0)), torch.randn(8)

    def score(i, j):
        cos, sin = rotary(torch.tensor([[i, j]]))
        rq = apply_rotary(q.expand(1, 1, 2, 8), cos, sin)[0, 0, 0]
        rk = apply_rotary(k.expand(1, 1, 2, 8), cos, sin)[0, 0, 1]
        return float(rq @ rk)

    assert abs(score(5, 3) - score(12, 10)) < 1e-5
    assert abs(score(5, 3) - score(5, 4)) > 1e-4


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [3, 5])
def test_config_rejects_kv_heads_not_dividing_heads(kv_heads):
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads)


def test_config_rejects_other_bad_shapes():
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(hidden_size=30, num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(vocab_size=0)
    with pytest.raises(ValueError, match="even"):
        ModelConfig(hidden_size=12, num_attention_heads=4, num_key_value_heads=4)  # head_dim 3


@pytest.mark.parametrize("bias", [False, True])
def test_hf_dict_round_trip(bias):
    config = tiny_config(attention_bias=bias, tie_word_embeddings=not bias, rope_theta=1e6, rms_norm_eps=1e-6,
                         head_dim=16, bos_token_id=5, eos_token_id=6, pad_token_id=7)
    data = config.to_hf_dict()
    assert data["model_type"] == ("qwen2" if bias else "llama")
    assert data["head_dim"] == 16
    assert ModelConfig.from_hf_dict(data) == config
    # Hugging Face Qwen2 configs leave attention_bias out: it is implied.
    qwen = {k: v for k, v in tiny_config(attention_bias=True).to_hf_dict().items() if k != "attention_bias"}
    assert ModelConfig.from_hf_dict(qwen).attention_bias is True


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every):
    """Recomputing blocks in the backward pass changes memory, not math: the same loss and gradients
    (fp32, within 1e-6), on a packed batch with an explicit block-diagonal mask too; no effect in
    eval mode or with a KV cache, and the weights keep their names."""
    ids = random_ids(2, 12)
    block = torch.ones(12, 12, dtype=torch.bool).tril()
    block[6:, :6] = False  # two documents per row
    packed_mask = block.expand(2, 1, 12, 12)
    for mask in (None, packed_mask):
        grads = []
        for checkpoint_every in (0, every):
            model = tiny_model(num_hidden_layers=3)
            model.set_activation_checkpointing(checkpoint_every)
            model.train()
            calls = [0, 0, 0]
            for index, layer in enumerate(model.model.layers):
                layer.register_forward_pre_hook(lambda *args, index=index: calls.__setitem__(index, calls[index] + 1))
            loss = model(ids, attention_mask=mask).logits.float().logsumexp(-1).mean()
            loss.backward()
            # A recomputed block runs again in the backward pass.
            assert calls == [1 + (checkpoint_every > 0 and i % checkpoint_every == 0) for i in range(3)]
            grads.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
        (loss_plain, plain), (loss_recomputed, recomputed) = grads
        assert torch.equal(loss_plain, loss_recomputed)
        assert plain.keys() == recomputed.keys()
        for name in plain:
            assert_close(recomputed[name], plain[name], atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert model(ids).logits.shape == (2, 12, model.config.vocab_size)
    with pytest.raises(ValueError):
        model.set_activation_checkpointing(-1)
