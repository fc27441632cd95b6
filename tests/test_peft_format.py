"""LoRA adapters in PEFT's format: orchard's adapters load with `peft.PeftModel.from_pretrained` and
compute what merging them computes; PEFT's adapters load in orchard with the same tensors; adapters
using features orchard lacks are refused with an error naming the key."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchard.errors import OrchardError
from orchard.peft.format import (
    LoraAdapterConfig,
    load_lora_adapter,
    merged_state_dict,
    save_lora_adapter,
)

transformers = pytest.importorskip("transformers", reason="transformers is needed to build the base model")
peft = pytest.importorskip("peft", reason="peft is needed to check the adapter format")

HIDDEN, LAYERS, INTERMEDIATE, VOCAB = 32, 2, 64, 96


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    return path


def load_base(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def merged_logits(base_dir, config, weights, ids):
    model = load_base(base_dir)
    model.load_state_dict(merged_state_dict(model.state_dict(), config, weights))
    return logits(model, ids)


def random_lora(r, modules, generator):
    """module -> (A (r, in), B (out, r)) with non-zero B, for the tiny Llama's projections."""
    shapes = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN // 2, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN)}
    weights = {}
    for layer in range(LAYERS):
        for name in modules:
            out_features, in_features = shapes[name]
            parent = "mlp" if name == "up_proj" else "self_attn"
            weights[f"model.layers.{layer}.{parent}.{name}"] = (
                torch.randn(r, in_features, generator=generator) * 0.1,
                torch.randn(out_features, r, generator=generator) * 0.1,
            )
    return weights


IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 80, 11, 3]])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_orchard_adapter_loads_in_peft(base_dir, tmp_path, use_rslora):
    generator = torch.Generator().manual_seed(1)
    config = LoraAdapterConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                               use_rslora=use_rslora, base_model_name_or_path=str(base_dir))
    weights = random_lora(4, ["q_proj", "v_proj", "up_proj"], generator)
    save_lora_adapter(tmp_path / "adapter", config, weights)

    peft_model = peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter").eval()
    assert peft_model.active_peft_config.use_rslora is use_rslora
    state = peft_model.state_dict()
    a, b = weights["model.layers.1.mlp.up_proj"]
    assert torch.equal(state["base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight"], a)
    assert torch.equal(state["base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight"], b)

    expected = logits(peft_model, IDS)
    got = merged_logits(base_dir, config, weights, IDS)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - logits(load_base(base_dir), IDS)).abs().max() > 1e-2  # the adapter does change the output
    assert config.scaling() == (16 / 2 if use_rslora else 16 / 4)

    # And it reads back unchanged.
    loaded_config, loaded = load_lora_adapter(tmp_path / "adapter")
    assert (loaded_config.r, loaded_config.lora_alpha, loaded_config.use_rslora) == (4, 16, use_rslora)
    assert sorted(loaded_config.target_modules) == ["q_proj", "up_proj", "v_proj"]
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[m][0], weights[m][0]) and torch.equal(loaded[m][1], weights[m][1])
               for m in weights)


def test_peft_adapter_loads_in_orchard(base_dir, tmp_path):
    torch.manual_seed(2)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(load_base(base_dir), lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")

    config, weights = load_lora_adapter(tmp_path / "adapter")
    assert (config.r, config.lora_alpha, config.scaling()) == (4, 8, 2.0)
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert len(weights) == 2 * LAYERS
    state = peft_model.state_dict()
    for module, (a, b) in weights.items():
        assert torch.equal(a, state[f"base_model.model.{module}.lora_A.default.weight"])
        assert torch.equal(b, state[f"base_model.model.{module}.lora_B.default.weight"])
        assert b.abs().max() > 0

    expected = logits(peft_model, IDS)
    assert (merged_logits(base_dir, config, weights, IDS) - expected).abs().max() <= 1e-4

    # Keys with the adapter's name in them (a PEFT model's state dict) read the same.
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, file)
    _, named = load_lora_adapter(tmp_path / "adapter")
    assert named.keys() == weights.keys()
    assert all(torch.equal(named[m][1], weights[m][1]) for m in weights)


def write_adapter(directory, **config_changes):
    config = LoraAdapterConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    weights = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, HIDDEN), torch.ones(HIDDEN, 2))}
    save_lora_adapter(directory, config, weights)
    config_file = directory / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data.update(config_changes)
    config_file.write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize("change, key", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"bias": "lora_only"}, "bias"),
    ({"peft_type": "IA3"}, "peft_type"),
])
def test_unsupported_features_are_refused(tmp_path, change, key):
    write_adapter(tmp_path / "adapter", **change)
    with pytest.raises(OrchardError, match=f"adapter_config.json: {key}") as excinfo:
        load_lora_adapter(tmp_path / "adapter")
    assert "\n" not in str(excinfo.value)


def test_missing_and_foreign_files(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(OrchardError, match="adapter_config.json: no such file"):
        load_lora_adapter(adapter)
    adapter = write_adapter(tmp_path / "adapter2")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(OrchardError, match="adapter_model.safetensors: no such file"):
        load_lora_adapter(adapter)
    with pytest.raises(OrchardError, match="no such adapter directory"):
        load_lora_adapter(tmp_path / "nowhere")
    # A DoRA magnitude vector (or any non-LoRA tensor) is named.
    adapter = write_adapter(tmp_path / "adapter3")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(HIDDEN)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(OrchardError, match="lora_magnitude_vector is not a LoRA A/B weight"):
        load_lora_adapter(adapter)


def test_save_refuses_mismatches(tmp_path):
    config = LoraAdapterConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    good = (torch.zeros(2, HIDDEN), torch.zeros(HIDDEN, 2))
    with pytest.raises(OrchardError, match="target_modules: model.layers.0.self_attn.k_proj"):
        save_lora_adapter(tmp_path / "a", config, {"model.layers.0.self_attn.k_proj": good})
    with pytest.raises(OrchardError, match="r=2"):
        save_lora_adapter(tmp_path / "a", config, {"model.layers.0.self_attn.q_proj": (good[0], torch.zeros(HIDDEN, 3))})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"")
    with pytest.raises(OrchardError, match="not an adapter directory"):
        save_lora_adapter(tmp_path / "run", config, {"model.layers.0.self_attn.q_proj": good})
    assert (tmp_path / "run" / "model.safetensors").exists()
    with pytest.raises(OrchardError, match="the base model has no"):
        merged_state_dict({}, config, {"model.layers.0.self_attn.q_proj": good})


def test_legacy_bin_weights_and_regex_targets(tmp_path):
    """Older PEFT wrote adapter_model.bin; target_modules may be a regex (the weights then say which)."""
    adapter = write_adapter(tmp_path / "adapter", target_modules=r".*\.(q_proj|v_proj)")
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    config, weights = load_lora_adapter(adapter)
    assert config.target_modules == ["q_proj"]
    assert list(weights) == ["model.layers.0.self_attn.q_proj"]
    assert torch.equal(weights["model.layers.0.self_attn.q_proj"][1], torch.ones(HIDDEN, 2))
