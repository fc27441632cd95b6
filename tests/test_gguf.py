"""GGUF export: tensors named, shaped, typed and permuted as llama.cpp's convert_hf_to_gguf.py writes
them, the tokenizer and hyperparameters in the metadata, f32 > f16 > q8_0 in size, q8_0 close to
the weights, atomic writes, user errors; and, where llama-cpp-python is installed, llama.cpp's
greedy continuation and tokenization equal orchard's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install gguf)")

from orchard.checkpoint import load_checkpoint, save_checkpoint
from orchard.errors import OrchardError
from orchard.interop.gguf import export_gguf
from orchard.model import CausalLM, ModelConfig
from orchard.model.generation import SamplingConfig, generate
from orchard.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
SENTENCES = ["The quick brown fox jumps over the lazy dog.\n",
             "A small model learns the shape of the text it reads.\n",
             "In 2024 the orchard grew 1,234 apples and 56 pears; that's 1290 fruits!\n",
             "敏捷的棕色狐狸跳过了懒狗。\n",
             "Hello world, said the tiny model, and it didn't stop there.\n"]
EXTRA_IDS = 3  # the model's vocab_size exceeds the tokenizer's: GGUF pads the token list


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(SENTENCES * 10), vocab_size=320)


def make_checkpoint(path, tokenizer, seed=0, randomize_biases=False, **settings):
    config = ModelConfig(**{
        "vocab_size": tokenizer.vocab_size + EXTRA_IDS, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 50000.0, "initializer_range": 0.1,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
        **settings})
    model = CausalLM(config)
    model.reset_parameters(seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):  # non-unit norms, so a misplaced norm shows
                parameter.copy_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
            elif randomize_biases and name.endswith(".bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return save_checkpoint(path, model, tokenizer, {"stage": "pretrain"})


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    """A tied-embedding llama checkpoint exported in every dtype."""
    root = tmp_path_factory.mktemp("gguf")
    checkpoint = make_checkpoint(root / "tiny", tokenizer)
    files = {dtype: export_gguf(checkpoint, root / f"tiny-{dtype}.gguf", dtype) for dtype in ("f32", "f16", "q8_0")}
    return checkpoint, files


def gguf_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), written out independently."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute: interleaved rope rows back to half-split."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def field(reader, key):
    return reader.fields[key].contents()


def tensors(reader):
    return {t.name: t for t in reader.tensors}


def as_float(tensor) -> np.ndarray:
    """A tensor's values in numpy (PyTorch) order, dequantized."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return values.reshape(tuple(int(n) for n in reversed(tensor.shape)))


def expected_tensors(config: ModelConfig, qwen2: bool = False) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (out, in), as convert_hf_to_gguf.py writes them."""
    d, f, q, kv = (config.hidden_size, config.intermediate_size, config.num_attention_heads * config.resolved_head_dim,
                   config.num_key_value_heads * config.resolved_head_dim)
    shapes = {"token_embd.weight": (config.vocab_size, d), "output_norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    for i in range(config.num_hidden_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (q, d), f"blk.{i}.attn_k.weight": (kv, d),
                       f"blk.{i}.attn_v.weight": (kv, d), f"blk.{i}.attn_output.weight": (d, q),
                       f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                       f"blk.{i}.ffn_down.weight": (d, f)})
        if qwen2:
            shapes.update({f"blk.{i}.attn_q.bias": (q,), f"blk.{i}.attn_k.bias": (kv,), f"blk.{i}.attn_v.bias": (kv,)})
    return shapes


def original_weights(checkpoint_dir) -> dict[str, np.ndarray]:
    """The checkpoint's weights under GGUF names, q/k still in Hugging Face (half-split) order."""
    model = load_checkpoint(checkpoint_dir).model
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    out = {}
    for name, tensor in model.state_dict().items():
        if name in names:
            out[names[name]] = tensor.numpy()
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        out[f"blk.{layer}.{parts[module]}.{kind}"] = tensor.numpy()
    return out


# --- structure, types, permutation ------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_every_tensor_present_with_shape_and_type(llama, dtype):
    checkpoint, files = llama
    config = load_checkpoint(checkpoint).model.config
    reader = gguf.GGUFReader(files[dtype])
    found = tensors(reader)
    expected = expected_tensors(config)
    assert set(found) == set(expected)  # tied: no output.weight, llama.cpp falls back to token_embd
    weight_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[dtype]
    for name, shape in expected.items():
        tensor = found[name]
        assert tuple(int(n) for n in reversed(tensor.shape)) == shape, name
        assert tensor.tensor_type == (Q.F32 if len(shape) == 1 else weight_type), name
    assert field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]


