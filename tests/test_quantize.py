"""Weight-only quantization: the int8/int4 codes and their error bounds, nibble packing, PyTorch's
fused kernels against dequantization, whole models, the quantized checkpoint format, `orchard
quantize` end to end (`quantize_checkpoint` behind it), and the refusals (training, exporting,
re-quantizing a quantized checkpoint)."""

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from torch import nn

from orchard.checkpoint import load_checkpoint, load_merged, save_checkpoint
from orchard.cli.main import main
from orchard.errors import OrchardError
from orchard.methods.pretrain import PretrainConfig, build_model
from orchard.model import CausalLM, ModelConfig
from orchard.model.generation import SamplingConfig, generate, generate_text
from orchard.model.quantization import (QuantizedLinear, decoder_linears, dequantize_weight_int4,
                                        dequantize_weight_int8, pack_int4, quantize_model, quantize_weight_int4,
                                        quantize_weight_int8, quantized_layers, unpack_int4)
from orchard.checkpoint.quantize import quantize_checkpoint
from orchard.tokenizer import Tokenizer
from cli_errors import run_error

SENTENCES = ["The quick brown fox jumps over the lazy dog.\n",
             "A small model learns the shape of the text it reads.\n",
             "Orchards grow apples, pears and plums in the autumn sun.\n",
             "小模型学习它所读文本的形状。\n"]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def tiny_model(vocab_size=300, seed=0, **overrides) -> CausalLM:
    settings = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    settings.update(overrides)
    model = CausalLM(ModelConfig(**settings))
    model.reset_parameters(seed=seed)
    return model.eval()


def random_ids(batch=2, length=16, seed=1):
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the codes: hand-computed examples and error bounds ------------------------------------


def test_int8_hand_example_and_bound():
    weight = torch.tensor([[1.27, -0.5, 0.0, 0.333], [0.0, 0.0, 0.0, 0.0]])
    q, scales = quantize_weight_int8(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales[0].item() == pytest.approx(0.01)
    assert q[0].tolist() == [127, -50, 0, 33]
    assert q[1].tolist() == [0, 0, 0, 0]  # an all-zero row stays zero (no division by zero)
    assert torch.equal(dequantize_weight_int8(q, scales)[1], torch.zeros(4))

    weight = randn(64, 256)
    q, scales = quantize_weight_int8(weight)
    assert torch.allclose(scales, weight.abs().amax(1) / 127)
    error = (dequantize_weight_int8(q, scales) - weight).abs()
    # Round to nearest: no weight is off by more than half a step of its row.
    assert (error.amax(1) <= scales / 2 * (1 + 1e-5)).all()
    # ... and the error is uniform over that half step: mean square scale^2 / 12.
    assert ((error ** 2).mean(1) / (scales ** 2 / 12)).mean().item() == pytest.approx(1.0, abs=0.03)


def test_int4_hand_example_and_packing():
    # One group of 32 spanning [-1, 0.875]: scale 1.875 / 15 = 0.125 and zero -1 + 8 * 0.125 = 0,
    # both exact in bfloat16, so the codes are round((w + 1) / 0.125).
    values = [-1.0, 0.875, 0.3, -0.06, 0.5, -0.9]
    weight = torch.tensor([values + [0.0] * 26])
    packed, scales, zeros = quantize_weight_int4(weight, group_size=32, minimize_error=False)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 16)
    assert scales.dtype == zeros.dtype == torch.bfloat16 and scales.shape == zeros.shape == (1, 1)
    assert scales.item() == 0.125 and zeros.item() == 0.0
    codes = unpack_int4(packed)[0].tolist()
    assert codes[:6] == [0, 15, 10, 8, 12, 1] and codes[6:] == [8] * 26
    # Column 2j in the low nibble, 2j + 1 in the high one.
    assert packed[0, :3].tolist() == [0 | 15 << 4, 10 | 8 << 4, 12 | 1 << 4]
    assert dequantize_weight_int4(packed, scales, zeros, 32)[0, :6].tolist() == [-1.0, 0.875, 0.25, 0.0, 0.5, -0.875]


