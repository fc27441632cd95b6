"""Growing a model: every kind of expansion keeps the parent's function (logits within 1e-5, with
padding, and the same greedy tokens through the KV cache) except G_stack, which is documented not
to; the grown checkpoint saves, loads and is described by `orchard info`; pretraining from it lowers
the loss, and `init_trainable=new` trains the inserted blocks alone; `orchard grow` end to end and
its one-line errors."""

import json

import pytest
import torch

from orchard.checkpoint import load_checkpoint, read_model_config, read_record, save_checkpoint
from orchard.cli.main import main
from orchard.checkpoint.grow import grow_checkpoint
from orchard.lineage import parent_entry
from orchard.model import CausalLM, ModelConfig
from orchard.model.generation import SamplingConfig, generate
from orchard.model.growth import (grow, grow_depth, grow_heads, grow_hidden, grow_mlp, grown_config,
                                  insert_positions)
from orchard.peft import LoraConfig, add_lora
from orchard.tokenizer import Tokenizer
from cli_errors import run_error

SENTENCES = ["The quick brown fox jumps over the lazy dog.\n",
             "A small model learns the shape of the text it reads.\n",
             "Orchards grow apples, pears and plums in the autumn sun.\n",
             "小模型学习它所读文本的形状。\n"]

LLAMA = {}
QWEN2 = {"attention_bias": True}
QWEN3 = {"qk_norm": True}
UNTIED = {"tie_word_embeddings": False, "num_labels": 1}


def tiny_model(vocab_size=100, seed=0, **overrides) -> CausalLM:
    """A random 3-layer model, 32 wide, with weights large enough (std 0.1) for its logits to be
    O(1) and with every norm gain and bias random too, so that none of them can be mishandled
    unnoticed for being 1 or 0."""
    settings = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                "initializer_range": 0.1}
    settings.update(overrides)
    model = CausalLM(ModelConfig(**settings))
    model.reset_parameters(seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                parameter.copy_(base + 0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def random_ids(batch=3, length=16, vocab_size=100, seed=1):
    return torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, prompts, max_new_tokens=8):
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0)
    return generate(model, prompts, config, eos_id=-1, pad_id=0)  # no end token: every row runs to the end


def assert_same_function(parent: CausalLM, child: CausalLM) -> None:
    """The same logits on random ids (within 1e-5), with left padding too, and the same greedy tokens
    through the KV cache."""
    parent, child = parent.eval(), child.eval()
    ids = random_ids(vocab_size=parent.config.vocab_size)
    with torch.no_grad():
        expected = parent(ids).logits
        assert expected.std() > 0.3  # real numbers, not all near zero
        torch.testing.assert_close(child(ids).logits, expected, atol=1e-5, rtol=0)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        mask[1, :11] = 0
        torch.testing.assert_close(child(ids, attention_mask=mask).logits * mask[..., None],
                                   parent(ids, attention_mask=mask).logits * mask[..., None], atol=1e-5, rtol=0)
        if parent.config.num_labels:
            torch.testing.assert_close(child(ids).scores, parent(ids).scores, atol=1e-5, rtol=0)
    prompts = [ids[0, :5].tolist(), ids[1, :9].tolist(), ids[2, :2].tolist()]
    assert greedy(child, prompts) == greedy(parent, prompts)


def snapshot(model: CausalLM) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def counted_parameters(model: CausalLM) -> int:
    # A tied lm_head is the embedding, counted once; ModelConfig.num_parameters leaves out a score head.
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("score."))


# --- each expansion keeps the function -------------------------------------------------------


