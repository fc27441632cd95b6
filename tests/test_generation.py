"""Sampling: the cache against recomputation, left-padded batches, seeds, top-k/top-p, repetition
penalty, eos, the token budget, stop strings and the position limit."""

import pytest
import torch

from orchard.model import CausalLM, ModelConfig, generation
from orchard.model.generation import (SamplingConfig, apply_repetition_penalty, filter_top_k_top_p, generate,
                                      generate_text)
from orchard.tokenizer import Tokenizer

VOCAB = 101
NO_EOS = -1  # an id no token has: generation runs to max_new_tokens
PAD = 2


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    # A wide initialisation spreads the logits, so greedy choices are far from ties.
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    initializer_range=0.3)
    settings.update(overrides)
    model = CausalLM(ModelConfig(**settings))
    model.reset_parameters(seed=seed)
    return model.eval()


PROMPTS = [[5, 17, 33, 8, 91, 40, 12], [60], [3, 77, 21]]


def greedy(max_new_tokens=20, **kwargs) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, **kwargs)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_greedy_with_cache_equals_without(model):
    cached = generate(model, PROMPTS, greedy(), eos_id=NO_EOS, pad_id=PAD, use_cache=True)
    recomputed = generate(model, PROMPTS, greedy(), eos_id=NO_EOS, pad_id=PAD, use_cache=False)
    assert [len(t) for t in cached] == [20, 20, 20]
    assert cached == recomputed
    # Different prompts continue differently (the batch rows are not mixed up).
    assert len({tuple(t) for t in cached}) == 3


def test_compiled_decoding_gives_the_same_tokens(model):
    """The static cache and compiled step (`SamplingConfig.compile`): the tokens of uncompiled
    decoding, greedy and seeded sampling, with padded prompts of three lengths and a lone prompt,
    and again on a second call (which reuses the compilation)."""
    for config in (greedy(), SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=20, seed=3)):
        expected = generate(model, PROMPTS, config, eos_id=NO_EOS, pad_id=PAD)
        compiled = SamplingConfig(**{**vars(config), "compile": True})
        assert generate(model, PROMPTS, compiled, eos_id=NO_EOS, pad_id=PAD) == expected
        assert generate(model, PROMPTS, compiled, eos_id=NO_EOS, pad_id=PAD) == expected
    assert generate(model, PROMPTS[:1], greedy(compile=True), eos_id=NO_EOS, pad_id=PAD) == \
        generate(model, PROMPTS[:1], greedy(), eos_id=NO_EOS, pad_id=PAD)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="packed weights are MKL's")
def test_packed_weights_decode_the_same_tokens(model, monkeypatch):
    """fp32 decoding of several rows on the CPU multiplies by weights packed once per call
    (`packed_linears`): the same logits bit for bit, the same tokens (greedy and sampled, padded
    prompts), and the layers' own forward back afterwards."""
    prompts = [PROMPTS[i % 3] + [i + 1] for i in range(16)]
    assert generation.packs_weights(model, 16) and not generation.packs_weights(model, 1)
    step = torch.tensor([[p[-1]] for p in prompts])
    with torch.no_grad():
        plain = model(step).logits
        with generation.packed_linears(model, 16):
            assert torch.equal(model(step).logits, plain)
    assert not any("forward" in module.__dict__ for module in model.modules())
    configs = (greedy(), SamplingConfig(max_new_tokens=20, temperature=1.0, seed=3))
    packed = [generate(model, prompts, config, eos_id=NO_EOS, pad_id=PAD) for config in configs]
    monkeypatch.setattr(generation, "packs_weights", lambda model, rows: False)
    assert packed == [generate(model, prompts, config, eos_id=NO_EOS, pad_id=PAD) for config in configs]