def test_f32_weights_exact_and_qk_unpermute_to_originals(llama):
    checkpoint, files = llama
    config = load_checkpoint(checkpoint).model.config
    original = original_weights(checkpoint)
    found = tensors(gguf.GGUFReader(files["f32"]))
    for name, tensor in found.items():
        values = as_float(tensor)
        if ".attn_q." in name or ".attn_k." in name:
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            assert not np.array_equal(values, original[name]), f"{name} was not permuted"
            values = unpermute(values, heads)
        np.testing.assert_array_equal(values, original[name], err_msg=name)


def test_permutation_turns_half_split_rope_into_interleaved_rope(llama):
    """The reason for the permutation: GGML's NORM rope rotates pairs (0,1), (2,3), ... and
    Hugging Face's rotates (i, i + D/2); on permuted weights the first equals the second."""
    checkpoint, files = llama
    model = load_checkpoint(checkpoint).model
    config = model.config
    D, H = config.resolved_head_dim, config.num_attention_heads
    q_weight = as_float(tensors(gguf.GGUFReader(files["f32"]))["blk.0.attn_q.weight"])
    x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5)
    cos, sin = model.model.rotary(positions[None])
    hf = model.model.layers[0].self_attn.q_proj(x).view(5, H, D).transpose(0, 1)  # (H, T, D)
    hf = hf * cos[0] + torch.cat([-hf[..., D // 2:], hf[..., :D // 2]], -1) * sin[0]
    q = (x @ torch.tensor(q_weight).T).view(5, H, D // 2, 2).transpose(0, 1)  # interleaved pairs
    angle = positions[:, None] / config.rope_theta ** (torch.arange(0, D, 2) / D)
    c, s = angle.cos(), angle.sin()
    rotated = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], -1)
    # Interleaved result, un-permuted per head, equals the half-split one.
    back = rotated.reshape(H, 5, D // 2, 2).transpose(-1, -2).reshape(H, 5, D)
    torch.testing.assert_close(back, hf, atol=1e-5, rtol=1e-5)


def test_q8_0_dequantizes_close_to_the_weights(llama):
    checkpoint, files = llama
    config = load_checkpoint(checkpoint).model.config
    original = original_weights(checkpoint)
    found = tensors(gguf.GGUFReader(files["q8_0"]))
    for name, tensor in found.items():
        expected = original[name]
        if ".attn_q." in name:
            expected = gguf_permute(expected, config.num_attention_heads)
        elif ".attn_k." in name:
            expected = gguf_permute(expected, config.num_key_value_heads)
        values = as_float(tensor)
        if tensor.tensor_type == Q.F32:
            np.testing.assert_array_equal(values, expected, err_msg=name)
        else:
            assert tensor.tensor_type == Q.Q8_0
            # One scale per 32 values: error at most half a step of max|block| / 127.
            assert np.abs(values - expected).max() <= np.abs(expected).max() / 127, name


def test_f16_weights_are_the_rounded_weights(llama):
    checkpoint, files = llama
    original = original_weights(checkpoint)
    found = tensors(gguf.GGUFReader(files["f16"]))
    embedding = as_float(found["token_embd.weight"])
    np.testing.assert_array_equal(embedding, original["token_embd.weight"].astype(np.float16).astype(np.float32))


def test_file_sizes_shrink_with_the_dtype(llama):
    _, files = llama
    sizes = {dtype: path.stat().st_size for dtype, path in files.items()}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"], sizes


# --- metadata and tokenizer -------------------------------------------------------------------


def test_hyperparameters_in_metadata(llama):
    checkpoint, files = llama
    config = load_checkpoint(checkpoint).model.config
    reader = gguf.GGUFReader(files["f16"])
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name") == "tiny"
    expected = {"context_length": 64, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
                "attention.key_length": 16, "attention.value_length": 16, "vocab_size": config.vocab_size}
    for key, value in expected.items():
        assert field(reader, f"llama.{key}") == value, key
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field(reader, "llama.rope.freq_base") == pytest.approx(50000.0)


def test_tokenizer_in_metadata(llama, tokenizer):
    checkpoint, files = llama
    reader = gguf.GGUFReader(files["q8_0"])
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    data = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in data["added_tokens"]})
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[:tokenizer.vocab_size] == [by_id[i] for i in range(tokenizer.vocab_size)]
    assert tokens[tokenizer.vocab_size:] == [f"[PAD{i}]" for i in range(tokenizer.vocab_size,
                                                                       tokenizer.vocab_size + EXTRA_IDS)]
    types = field(reader, "tokenizer.ggml.token_type")
    special = {tokenizer.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>",
                                                  "<|im_start|>", "<|im_end|>")}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special
    assert all(t == gguf.TokenType.UNUSED for t in types[tokenizer.vocab_size:])
    assert sum(t == gguf.TokenType.NORMAL for t in types) == tokenizer.vocab_size - len(special)
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == len(data["model"]["merges"])
    first = data["model"]["merges"][0]
    assert merges[0] == (first if isinstance(first, str) else " ".join(first))
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template