CASES = {
    "depth-default": (LLAMA, {"layers": 6}),
    "depth-positions": (LLAMA, {"layers": 5, "positions": [0, 4]}),
    "depth-qwen3": (QWEN3, {"layers": 4, "positions": [2]}),
    "depth-other-sizes-unchanged": (LLAMA, {"layers": 4, "hidden_size": 32, "num_attention_heads": 4,
                                            "intermediate_size": 64}),
    "mlp-zero": (LLAMA, {"intermediate_size": 96}),
    "mlp-net2net": (LLAMA, {"intermediate_size": 160, "mlp_method": "net2net"}),
    "heads": ({"num_key_value_heads": 4}, {"num_attention_heads": 6}),
    "heads-gqa": (LLAMA, {"num_attention_heads": 8, "num_key_value_heads": 4}),
    "heads-gqa-default-kv": (LLAMA, {"num_attention_heads": 6}),
    "heads-more-kv": (LLAMA, {"num_key_value_heads": 4}),
    "heads-qwen2": (QWEN2, {"num_attention_heads": 8}),
    "heads-qwen3": (QWEN3, {"num_attention_heads": 8}),
    "hidden": (LLAMA, {"hidden_size": 48}),
    "hidden-qwen2": (QWEN2, {"hidden_size": 64}),
    "hidden-qwen3": (QWEN3, {"hidden_size": 64}),
    "hidden-untied-score": (UNTIED, {"hidden_size": 40}),
    "all": (LLAMA, {"layers": 5, "hidden_size": 64, "num_attention_heads": 8, "intermediate_size": 128}),
    "all-qwen2": (QWEN2, {"layers": 4, "hidden_size": 48, "num_attention_heads": 6, "intermediate_size": 100,
                          "mlp_method": "net2net"}),
    "all-qwen3": (QWEN3, {"layers": 6, "hidden_size": 48, "num_attention_heads": 8, "num_key_value_heads": 8,
                          "intermediate_size": 80}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_growth_keeps_the_function(case):
    overrides, settings = CASES[case]
    parent = tiny_model(**overrides)
    before = snapshot(parent)
    child, description = grow(parent, **settings)

    assert_same_function(parent, child)
    assert all(torch.equal(before[name], tensor) for name, tensor in parent.state_dict().items())  # untouched
    assert child.config == grown_config(parent.config, **settings)
    assert child.config.resolved_head_dim == parent.config.resolved_head_dim == 8
    assert counted_parameters(child) == child.config.num_parameters() == description["parameters"][1]
    assert description["parameters"][0] == parent.config.num_parameters() < description["parameters"][1]
    assert description["function_preserving"] is True
    assert all(p.dtype == torch.float32 for p in child.parameters())
    layers = settings.get("layers")
    if layers is None:
        assert description["new_parameters"] == [] and "new_layers" not in description
    else:
        new = description["new_layers"]
        assert new == settings.get("positions", insert_positions(3, layers - 3))
        assert description["new_parameters"] == [name for name, _ in child.named_parameters()
                                                 if name.startswith(tuple(f"model.layers.{i}." for i in new))]


def test_default_positions_spread_the_new_blocks_evenly():
    assert insert_positions(4, 2) == [2, 5]          # b0 b1 N b2 b3 N, as LLaMA Pro
    assert insert_positions(3, 3) == [1, 3, 5]       # one after each block
    assert insert_positions(4, 1) == [4]             # on top
    assert insert_positions(2, 6) == [1, 2, 3, 5, 6, 7]  # three after each
    assert insert_positions(8, 4) == [2, 5, 8, 11]


def test_identity_blocks_copy_the_block_below_with_zero_outputs():
    parent = tiny_model()
    child = grow_depth(parent, 5, positions=[0, 3])  # new 0 (copies old 0, the block above), old 0, old 1, new 3, old 2
    old = parent.state_dict()
    new = child.state_dict()
    for index, source in [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2)]:
        for name in [n for n in old if n.startswith(f"model.layers.{source}.")]:
            grown = new[name.replace(f"layers.{source}.", f"layers.{index}.", 1)]
            if index in (0, 3) and name.endswith(("o_proj.weight", "down_proj.weight")):
                assert not grown.any()
            else:
                assert torch.equal(grown, old[name])
    assert [layer.self_attn.layer_index for layer in child.model.layers] == [0, 1, 2, 3, 4]


def test_stack_repeats_the_stack_and_changes_the_function():
    parent = tiny_model()
    child, description = grow(parent, layers=6, depth_method="stack")
    assert child.config.num_hidden_layers == 6 and len(child.model.layers) == 6
    assert description["function_preserving"] is False
    assert description["new_layers"] == [3, 4, 5]
    for name, tensor in parent.state_dict().items():
        if name.startswith("model.layers.0."):
            assert torch.equal(child.state_dict()[name.replace("layers.0.", "layers.3.")], tensor)
    ids = random_ids()
    with torch.no_grad():
        difference = (child(ids).logits - parent(ids).logits).abs().max().item()
    assert difference > 0.01  # documented: G_stack is a good start, not the same function


def test_net2net_splits_each_copied_units_output_among_its_copies():
    parent = tiny_model()
    child = grow_mlp(parent, 160, method="net2net", seed=3)
    old, new = parent.model.layers[1].mlp, child.model.layers[1].mlp
    gate, up, down = old.gate_proj.weight, old.up_proj.weight, old.down_proj.weight
    # Every new unit is an exact copy of an old one; each old unit's copies (itself included) share
    # its down column equally and add up to it.
    for unit in range(160):
        source = next(i for i in range(64) if torch.equal(new.gate_proj.weight[unit], gate[i]))
        assert torch.equal(new.up_proj.weight[unit], up[source])
    for unit in range(64):
        copies = [j for j in range(160) if torch.equal(new.gate_proj.weight[j], gate[unit])]
        assert 2 <= len(copies) <= 3  # 96 new units over 64: each copied once before any twice
        columns = new.down_proj.weight[:, copies]
        torch.testing.assert_close(columns, down[:, unit:unit + 1].expand_as(columns) / len(copies))
        torch.testing.assert_close(columns.sum(1), down[:, unit])


def test_zero_mlp_units_are_seeded_and_random():
    parent = tiny_model()
    a, b, c = grow_mlp(parent, 96, seed=0), grow_mlp(parent, 96, seed=0), grow_mlp(parent, 96, seed=1)
    new_rows = a.model.layers[0].mlp.gate_proj.weight[64:]
    assert torch.equal(new_rows, b.model.layers[0].mlp.gate_proj.weight[64:])
    assert not torch.equal(new_rows, c.model.layers[0].mlp.gate_proj.weight[64:])
    assert new_rows.std().item() == pytest.approx(0.1, rel=0.15)  # the model's initializer_range
    assert not a.model.layers[0].mlp.down_proj.weight[:, 64:].any()


def test_grouped_heads_keep_their_keys_and_values():
    parent = tiny_model(**QWEN2)  # 4 query heads on 2 key/value heads
    child = grow_heads(parent, 8)
    assert (child.config.num_attention_heads, child.config.num_key_value_heads) == (8, 4)
    old, new = parent.model.layers[0].self_attn, child.model.layers[0].self_attn
    assert torch.equal(new.k_proj.weight[:16], old.k_proj.weight) and torch.equal(new.v_proj.bias[:16], old.v_proj.bias)
    assert not new.o_proj.weight[:, 32:].any() and not new.q_proj.bias[32:].any()
    # 4 query heads on 4 key/value heads: each old key/value head serves its two old query heads twice.
    child = grow_heads(parent, 4, num_key_value_heads=4)
    new = child.model.layers[0].self_attn
    for kv_head, source in enumerate([0, 0, 1, 1]):
        assert torch.equal(new.k_proj.weight[8 * kv_head:8 * kv_head + 8], old.k_proj.weight[8 * source:8 * source + 8])


def test_new_hidden_dimensions_stay_zero_and_can_learn():
    parent = tiny_model()
    child = grow_hidden(parent, 48)
    with torch.no_grad():
        states = child(random_ids(), output_hidden_states=True).hidden_states
    assert all(not state[..., 32:].any() for state in states)
    assert child.config.rms_norm_eps == pytest.approx(parent.config.rms_norm_eps * 32 / 48)
    # The readers' new columns are random: a loss has a gradient towards the new dimensions.
    child.train()
    ids = random_ids()
    logits = child(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1)).backward()
    assert child.model.embed_tokens.weight.grad[:, 32:].abs().sum() > 0
    assert child.model.layers[0].self_attn.o_proj.weight.grad[32:].abs().sum() > 0