def test_int4_error_bound_per_group():
    weight = randn(64, 256)
    packed, scales, zeros = quantize_weight_int4(weight, group_size=32, minimize_error=False)
    assert packed.shape == (64, 128) and scales.shape == zeros.shape == (8, 64)
    error = (dequantize_weight_int4(packed, scales, zeros, 32) - weight).abs().reshape(64, 8, 32)
    step = scales.float().t()                                    # (N, K/G)
    groups = weight.reshape(64, 8, 32)
    # The grid [zero - 8 scale, zero + 7 scale] covers [min, max] up to the bfloat16 rounding of
    # scale and zero; within it every weight is at most half a step from a level.
    overshoot = torch.maximum((zeros.float().t() - 8 * step) - groups.amin(-1),
                              groups.amax(-1) - (zeros.float().t() + 7 * step)).clamp(min=0)
    assert (overshoot <= groups.abs().amax(-1) * 2 ** -7).all()
    assert (error.amax(-1) <= step / 2 * (1 + 1e-3) + overshoot).all()
    assert (error.amax(-1) / (step / 2)).max().item() < 1.05
    # Gaussian weights fill the levels unevenly, so a little under the uniform scale^2 / 12.
    assert ((error ** 2).mean(-1) / (step ** 2 / 12)).mean().item() == pytest.approx(0.94, abs=0.05)


def test_int4_minimize_error_never_worse_per_group():
    weight = randn(32, 128)
    errors = {}
    for clip in (False, True):
        packed, scales, zeros = quantize_weight_int4(weight, 32, minimize_error=clip)
        errors[clip] = ((dequantize_weight_int4(packed, scales, zeros, 32) - weight) ** 2).reshape(32, 4, 32).sum(-1)
    assert (errors[True] <= errors[False]).all()
    # A clipped range wins in 41% of these Gaussian groups and lowers the total squared error by 4%.
    assert (errors[True] < errors[False]).float().mean().item() == pytest.approx(0.41, abs=0.01)
    assert (errors[True].sum() / errors[False].sum()).item() == pytest.approx(0.962, abs=0.002)


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (7, 10), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)


def test_int4_pads_to_whole_groups():
    # 48 inputs in groups of 32: stored as 64, the last group half padding. Its weights all lie in
    # [1, 2]: the padding (zeros) must not stretch the group's range down to 0.
    weight = torch.cat([randn(16, 32), 1 + torch.rand(16, 16, generator=torch.Generator().manual_seed(1))], dim=1)
    low, high = weight[:, 32:].amin(1), weight[:, 32:].amax(1)
    errors = {}
    for clip in (False, True):
        packed, scales, zeros = quantize_weight_int4(weight, 32, minimize_error=clip)
        assert packed.shape == (16, 32) and scales.shape == zeros.shape == (2, 16)
        assert dequantize_weight_int4(packed, scales, zeros, 32).shape == (16, 64)
        restored = dequantize_weight_int4(packed, scales, zeros, 32, in_features=48)
        assert restored.shape == (16, 48)
        errors[clip] = ((restored - weight)[:, 32:] ** 2).sum(1)
        if not clip:
            assert torch.allclose(scales[1].float(), (high - low) / 15, rtol=2 ** -7)
            assert ((restored - weight).abs()[:, 32:].amax(1) <= scales[1].float() / 2 * 1.01 + 2 ** -7 * high).all()
    # Clipping judges the half-padded group by its real weights' error only.
    assert (errors[True] <= errors[False]).all()


