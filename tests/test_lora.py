"""LoRA/rsLoRA/DoRA adapters added to a built orchard model: the base weights keep their names and
values, the adapted model computes what PEFT computes, merging and unmerging are exact, several
adapters serve one batch, and adapters move between orchard and PEFT."""

import pytest
import torch

from orchard.checkpoint import model_state_dict
from orchard.errors import OrchardError
from orchard.model import CausalLM, ModelConfig
from orchard.peft import (
    LoraConfig,
    adapter_routing,
    adapter_state_dict,
    add_lora,
    load_adapter,
    merge_adapter,
    remove_adapter,
    save_adapter,
    set_active_adapters,
    trainable_parameter_count,
    unmerge_adapter,
)

VOCAB = 96
IDS = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))


def base_model() -> CausalLM:
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = CausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norms too, so a norm applied in the wrong place shows
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model.eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def randomize_adapter(model, name, seed, magnitude=True):
    """Random B (and, for DoRA, magnitudes off the row norms) so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if f".lora.{name}.B" in key:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
            elif f".lora.{name}.magnitude" in key and magnitude:
                parameter.mul_(1 + 0.3 * torch.rand(parameter.shape, generator=generator))


def test_surgery_keeps_the_base_and_starts_as_the_identity():
    model = base_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model)
    adapted = add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", r".*\.mlp\.down_proj"]), seed=0)
    assert adapted == [f"model.layers.{i}.{m}" for i in range(2)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]

    state = model.state_dict()
    assert {k: v for k, v in state.items() if ".lora." not in k}.keys() == base_state.keys()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    assert "model.layers.0.self_attn.q_proj.lora.default.A" in state
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora.default." in k for k in trainable)
    count, total = trainable_parameter_count(model)
    assert count == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4 + 4 * 64 + 32 * 4)
    assert total == sum(p.numel() for p in model.parameters()) and 0 < count / total < 0.2

    assert torch.equal(logits(model), expected)
    randomize_adapter(model, "default", seed=1)
    assert (logits(model) - expected).abs().max() > 1e-2
    set_active_adapters(model, None)
    assert torch.equal(logits(model), expected)

    remove_adapter(model, "default")
    assert model.state_dict().keys() == base_state.keys()
    assert not any(m._forward_hooks for m in model.modules())
    assert torch.equal(logits(model), expected)


def test_dora_also_starts_as_the_identity():
    model = base_model()
    expected = logits(model)
    add_lora(model, LoraConfig(r=4, use_dora=True), seed=0)
    assert torch.equal(logits(model), expected)


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merge_computes_the_adapter_and_unmerge_restores_the_base_exactly(variant):
    model = base_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraConfig(r=4, alpha=8, **variant), seed=0)
    randomize_adapter(model, "default", seed=1)
    unmerged = logits(model)
    merge_adapter(model, "default")
    changed = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(changed, base_state["model.layers.0.mlp.up_proj.weight"])
    assert (logits(model) - unmerged).abs().max() <= 1e-5
    with pytest.raises(OrchardError, match="merged already"):
        merge_adapter(model, "default")
    unmerge_adapter(model, "default")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())
    assert torch.equal(logits(model), unmerged)

    # Merged then removed: the adapter is baked into a plain model.
    merge_adapter(model, "default")
    remove_adapter(model, "default")
    assert model.state_dict().keys() == base_state.keys()
    assert (logits(model) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_autocast_computes_and_trains(use_dora):
    model = base_model()
    add_lora(model, LoraConfig(r=4, use_dora=use_dora), seed=0)
    randomize_adapter(model, "default", seed=1)
    expected = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(IDS).logits
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() <= 0.05 * expected.abs().max()
    out.float().square().mean().backward()
    grad = model.model.layers[0].self_attn.q_proj.lora.default.A.grad
    assert grad.dtype == torch.float32 and grad.abs().max() > 0


def test_two_adapters_route_per_sequence():
    model = base_model()
    add_lora(model, LoraConfig(r=4), name="a", seed=0)
    add_lora(model, LoraConfig(r=2, use_dora=True, target_modules=["o_proj", "up_proj"]), name="b", seed=1)
    randomize_adapter(model, "a", seed=2)
    randomize_adapter(model, "b", seed=3)
    with adapter_routing(model, ["a", "b", None]):
        routed = logits(model)
    for row, name in enumerate(["a", "b", None]):
        set_active_adapters(model, name)
        alone = logits(model, IDS[row:row + 1])
        assert (routed[row] - alone[0]).abs().max() <= 1e-5
    assert (routed[0] - routed[1]).abs().max() > 1e-2
    with pytest.raises(OrchardError, match="names 2 sequences, but the batch has 3"), \
            adapter_routing(model, ["a", None]):
        logits(model)
    with pytest.raises(OrchardError, match=r"no LoRA adapter named 'c' \(the model has a, b\)"):
        set_active_adapters(model, ["c"])


def test_training_moves_only_the_adapter():
    model = base_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraConfig(r=4, dropout=0.1), seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    tokens = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(6):
        out = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    assert state["model.layers.1.mlp.down_proj.lora.default.B"].abs().max() > 0


def test_mistakes_are_one_line_errors(tmp_path):
    model = base_model()
    with pytest.raises(OrchardError, match=r"\['wq', 'wk'\] match no linear layer"):
        add_lora(model, LoraConfig(target_modules=["wq", "wk"]))
    with pytest.raises(OrchardError, match="model.layers.0.mlp, a MLP, not a linear layer"):
        add_lora(model, LoraConfig(target_modules=["mlp"]))
    with pytest.raises(OrchardError, match="lm_head, whose weight is shared"):
        add_lora(model, LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(OrchardError, match="lora.r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(OrchardError, match="'hook' is reserved"):
        add_lora(model, LoraConfig(), name="hook")
    add_lora(model, LoraConfig(use_dora=True))
    with pytest.raises(OrchardError, match="already has a LoRA adapter named 'default'"):
        add_lora(model, LoraConfig())
    with pytest.raises(OrchardError, match="uses DoRA"):
        save_adapter(model, "default", tmp_path / "adapter")
    with pytest.raises(OrchardError, match="is not merged"):
        unmerge_adapter(model, "default")


# --- PEFT interop --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers", reason="transformers is needed to compare with PEFT")
    peft = pytest.importorskip("peft", reason="peft is needed to compare with PEFT")
    return transformers, peft


def hf_twin(transformers, model: CausalLM):
    """transformers' LlamaForCausalLM with the orchard model's architecture and base weights."""
    settings = {k: v for k, v in model.config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    twin = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).float()
    base = {k: v for k, v in model_state_dict(model).items() if ".lora." not in k}
    missing, unexpected = twin.load_state_dict(base, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    return twin.eval()


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_orchard_adapter_loads_in_peft(hf, tmp_path, use_rslora):
    transformers, peft = hf
    model = base_model()
    twin = hf_twin(transformers, model)
    add_lora(model, LoraConfig(r=4, alpha=8, use_rslora=use_rslora, target_modules=["q_proj", "v_proj", "up_proj"]),
             seed=0)
    randomize_adapter(model, "default", seed=1)
    save_adapter(model, "default", tmp_path / "adapter", base_model_name_or_path="tiny")
    peft_model = peft.PeftModel.from_pretrained(twin, tmp_path / "adapter").eval()
    assert peft_model.active_peft_config.use_rslora is use_rslora
    assert sorted(peft_model.active_peft_config.target_modules) == ["q_proj", "up_proj", "v_proj"]
    assert (hf_logits(peft_model) - logits(model)).abs().max() <= 1e-4


def test_peft_adapter_loads_in_orchard(hf, tmp_path):
    transformers, peft = hf
    model = base_model()
    torch.manual_seed(3)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_twin(transformers, model), lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    config = load_adapter(model, tmp_path / "adapter", "peft")
    assert (config.r, config.alpha, config.scaling()) == (4, 8, 2.0)
    expected = hf_logits(peft_model)
    assert (expected - hf_logits(hf_twin(transformers, model))).abs().max() > 1e-2
    assert (logits(model) - expected).abs().max() <= 1e-4
    a, b = adapter_state_dict(model, "peft")["model.layers.1.mlp.gate_proj"]
    state = peft_model.state_dict()
    assert torch.equal(a, state["base_model.model.model.layers.1.mlp.gate_proj.lora_A.default.weight"])
    assert torch.equal(b, state["base_model.model.model.layers.1.mlp.gate_proj.lora_B.default.weight"])


def test_dora_computes_what_peft_dora_computes(hf):
    transformers, peft = hf
    model = base_model()
    torch.manual_seed(4)
    lora = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = peft.get_peft_model(hf_twin(transformers, model), lora).eval()
    add_lora(model, LoraConfig(r=4, alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(5)
    ours = dict(model.named_parameters())
    names = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "magnitude"}
    with torch.no_grad():
        for key, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in key:  # magnitudes off PEFT's initial row norms
                parameter.mul_(1 + 0.3 * torch.rand(parameter.shape, generator=generator))
            for theirs, mine in names.items():
                if f".{theirs}." in key:
                    module = key.removeprefix("base_model.model.").split(f".{theirs}.")[0]
                    ours[f"{module}.lora.default.{mine}"].copy_(parameter)
    expected = hf_logits(peft_model)
    assert (expected - hf_logits(hf_twin(transformers, model))).abs().max() > 1e-2
    assert (logits(model) - expected).abs().max() <= 1e-4

    merge_adapter(model, "default")
    merged = peft_model.merge_and_unload().state_dict()
    assert all((model.state_dict()[k] - v).abs().max() <= 1e-6 for k, v in merged.items())