@pytest.mark.parametrize("settings, argument", [
    ({"layers": 2}, "layers"),
    ({"layers": 5, "depth_method": "stack"}, "layers"),
    ({"layers": 5, "positions": [1]}, "positions"),
    ({"layers": 5, "positions": [1, 1]}, "positions"),
    ({"layers": 5, "positions": [1, 5]}, "positions"),
    ({"positions": [1]}, "positions"),
    ({"layers": 6, "depth_method": "stack", "positions": [3, 4, 5]}, "positions"),
    ({"layers": 4, "depth_method": "grow"}, "depth_method"),
    ({"intermediate_size": 32}, "intermediate_size"),
    ({"intermediate_size": 96, "mlp_method": "copy"}, "mlp_method"),
    ({"hidden_size": 16}, "hidden_size"),
    ({"num_attention_heads": 5}, "num_attention_heads"),  # 4 queries on 2 key/value heads: groups of 2
    ({"num_attention_heads": 2}, "num_attention_heads"),
    ({"num_attention_heads": 8, "num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_attention_heads": 8, "num_key_value_heads": 2}, "num_key_value_heads"),  # groups of 4 would split heads
    ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ({"layers": 3, "hidden_size": 32}, "nothing to grow"),
    ({}, "nothing to grow"),
])
def test_bad_growth_names_the_argument(settings, argument):
    parent = tiny_model()
    with pytest.raises(ValueError, match=f"^{argument}"):
        grow(parent, **settings)