# --- QuantizedLinear: kernels, fallbacks, dtypes -----------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 64)])
def test_kernel_matches_dequantized_path(bits, group_size):
    linear = nn.Linear(128, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(randn(64, 128) * 0.05)
        linear.bias.copy_(randn(64, seed=1))
    layer = QuantizedLinear.from_linear(linear, bits, group_size)
    x = randn(2, 3, 128, seed=2)
    with torch.no_grad():
        assert layer.prepare()  # the fused CPU kernel runs for these shapes
        fused = layer(x)
        layer.use_kernel = False
        assert not layer.prepare()
        plain = layer(x)
        exact = linear(x)
    assert fused.shape == plain.shape == (2, 3, 64) and fused.dtype == torch.float32
    assert torch.allclose(plain, x @ layer.dequantized_weight().t() + linear.bias, atol=1e-5)
    # The kernels round the activations to bfloat16: agreement within that rounding.
    assert relative_error(fused, plain) < 5e-3
    assert relative_error(plain, exact) < (0.01 if bits == 8 else 0.1)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_survives_misaligned_tensors(bits):
    # A memory-mapped safetensors weight, or a slice of a larger input, need not be 16-byte aligned,
    # which PyTorch's int8 kernel does not survive (a segfault, not an error): the layer copies them.
    layer = QuantizedLinear.from_linear_weight(randn(64, 128) * 0.05, None, bits, 32)
    storage = torch.empty(layer.qweight.numel() + 64, dtype=layer.qweight.dtype)
    start = (64 - storage.data_ptr() % 64) % 64 + 8
    storage[start:start + layer.qweight.numel()] = layer.qweight.flatten()
    layer.qweight = storage[start:start + layer.qweight.numel()].view(layer.qweight.shape)
    assert layer.qweight.data_ptr() % 16 == 8
    inputs = randn(64 * 128 + 64, seed=1).bfloat16()
    offset = (64 - inputs.data_ptr() % 64) % 64 // 2 + 4
    x = inputs[offset:offset + 64 * 128].view(64, 128)
    assert x.data_ptr() % 16 == 8
    with torch.no_grad():
        assert layer.prepare()
        fused = layer(x).float()
        layer.use_kernel = False
        assert relative_error(fused, layer(x.float())) < 5e-3


@pytest.mark.parametrize("out_features,in_features,group_size", [(24, 64, 32), (32, 64, 16), (24, 48, 32)])
def test_shapes_the_kernel_refuses_fall_back(out_features, in_features, group_size):
    weight = randn(out_features, in_features)
    layer = QuantizedLinear.from_linear_weight(weight, None, 4, group_size)
    x = randn(5, in_features, seed=1)
    with torch.no_grad():
        assert not layer.prepare()  # out_features not a multiple of 16, or a group size it lacks
        assert torch.allclose(layer(x), x @ layer.dequantized_weight().t(), atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_layer_padded_to_whole_groups(bias):
    # 48 inputs, groups of 32: the codes cover 64 columns, the layer still takes and multiplies 48.
    linear = nn.Linear(48, 32, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(randn(32, 48) * 0.05)
    layer = QuantizedLinear.from_linear(linear, 4, 32)
    assert (layer.in_features, layer.padded_in_features) == (48, 64)
    assert layer.qweight.shape == (32, 32) and layer.scales.shape == (2, 32)
    assert layer.dequantized_weight().shape == (32, 48)
    x = randn(2, 3, 48, seed=2)
    bias_term = 0 if linear.bias is None else linear.bias
    with torch.no_grad():
        assert layer.prepare()  # the kernel takes it (out_features 32), its input padded with zeros
        fused = layer(x)
        layer.use_kernel = False
        plain = layer(x)
        exact = linear(x)
    assert fused.shape == plain.shape == (2, 3, 32)
    assert torch.allclose(plain, x @ layer.dequantized_weight().t() + bias_term, atol=1e-5)
    assert relative_error(fused, plain) < 5e-3
    assert relative_error(plain, exact) < 0.1
    # Whatever the padding columns' codes dequantize to, they multiply zeros: garbage in them changes nothing.
    layer.qweight[:, 24:] = 0xFF
    with torch.no_grad():
        assert torch.equal(layer(x), plain)
        layer.use_kernel = True
        layer._kernel = None
        assert relative_error(layer(x), fused) < 1e-6


def test_bfloat16_autocast_and_gradients():
    layer = QuantizedLinear.from_linear_weight(randn(32, 64) * 0.1, randn(32), 4, 32)
    x = randn(4, 64, seed=1)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    # No kernel has a backward: an input that needs gradients is multiplied by the dequantized weight.
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dequantized_weight().sum(0).expand(4, 64), atol=1e-5)
    assert not list(layer.parameters())


def test_casting_the_model_keeps_the_format():
    model = tiny_model()
    quantize_model(model, 4, 32)
    model.to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.qweight.dtype == torch.uint8 and layer.scales.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    model.float()
    assert layer.scales.dtype == layer.zeros.dtype == torch.bfloat16
    model8 = tiny_model()
    quantize_model(model8, 8)
    model8.to(torch.bfloat16)
    assert model8.model.layers[0].mlp.up_proj.scales.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model8(random_ids()).logits).all()


# --- whole models ------------------------------------------------------------------------------


@torch.no_grad()
def test_quantized_model_logits_close_to_original():
    model = tiny_model()
    ids = random_ids()
    expected = model(ids).logits
    errors = {}
    for bits in (8, 4):
        quantized = copy.deepcopy(model)
        names = quantize_model(quantized, bits, 32)
        assert len(names) == 14 and set(names) == set(decoder_linears(model))
        assert type(quantized.lm_head) is nn.Linear and quantized.lm_head.weight is quantized.model.embed_tokens.weight
        errors[bits] = relative_error(quantized(ids).logits, expected)
    assert errors[8] < 0.02
    assert errors[4] < 0.15
    assert errors[8] < errors[4] / 5


@torch.no_grad()
def test_layers_without_whole_groups_are_padded():
    model = tiny_model(intermediate_size=96)  # down_proj has 96 inputs: not a multiple of 64
    ids = random_ids()
    expected = model(ids).logits
    names = quantize_model(model, 4, 64)
    assert len(names) == 14
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantizedLinear) and (down.in_features, down.padded_in_features) == (96, 128)
    assert relative_error(model(ids).logits, expected) < 0.15