# --- other shapes of model ------------------------------------------------------------------------


def test_untied_output_and_q8_0_fallback_for_odd_rows(tmp_path, tokenizer):
    checkpoint = make_checkpoint(tmp_path / "untied", tokenizer, tie_word_embeddings=False, intermediate_size=80)
    found = tensors(gguf.GGUFReader(export_gguf(checkpoint, tmp_path / "untied.gguf", "q8_0")))
    original = original_weights(checkpoint)
    assert found["output.weight"].tensor_type == Q.Q8_0
    out = as_float(found["output.weight"])
    assert np.abs(out - original["output.weight"]).max() <= np.abs(original["output.weight"]).max() / 127
    # ffn_down's rows are 80 long, not a multiple of Q8_0's 32: F16, as the converter falls back.
    assert found["blk.0.ffn_down.weight"].tensor_type == Q.F16
    assert found["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0


def test_attention_bias_exports_as_qwen2_without_permutation(tmp_path, tokenizer):
    checkpoint = make_checkpoint(tmp_path / "qwen", tokenizer, attention_bias=True, randomize_biases=True)
    reader = gguf.GGUFReader(export_gguf(checkpoint, tmp_path / "qwen.gguf", "f32"))
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "qwen2.attention.head_count_kv") == 2
    config = load_checkpoint(checkpoint).model.config
    found = tensors(reader)
    assert set(found) == set(expected_tensors(config, qwen2=True))
    original = original_weights(checkpoint)
    for name, tensor in found.items():  # qwen2 uses llama.cpp's NEOX (half-split) rope: no permutation
        np.testing.assert_array_equal(as_float(tensor), original[name], err_msg=name)
    assert np.abs(original["blk.0.attn_q.bias"]).max() > 0


def test_qwen2_with_odd_head_dim_is_refused(tmp_path, tokenizer):
    checkpoint = make_checkpoint(tmp_path / "qwen", tokenizer, attention_bias=True, head_dim=32)
    with pytest.raises(OrchardError, match="qwen2"):
        export_gguf(checkpoint, tmp_path / "qwen.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*tmp*"))


def test_llama_with_explicit_head_dim(tmp_path, tokenizer):
    checkpoint = make_checkpoint(tmp_path / "wide", tokenizer, head_dim=32)  # 4 heads * 32 != 64
    reader = gguf.GGUFReader(export_gguf(checkpoint, tmp_path / "wide.gguf", "f32"))
    assert field(reader, "llama.attention.key_length") == 32
    assert field(reader, "llama.rope.dimension_count") == 32
    q = as_float(tensors(reader)["blk.1.attn_q.weight"])
    np.testing.assert_array_equal(unpermute(q, 4), original_weights(checkpoint)["blk.1.attn_q.weight"])


def edit_pre_tokenizer(checkpoint, change):
    """The checkpoint as a foreign model with another pre-tokenizer: its tokenizer.json edited, and no
    orchard.json (whose tokenizer fingerprint would refuse the edited tokenizer)."""
    (checkpoint / "orchard.json").unlink()
    path = checkpoint / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["pre_tokenizer"] = change(data["pre_tokenizer"])
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_plain_llama3_pre_tokenizer_is_named_llama_bpe(tmp_path, tokenizer):
    checkpoint = make_checkpoint(tmp_path / "llama3", tokenizer)
    edit_pre_tokenizer(checkpoint, lambda pre: {**pre, "pretokenizers": [p for p in pre["pretokenizers"]
                                                                         if p["type"] != "Digits"]})
    reader = gguf.GGUFReader(export_gguf(checkpoint, tmp_path / "llama3.gguf", "f16"))
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"


def test_unknown_pre_tokenizer_is_refused(tmp_path, tokenizer):
    checkpoint = make_checkpoint(tmp_path / "gpt2", tokenizer)
    edit_pre_tokenizer(checkpoint, lambda pre: {"type": "ByteLevel", "add_prefix_space": False,
                                                "trim_offsets": True, "use_regex": True})
    with pytest.raises(OrchardError, match="pre-tokenizer"):
        export_gguf(checkpoint, tmp_path / "gpt2.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf"))


# --- user errors and atomicity ------------------------------------------------------------------


def test_unknown_dtype_is_a_user_error(llama, tmp_path):
    checkpoint, _ = llama
    with pytest.raises(OrchardError, match="q4_0"):
        export_gguf(checkpoint, tmp_path / "x.gguf", "q4_0")
    assert not list(tmp_path.iterdir())


def test_out_is_a_directory_is_a_user_error(llama, tmp_path):
    checkpoint, _ = llama
    with pytest.raises(OrchardError, match="directory"):
        export_gguf(checkpoint, tmp_path, "f16")