def test_a_model_with_adapters_is_refused():
    parent = tiny_model()
    add_lora(parent, LoraConfig(r=2), seed=0)
    with pytest.raises(ValueError, match="^model: growing needs a plain model"):
        grow(parent, layers=4)


# --- checkpoints and `orchard grow` ------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(SENTENCES * 10), vocab_size=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    """A tiny checkpoint: 2 layers, 32 wide, 4 query heads on 2 key/value heads."""
    model = tiny_model(vocab_size=tokenizer.vocab_size, num_hidden_layers=2, max_position_embeddings=128,
                       bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return save_checkpoint(tmp_path_factory.mktemp("grow") / "base", model, tokenizer, {"stage": "pretrain"})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(SENTENCES * 40), encoding="utf-8")
    return path



def test_grown_checkpoint_saves_loads_and_records_its_growth(tmp_path, source, capsys):
    out = tmp_path / "grown"
    result = grow_checkpoint(source, out, layers=3, hidden_size=48, intermediate_size=96, seed=5)
    assert result.path == out
    parent, grown = load_checkpoint(source), load_checkpoint(out)
    assert_same_function(parent.model, grown.model)
    expected, _ = grow(parent.model, layers=3, hidden_size=48, intermediate_size=96, seed=5)
    assert read_model_config(out) == expected.config  # config.json round trip, explicit head_dim included
    assert all(torch.equal(expected.state_dict()[name], tensor) for name, tensor in grown.model.state_dict().items())
    assert grown.tokenizer.vocab_size == parent.tokenizer.vocab_size

    record = read_record(out)
    assert record["stage"] == "grow" and record["parent"] == parent_entry(source)
    assert record["recipe"] == {"layers": 3, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": None,
                                "num_key_value_heads": None, "depth_method": "identity", "positions": None,
                                "mlp_method": "zero", "seed": 5}
    assert record["new_layers"] == [2] and record["function_preserving"] is True
    assert record["new_parameters"] == [name for name, _ in grown.model.named_parameters()
                                        if name.startswith("model.layers.2.")]
    assert record["grew"] == {"hidden_size": [32, 48], "intermediate_size": [64, 96], "num_hidden_layers": [2, 3]}
    assert result.summary() == (f"{out}: {result.parameters_before:,} -> {result.parameters_after:,} parameters; "
                                f"hidden 32 -> 48, MLP 64 -> 96 (zero), layers 2 -> 3 (identity, new at 2); "
                                f"same function")

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "3 layers, hidden 48, MLP 96" in shown and "- grow:" in shown and "- pretrain:" in shown
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["head_dim"] == 8


def test_orchard_grow_end_to_end(tmp_path, source, capsys):
    work = tmp_path / "base"
    work.mkdir()
    for item in source.iterdir():
        (work / item.name).write_bytes(item.read_bytes())
    capsys.readouterr()
    assert main(["grow", str(work), "--layers", "4", "--positions", "0,3", "--heads", "8", "--kv-heads", "4",
                 "--mlp-method", "net2net", "--intermediate-size", "80"]) == 0
    lines = capsys.readouterr().out.splitlines()
    out = tmp_path / "base-grown"  # the default: beside the source
    assert len(lines) == 1 and lines[0].startswith(f"{out}: ")
    assert "layers 2 -> 4 (identity, new at 0, 3)" in lines[0] and "heads 4 -> 8" in lines[0]
    assert "MLP 64 -> 80 (net2net)" in lines[0] and "same function" in lines[0]
    assert_same_function(load_checkpoint(work).model, load_checkpoint(out).model)

    assert main(["grow", str(work), "--layers", "4", "--depth-method", "stack", "--out", str(tmp_path / "s")]) == 0
    line = capsys.readouterr().out.strip()
    assert "layers 2 -> 4 (stack)" in line and "NOT the same function" in line
    assert read_record(tmp_path / "s")["function_preserving"] is False


@pytest.mark.parametrize("argv, words", [
    (["--layers", "1"], ["--layers", "fewer than the model's 2"]),
    (["--heads", "5"], ["--heads", "multiple of 2"]),
    (["--heads", "8", "--kv-heads", "3"], ["--kv-heads"]),
    (["--hidden-size", "16"], ["--hidden-size"]),
    (["--intermediate-size", "10"], ["--intermediate-size"]),
    (["--layers", "4", "--positions", "1"], ["--positions", "1 given for 2 new blocks"]),
    (["--layers", "4", "--positions", "1,x"], ["--positions", "'1,x'"]),
    (["--positions", "1"], ["--positions", "without layers"]),
    (["--layers", "3", "--depth-method", "stack"], ["--layers", "multiple of"]),
    ([], ["nothing to grow"]),
])
def test_orchard_grow_bad_arguments_are_one_line(tmp_path, source, capsys, argv, words):
    line = run_error(capsys, ["grow", str(source), "--out", str(tmp_path / "out"), *argv])
    assert all(word in line for word in words), line
    assert not (tmp_path / "out").exists()