def test_quantize_model_rejects_bad_settings():
    with pytest.raises(OrchardError, match="bits: must be 8 or 4, got 3"):
        quantize_model(tiny_model(), 3)
    with pytest.raises(OrchardError, match="power of two"):
        quantize_model(tiny_model(), 4, 48)


# --- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(SENTENCES * 10), vocab_size=300)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A tiny untrained checkpoint and a small corpus."""
    root = tmp_path_factory.mktemp("quantize")
    model = tiny_model(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                       bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id)
    save_checkpoint(root / "base", model, tokenizer, {"stage": "pretrain"})
    corpus = root / "corpus.txt"
    corpus.write_text("".join(SENTENCES * 30), encoding="utf-8")
    return root / "base", corpus


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_save_load_round_trip(tmp_path, base, bits):
    checkpoint = load_checkpoint(base[0])
    model = checkpoint.model
    names = quantize_model(model, bits, 32)
    ids = random_ids()
    expected = model(ids).logits
    save_checkpoint(tmp_path / "q", model, checkpoint.tokenizer, {"stage": "quantize"})

    settings = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert settings == {"bits": bits, "group_size": 32 if bits == 4 else None,
                        "scheme": "int8-symmetric-per-channel" if bits == 8 else "int4-asymmetric-grouped",
                        "modules": names}
    assert "quantization_config" not in json.loads((tmp_path / "q" / "config.json").read_text())
    with safe_open(tmp_path / "q" / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        qweight = handle.get_tensor("model.layers.0.self_attn.q_proj.qweight")
        scales = handle.get_tensor("model.layers.0.self_attn.q_proj.scales")
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert ("model.layers.1.mlp.down_proj.zeros" in keys) == (bits == 4)
    assert qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert qweight.shape == ((64, 64) if bits == 8 else (64, 32))
    assert scales.dtype == (torch.float32 if bits == 8 else torch.bfloat16)

    loaded = load_checkpoint(tmp_path / "q")
    assert set(quantized_layers(loaded.model)) == set(names)
    assert torch.equal(loaded.model(ids).logits, expected)

    # Loading in bfloat16 casts the rest of the model, never the codes, scales or zeros.
    half = load_checkpoint(tmp_path / "q", dtype=torch.bfloat16)
    layer = half.model.model.layers[0].self_attn.q_proj
    assert half.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.qweight.dtype == qweight.dtype and layer.scales.dtype == scales.dtype
    assert relative_error(half.model(ids).logits.float(), expected) < 0.05


@torch.no_grad()
def test_padded_layers_save_load_round_trip(tmp_path, tokenizer):
    # down_proj's 80 inputs are stored as 96 (three groups of 32).
    model = tiny_model(vocab_size=tokenizer.vocab_size, intermediate_size=80)
    ids = random_ids()
    original = model(ids).logits
    names = quantize_model(model, 4, 32)
    assert len(names) == 14
    expected = model(ids).logits
    assert relative_error(expected, original) < 0.15
    save_checkpoint(tmp_path / "q", model, tokenizer, {"stage": "quantize"})
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["modules"] == names
    with safe_open(tmp_path / "q" / "model.safetensors", framework="pt") as handle:
        assert handle.get_tensor("model.layers.1.mlp.down_proj.qweight").shape == (64, 48)
        assert handle.get_tensor("model.layers.1.mlp.down_proj.scales").shape == (3, 64)
    loaded = load_checkpoint(tmp_path / "q")
    down = loaded.model.model.layers[1].mlp.down_proj
    assert (down.in_features, down.padded_in_features) == (80, 96)
    assert torch.equal(loaded.model(ids).logits, expected)
    for layer in quantized_layers(loaded.model).values():
        layer.use_kernel = False
    assert relative_error(loaded.model(ids).logits, expected) < 5e-3


def test_corrupt_quantization_json_is_one_line_error(tmp_path, base):
    checkpoint = load_checkpoint(base[0])
    quantize_model(checkpoint.model, 8)
    save_checkpoint(tmp_path / "q", checkpoint.model, checkpoint.tokenizer, {"stage": "quantize"})
    settings_file = tmp_path / "q" / "quantization.json"
    settings = json.loads(settings_file.read_text())
    settings_file.write_text(json.dumps({**settings, "modules": ["model.layers.0.input_layernorm"]}))
    with pytest.raises(OrchardError, match="input_layernorm is not a linear layer"):
        load_checkpoint(tmp_path / "q")
    settings_file.write_text(json.dumps({**settings, "bits": 2}))
    with pytest.raises(OrchardError, match=r"quantization.json: bits: must be 8 or 4"):
        load_checkpoint(tmp_path / "q")



def eval_json(capsys, checkpoint, corpus) -> dict:
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--data", str(corpus), "--seq-len", "32", "--json"]) == 0
    bpb = next(iter(json.loads(capsys.readouterr().out)["results"]["bpb"].values()))
    return {**bpb["metrics"], "tokens": bpb["items"]}


def test_cli_quantize_then_eval_info_generate(tmp_path, base, capsys):
    source, corpus = base
    out = tmp_path / "int4"
    capsys.readouterr()
    assert main(["quantize", str(source), "--bits", "4", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out}: 14 of 14 linear layers to int4 (groups of 32); weights ")
    assert len(line.splitlines()) == 1

    record = json.loads((out / "orchard.json").read_text())
    assert record["stage"] == "quantize"
    assert record["parent"]["path"] == str(source.resolve())
    assert record["recipe"] == {"bits": 4, "group_size": 32, "scheme": "int4-asymmetric-grouped",
                                "minimize_error": False}
    before, after = record["metrics"]["weights_bytes_before"], record["metrics"]["weights_bytes_after"]
    # The embeddings (300 x 64 float32) stay; 14 layers of float32 weights become 4.5 bits each.
    linear_weights = 2 * (4 * 64 * 64 - 2 * 32 * 64 + 3 * 64 * 128)
    assert before - after == linear_weights * 4 - linear_weights // 2 - 2 * 2 * (linear_weights // 32)
    assert (out / "model.safetensors").stat().st_size < (source / "model.safetensors").stat().st_size / 2

    original, quantized = eval_json(capsys, source, corpus), eval_json(capsys, out, corpus)
    assert quantized["tokens"] == original["tokens"]
    assert math.isfinite(quantized["loss"])
    assert quantized["perplexity"] == pytest.approx(original["perplexity"], rel=0.01)

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "quantized: int4, groups of 32, 14 of 14 linear layers" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "The", "--max-new-tokens", "5", "--seed", "0"]) == 0