def test_failed_export_keeps_the_old_file_and_leaves_no_temporary(llama, tmp_path, monkeypatch):
    checkpoint, _ = llama
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(checkpoint, target, "f16", force=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_export_replaces_only_its_own_earlier_file_unless_forced(llama, tmp_path):
    checkpoint, files = llama
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(OrchardError, match="is an existing file that `orchard export` did not write"):
        export_gguf(checkpoint, target, "q8_0")
    assert target.read_bytes() == b"old"
    assert export_gguf(checkpoint, target, "q8_0", force=True) == target
    assert target.read_bytes() == files["q8_0"].read_bytes()
    # Its own earlier export of the same checkpoint is replaced without --force.
    export_gguf(checkpoint, target, "f16")
    assert target.read_bytes() == files["f16"].read_bytes()


def test_cli_export(llama, tmp_path, capsys):
    from orchard.cli.main import main

    checkpoint, files = llama
    out = tmp_path / "cli.gguf"
    assert main(["export", str(checkpoint), "--format", "gguf", "--out", str(out), "--dtype", "q8_0"]) in (0, None)
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes() == files["q8_0"].read_bytes()


# --- llama.cpp itself ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def open_gguf(llama_cpp, path):
    # F32 KV cache: llama.cpp's default F16 cache alone moves the logits by ~1e-3, enough to flip a
    # near-tie of a random model; with it an f32 file gives orchard's logits to ~1e-6.
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, logits_all=True,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


@pytest.fixture(scope="module")
def llm(llama_cpp, llama):
    _, files = llama
    model = open_gguf(llama_cpp, files["f32"])
    yield model
    model.close()


@pytest.fixture(scope="module")
def continuation(llama, tokenizer):
    """A prompt, orchard's greedy 16-token continuation, and orchard's logits over both."""
    checkpoint, _ = llama
    model = load_checkpoint(checkpoint).model
    prompt = tokenizer.encode("The quick brown fox")
    never = model.config.vocab_size  # no token has this id: generation runs the full 16 tokens
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=16, temperature=0), eos_id=never,
                    pad_id=tokenizer.pad_id)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours])).logits[0].numpy()
    return prompt, ours, logits


def test_llama_cpp_greedy_continuation_matches_orchard(llm, continuation):
    prompt, ours, logits = continuation
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(16):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(token)
        llm.eval([token])
    assert theirs == ours
    # Every position's logits agree (a wrong permutation, rope base, norm or eps would not: leaving
    # out the q/k permutation moves them by ~1).
    np.testing.assert_allclose(np.asarray(llm.scores[:llm.n_tokens - 1]), logits[:-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype, tolerance", [("f16", 2e-2), ("q8_0", 0.3)])
def test_llama_cpp_runs_the_smaller_files(llama_cpp, llama, continuation, dtype, tolerance):
    _, files = llama
    prompt, ours, logits = continuation
    llm = open_gguf(llama_cpp, files[dtype])
    try:
        llm.eval(prompt + ours)
        got = np.asarray(llm.scores[:llm.n_tokens])
    finally:
        llm.close()
    assert logits.std() > 0.5  # the tolerances are small against the spread of the logits
    np.testing.assert_allclose(got, logits, atol=tolerance, rtol=0)


@pytest.mark.parametrize("settings", [
    {"attention_bias": True},  # qwen2: q/k/v bias, NEOX rope, no permutation
    {"tie_word_embeddings": False, "head_dim": 32, "num_key_value_heads": 1},  # output.weight, wide heads, MQA
], ids=["qwen2", "untied-wide-heads"])
def test_llama_cpp_logits_match_other_shapes(llama_cpp, tmp_path, tokenizer, settings):
    checkpoint = make_checkpoint(tmp_path / "model", tokenizer, seed=3, randomize_biases=True, **settings)
    model = load_checkpoint(checkpoint).model
    ids = tokenizer.encode("A small model learns the shape of the text it reads.")
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = open_gguf(llama_cpp, export_gguf(checkpoint, tmp_path / "model.gguf", "f32"))
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[:len(ids)])
    finally:
        llm.close()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("text", [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "In 2024 the orchard grew 1,234 apples; that's 1290 fruits!\n\n  It didn't stop.",
    "敏捷的棕色狐狸 jumps 12345 times…",
    "x１２３４y ²³ ١٢٣ 12345678\t\r\n🦙🦙",  # numbers in other scripts: split one by one on both sides
])
def test_llama_cpp_tokenizes_like_orchard(llm, tokenizer, text):
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tokenizer.encode(text)


def test_llama_cpp_reads_special_tokens(llm, tokenizer):
    assert llm.token_bos() == tokenizer.bos_id
    assert llm.token_eos() == tokenizer.eos_id
    text = "<|im_start|>user\nHi<|im_end|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