def test_orchard_grow_refuses_quantized_adapter_and_odd_targets(tmp_path, source, capsys):
    from orchard.checkpoint.quantize import quantize_checkpoint

    quantized = quantize_checkpoint(source, tmp_path / "int8", bits=8).path
    line = run_error(capsys, ["grow", str(quantized), "--layers", "3"])
    assert "quantized" in line and str(source.resolve()) in line

    checkpoint = load_checkpoint(source)
    add_lora(checkpoint.model, LoraConfig(r=2), seed=0)
    adapter = save_checkpoint(tmp_path / "lora", checkpoint.model, checkpoint.tokenizer,
                              {"stage": "sft-lora", "parent": parent_entry(source)})
    line = run_error(capsys, ["grow", str(adapter), "--layers", "3"])
    assert "adapter checkpoint" in line and str(source.resolve()) in line

    line = run_error(capsys, ["grow", str(source), "--layers", "3", "--out", str(source)])
    assert "--out" in line
    (tmp_path / "file").write_text("x")
    line = run_error(capsys, ["grow", str(source), "--layers", "3", "--out", str(tmp_path / "file")])
    assert "--out" in line and "did not write from this input" in line


# --- training a grown model -----------------------------------------------------------------


TRAIN = ["data.seq_len=32", "train.max_steps=8", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=0",
         "train.eval_every=8", "train.eval_batches=1", "train.save_every=0", "train.log_every=1",
         "train.precision=fp32"]


def pretrain(out, init, corpus, *overrides):
    from orchard.config import load_config
    from orchard.methods import pretrain as method

    return method.run(load_config(method.PretrainConfig, None,
                                  [f"out={out}", f"init={init}", f"data.path={corpus}", *TRAIN, *overrides]))


def losses(run_dir):
    return [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_pretraining_a_grown_model_lowers_the_loss(tmp_path, source, corpus):
    grown = grow_checkpoint(source, tmp_path / "grown", layers=3, hidden_size=48, num_attention_heads=6,
                            intermediate_size=96).path
    result = pretrain(tmp_path / "run", grown, corpus)
    curve = losses(tmp_path / "run")
    assert len(curve) == 8 and sum(curve[-2:]) / 2 < curve[0] - 0.5, curve
    record = read_record(result.final_dir)
    assert record["parent"]["path"] == str(grown.resolve()) and record["recipe"]["init_trainable"] == "all"
    assert load_checkpoint(result.final_dir).model.config == read_model_config(grown)


def test_training_only_the_new_blocks(tmp_path, source, corpus):
    grown = grow_checkpoint(source, tmp_path / "grown", layers=4, intermediate_size=96).path  # new blocks 1 and 3
    new = set(read_record(grown)["new_parameters"])
    result = pretrain(tmp_path / "run", grown, corpus, "init_trainable=new")
    curve = losses(tmp_path / "run")
    assert sum(curve[-2:]) / 2 < curve[0], curve

    before, after = load_checkpoint(grown).model, load_checkpoint(result.final_dir).model
    after_parameters = dict(after.named_parameters())
    assert new and all(name.startswith(("model.layers.1.", "model.layers.3.")) for name in new)
    for name, parameter in before.named_parameters():
        if name in new:
            assert not torch.equal(parameter, after_parameters[name]), name
        else:
            assert torch.equal(parameter, after_parameters[name]), name
    parameters = read_record(result.final_dir)["parameters"]
    assert parameters == {"trainable": sum(after_parameters[n].numel() for n in new),
                          "total": after.config.num_parameters()}


def test_init_trainable_new_needs_a_depth_grown_init(tmp_path, source, corpus, capsys):
    wide = grow_checkpoint(source, tmp_path / "wide", hidden_size=48).path
    common = [f"data.path={corpus}", *TRAIN, "init_trainable=new"]
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'a'}", f"init={wide}", *common])
    assert "init_trainable" in line and "width only" in line
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'b'}", f"init={source}", *common])
    assert "init_trainable" in line and "orchard grow" in line and "pretrain" in line
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'c'}", *common])
    assert "init_trainable" in line and "init" in line
    line = run_error(capsys, ["pretrain", f"out={tmp_path / 'd'}", f"init={wide}", f"data.path={corpus}",
                              "init_trainable=some"])
    assert "init_trainable" in line