def test_greedy_matches_step_by_step_argmax(model):
    prompt = PROMPTS[0]
    (out,) = generate(model, [prompt], greedy(8), eos_id=NO_EOS, pad_id=PAD)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_prompt_alone_equals_prompt_in_padded_batch(model):
    batched = generate(model, PROMPTS, greedy(), eos_id=NO_EOS, pad_id=PAD)
    for prompt, tokens in zip(PROMPTS, batched):
        assert generate(model, [prompt], greedy(), eos_id=NO_EOS, pad_id=PAD) == [tokens]


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    def sample(seed):
        config = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=seed)
        return generate(model, PROMPTS, config, eos_id=NO_EOS, pad_id=PAD)

    first = sample(0)
    assert first == sample(0)
    assert first != sample(1)
    assert first != generate(model, PROMPTS, greedy(), eos_id=NO_EOS, pad_id=PAD)  # it does sample


def test_top_k_one_equals_greedy(model):
    config = SamplingConfig(max_new_tokens=20, temperature=1.5, top_k=1, seed=3)
    assert generate(model, PROMPTS, config, eos_id=NO_EOS, pad_id=PAD) == \
        generate(model, PROMPTS, greedy(), eos_id=NO_EOS, pad_id=PAD)


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_filter_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert kept(filter_top_k_top_p(logits, 0, 0.8)) == [0, 1]
    assert kept(filter_top_k_top_p(logits, 0, 0.5)) == [0]
    assert kept(filter_top_k_top_p(logits, 0, 0.4)) == [0]
    assert kept(filter_top_k_top_p(logits, 0, 0.6)) == [0, 1]
    assert kept(filter_top_k_top_p(logits, 0, 0.9)) == [0, 1, 2]
    assert kept(filter_top_k_top_p(logits, 0, 1.0)) == [0, 1, 2, 3]
    # Order in the vocabulary does not matter, and kept logits are unchanged.
    shuffled = logits[[2, 0, 3, 1]]
    out = filter_top_k_top_p(shuffled, 0, 0.8)
    assert kept(out) == [1, 3]
    assert torch.equal(out[[1, 3]], shuffled[[1, 3]])


def test_filter_top_k_and_both():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 9.0, 8.0]])
    out = filter_top_k_top_p(logits, 2, 1.0)
    assert kept(out[0]) == [1, 2]
    assert kept(out[1]) == [3, 4]
    # top_k 3 leaves [4, 3, 2] in row 0; top_p 0.5 then keeps only the largest.
    both = filter_top_k_top_p(logits, 3, 0.5)
    assert kept(both[0]) == [1]
    assert torch.equal(filter_top_k_top_p(logits, 0, 1.0), logits)


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0, 0.25]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_repetition_penalty_in_generate_avoids_repeats(model):
    plain = generate(model, [PROMPTS[1]], greedy(30), eos_id=NO_EOS, pad_id=PAD)[0]
    penalised = generate(model, [PROMPTS[1]], greedy(30, repetition_penalty=1e6), eos_id=NO_EOS, pad_id=PAD)[0]
    assert len(set(plain)) < len(plain)  # this tiny model repeats itself...
    assert len(set(penalised + PROMPTS[1])) == len(penalised) + 1  # ...unless every seen token is penalised


def test_eos_ends_a_sequence_and_is_dropped(model):
    free = generate(model, PROMPTS, greedy(), eos_id=NO_EOS, pad_id=PAD)
    # Take as eos a token that row 0 produces mid-way: row 0 stops right before its first occurrence.
    eos = free[0][3]
    cut = free[0].index(eos)
    out = generate(model, PROMPTS, greedy(), eos_id=eos, pad_id=PAD)
    assert out[0] == free[0][:cut]
    for row in (1, 2):
        expected = free[row][:free[row].index(eos)] if eos in free[row] else free[row]
        assert out[row] == expected
    # A first token equal to eos gives an empty continuation.
    assert generate(model, [PROMPTS[0]], greedy(), eos_id=free[0][0], pad_id=PAD) == [[]]