def test_cli_default_out_and_int8(tmp_path, base, capsys):
    source = tmp_path / "final"
    shutil.copytree(base[0], source)
    capsys.readouterr()
    assert main(["quantize", str(source), "--bits", "8"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'final-int8'}: 14 of 14 linear layers to int8; ")
    assert json.loads((tmp_path / "final-int8" / "quantization.json").read_text())["bits"] == 8
    assert main(["quantize", str(source), "--bits", "4", "--group-size", "64"]) == 0
    assert (tmp_path / "final-int4-g64" / "quantization.json").is_file()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--help"])
    assert exit_info.value.code == 0
    assert "--group-size" in capsys.readouterr().out


def test_cli_user_errors(tmp_path, base, capsys):
    source = base[0]
    assert run_error(capsys, ["quantize", str(source), "--bits", "3"]) == \
        "orchard: error: --bits: must be 8 or 4, got 3"
    assert "--group-size: must be a power of two" in run_error(capsys, ["quantize", str(source), "--bits", "4",
                                                                         "--group-size", "48"])
    assert "--group-size: int8" in run_error(capsys, ["quantize", str(source), "--bits", "8", "--group-size", "32"])
    missing = tmp_path / "missing"
    assert str(missing) in run_error(capsys, ["quantize", str(missing), "--bits", "8"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "did not write from this input" in run_error(capsys, ["quantize", str(source), "--bits", "8",
                                                       "--out", str(tmp_path / "taken")])
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"

    quantized = tmp_path / "q"
    assert main(["quantize", str(source), "--bits", "8", "--out", str(quantized)]) == 0
    line = run_error(capsys, ["quantize", str(quantized), "--bits", "4"])
    assert f"{quantized}: a quantized checkpoint is for inference" in line and str(source.resolve()) in line
    line = run_error(capsys, ["export", str(quantized), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert "for inference" in line and f"export its parent {source.resolve()}" in line
    assert not (tmp_path / "hf").exists()


def test_training_refuses_a_quantized_checkpoint(tmp_path, base, tokenizer, capsys):
    quantized = tmp_path / "q"
    assert main(["quantize", str(base[0]), "--bits", "4", "--out", str(quantized)]) == 0
    with pytest.raises(OrchardError) as error:
        load_merged(quantized)
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"{quantized}: a quantized checkpoint is for inference (eval, generate, chat); "
                       f"train from its parent {base[0].resolve()}")
    # pretrain's init loads with load_checkpoint, not load_merged: it refuses on its own, and before
    # preparing a tokenizer or a corpus.
    with pytest.raises(OrchardError) as error:
        build_model(PretrainConfig(init=str(quantized)), tokenizer)
    assert str(error.value) == message
    run_dir = tmp_path / "run"
    assert run_error(capsys, ["pretrain", f"init={quantized}", f"out={run_dir}"]) == f"orchard: error: {message}"
    assert not run_dir.exists()


def test_quantize_checkpoint_reuses_an_identical_result(tmp_path, base):
    source = tmp_path / "final"
    shutil.copytree(base[0], source)
    first = quantize_checkpoint(source, None, 4)
    assert first.path == tmp_path / "final-int4-g32" and not first.reused
    assert len(first.quantized) == 14 and first.skipped == []
    assert first.size_after < first.size_before / 2
    assert first.summary().startswith(f"{first.path}: 14 of 14 linear layers to int4 (groups of 32); weights ")
    weights = first.path / "model.safetensors"
    written = weights.stat().st_mtime_ns

    again = quantize_checkpoint(source, first.path, 4, 32, minimize_error=False)
    assert again.reused and weights.stat().st_mtime_ns == written
    assert (again.quantized, again.size_before, again.size_after) == (first.quantized, first.size_before,
                                                                       first.size_after)
    assert "not redone" in again.summary()

    # Other settings, or other weights behind the same path, are quantized again.
    assert not quantize_checkpoint(source, first.path, 4, minimize_error=True).reused
    assert not quantize_checkpoint(source, first.path, 4).reused
    assert quantize_checkpoint(source, first.path, 4).reused
    checkpoint = load_checkpoint(source)
    with torch.no_grad():
        checkpoint.model.model.norm.weight.mul_(2)
    save_checkpoint(source, checkpoint.model, checkpoint.tokenizer, {"stage": "pretrain"})
    assert not quantize_checkpoint(source, first.path, 4).reused
    assert quantize_checkpoint(source, first.path, 4).reused
    # An older copy whose quantization.json leaves layers out (int4 used to skip layers without whole
    # groups) is not what this call makes.
    settings_file = first.path / "quantization.json"
    settings = json.loads(settings_file.read_text())
    settings_file.write_text(json.dumps({**settings, "modules": settings["modules"][:-1]}))
    assert not quantize_checkpoint(source, first.path, 4).reused

    with pytest.raises(OrchardError, match="^--group-size: int8"):
        quantize_checkpoint(source, None, 8, 32)
    with pytest.raises(OrchardError, match="^--minimize-error: applies to --bits 4"):
        quantize_checkpoint(source, None, 8, minimize_error=True)


@torch.no_grad()
def test_generation_on_a_quantized_model(tmp_path, base):
    quantized = tmp_path / "q"
    assert main(["quantize", str(base[0]), "--bits", "4", "--out", str(quantized)]) == 0
    checkpoint = load_checkpoint(quantized)
    (text,) = generate_text(checkpoint.model, checkpoint.tokenizer, ["The quick"],
                            SamplingConfig(max_new_tokens=6, temperature=0))
    assert isinstance(text, str)
    prompt = checkpoint.tokenizer.encode("The quick brown")
    (tokens,) = generate(checkpoint.model, [prompt], SamplingConfig(max_new_tokens=12, temperature=0),
                         eos_id=[], pad_id=checkpoint.tokenizer.pad_id)
    assert len(tokens) == 12 and all(0 <= t < 300 for t in tokens)
    # Sampling with a seed repeats itself.
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    assert generate(checkpoint.model, [prompt], sampling, eos_id=[], pad_id=0) == \
        generate(checkpoint.model, [prompt], sampling, eos_id=[], pad_id=0)