def test_eos_from_crafted_weights_ends_immediately():
    model = tiny_model(tie_word_embeddings=False)
    eos = 1
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        # The final hidden state is (x0/rms, 0, ..., 0) with x0/rms != 0: give eos the largest logit either way.
        model.lm_head.weight[eos, 0] = 10.0
        model.lm_head.weight[eos + 1, 0] = -10.0
    hidden = model(torch.tensor([PROMPTS[0]]), output_hidden_states=True).hidden_states[-1][0, -1]
    first = 1 if hidden[0] > 0 else eos + 1
    assert generate(model, [PROMPTS[0]], greedy(), eos_id=first, pad_id=PAD) == [[]]


def test_max_new_tokens_respected(model):
    for n in (0, 1, 7):
        out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=n, temperature=1.0, seed=0),
                       eos_id=NO_EOS, pad_id=PAD)
        assert [len(t) for t in out] == [n, n, n]


def test_positions_beyond_the_model_raise(model):
    prompt = list(range(3, 13))  # 10 tokens; the model has 64 positions
    assert len(generate(model, [prompt], greedy(54), eos_id=NO_EOS, pad_id=PAD)[0]) == 54
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [prompt], greedy(55), eos_id=NO_EOS, pad_id=PAD)
    with pytest.raises(ValueError):
        generate(model, [[]], greedy(5), eos_id=NO_EOS, pad_id=PAD)


def test_sampling_config_rejects_bad_values():
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-1),
                dict(repetition_penalty=0.0), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


class LetterTokenizer:
    """Every token id decodes to one letter: decoded text has one character per token."""

    bos_id, eos_id, pad_id = 0, -1, 2  # no end-of-text: runs to the budget or a stop string

    def encode(self, text, add_bos=False):
        return ([self.bos_id] if add_bos else []) + [3 + (ord(c) % 90) for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_stop_string_cuts_output_and_ends_generation(model):
    tokenizer = LetterTokenizer()
    (full,) = generate_text(model, tokenizer, ["hello"], greedy(30))
    assert len(full) == 30
    stop = full[6:8]
    position = full.find(stop)  # the first occurrence may come earlier than index 6
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    streamed = []
    try:
        (text,) = generate_text(model, tokenizer, ["hello"], greedy(30, stop=[stop]), on_text=streamed.append)
    finally:
        handle.remove()
    assert text == full[:position]
    assert "".join(streamed) == full[:position]
    assert len(calls) == position + len(stop)  # one forward per token, none after the stop string
    # Several stop strings: the earliest occurrence wins.
    (text,) = generate_text(model, tokenizer, ["hello"], greedy(30, stop=[full[20:22], stop]))
    assert text == full[:min(position, full.find(full[20:22]))]


def test_streamed_text_is_complete_when_no_stop_string_comes(model):
    tokenizer = LetterTokenizer()
    (full,) = generate_text(model, tokenizer, ["hello"], greedy(12))
    # The output ends with the first character of a stop string that never completes: it is held
    # back while streaming, then printed once generation ends.
    streamed = []
    (text,) = generate_text(model, tokenizer, ["hello"], greedy(12, stop=[full[-1] + "#"]), on_text=streamed.append)
    assert text == full
    assert "".join(streamed) == full


def test_stop_string_with_a_trained_tokenizer():
    sentences = ["the cat sat on the mat.", "a dog ran in the park!", "birds sing at dawn; 鸟儿在黎明歌唱。"] * 10
    tokenizer = Tokenizer.train(iter(sentences), vocab_size=300)
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    (full,) = generate_text(model, tokenizer, ["the cat"], greedy(40))
    # Stop at the second printable ASCII character (text from a random model is mostly stray bytes).
    ascii_positions = [i for i, c in enumerate(full) if c.isascii() and c.isprintable()]
    assert len(ascii_positions) >= 2, full
    stop = full[ascii_positions[1]]
    (text,) = generate_text(model, tokenizer, ["the cat"], greedy(40, stop=[stop]))
    assert text == full[:full.index(stop)]
    assert stop not in text
