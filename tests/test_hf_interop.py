"""Hugging Face interoperability: transformers' Llama/Qwen2/Qwen3/Mistral checkpoints load in orchard
and compute the same logits and greedy tokens; orchard checkpoints export to directories stock
transformers loads without warnings; sharded, bf16 and broken checkpoints; Hub ids, offline."""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchard.checkpoint import load_checkpoint, save_checkpoint
from orchard.cli.main import main
from orchard.errors import OrchardError
from orchard.interop.export import export_hf
from orchard.hub import resolve_model_path
from orchard.model import CausalLM, ModelConfig
from orchard.model.generation import SamplingConfig, generate
from orchard.tokenizer import Tokenizer

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face interop tests compare against transformers (pip install -e '.[test]')")

SENTENCES = ["The quick brown fox jumps over the lazy dog.\n",
             "A small model learns the shape of the text it reads.\n",
             "敏捷的棕色狐狸跳过了懒狗。\n",
             "Orchards grow apples, pears and plums in the autumn sun.\n",
             "小模型学习它所读文本的形状。\n"]

VOCAB = 320  # more rows than the tokenizer's ~300 tokens, as Hugging Face models pad their vocabularies
NEVER = 10_000  # an end-of-text id no model here can produce, so greedy decoding runs its full length
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

HF_MODELS = {
    "llama-tied-gqa4": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-untied-mha": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("mistral", dict(sliding_window=None)),
    # Context 16 puts this head size's wavelengths on all three sides of Llama 3.1's interpolation band.
    "llama3-rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, eos_token_id=[1, 3])),
    "linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(SENTENCES * 10), vocab_size=300)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, norms and biases included (left at 1 and 0 they would hide a norm
    or bias applied in the wrong place), large enough that greedy decoding has clear winners."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


def hf_model(model_type: str, **overrides):
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                    bos_token_id=0, eos_token_id=1, pad_token_id=2)
    settings.update(copy.deepcopy(overrides))  # transformers adds rope_theta to a rope_scaling dict it is given
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **settings))
    randomize(model)
    return model.eval()


def save_hf(model, directory: Path, tokenizer: Tokenizer, **save_options) -> Path:
    """A Hugging Face model directory: save_pretrained's files plus a tokenizer orchard can read."""
    model.save_pretrained(directory, **save_options)
    tokenizer.save(directory)
    return directory


def prompt_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_logit_difference(orchard_model: CausalLM, hf, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (orchard_model(ids).logits.float() - hf(ids).logits.float()).abs().max().item()


def greedy_tokens(orchard_model: CausalLM, hf, prompt: list[int]) -> tuple[list[int], list[int]]:
    """32 greedy tokens from each side, neither stopping early."""
    (ours,) = generate(orchard_model, [prompt], SamplingConfig(max_new_tokens=32, temperature=0), eos_id=NEVER,
                       pad_id=2)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=32, eos_token_id=NEVER, pad_token_id=2)
    return ours, theirs[0, len(prompt):].tolist()


class TransformersLog:
    """Everything transformers logs (warnings and the load report) while the block runs."""

    def __enter__(self):
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        logging.getLogger("transformers").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self.handler)

    @property
    def text(self) -> str:
        return self.buffer.getvalue()


def assert_no_weight_complaints(log: str) -> None:
    lowered = log.lower()
    for phrase in ("not initialized", "not used", "missing", "unexpected", "load report", "newly initialized"):
        assert phrase not in lowered, log


# --- Hugging Face checkpoints in orchard -----------------------------------------------------


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_checkpoint_loads_with_the_same_logits_and_greedy_tokens(name, tmp_path, tokenizer):
    model_type, overrides = HF_MODELS[name]
    hf = hf_model(model_type, **overrides)
    checkpoint = load_checkpoint(save_hf(hf, tmp_path / name, tokenizer))
    model = checkpoint.model
    assert model.config.vocab_size == VOCAB and model.lm_head.weight.dtype == torch.float32
    assert model.config.qk_norm == (model_type == "qwen3")
    assert model.config.attention_bias == (model_type == "qwen2")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == hf.config.tie_word_embeddings
    assert max_logit_difference(model, hf, prompt_ids()) <= 1e-4
    ours, theirs = greedy_tokens(model, hf, prompt_ids(1, 8, seed=1)[0].tolist())
    assert ours == theirs and len(ours) == 32


def test_sharded_checkpoint_loads(tmp_path, tokenizer):
    hf = hf_model("llama", tie_word_embeddings=False)
    directory = save_hf(hf, tmp_path / "sharded", tokenizer, max_shard_size="50KB")
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    assert (directory / "model.safetensors.index.json").is_file() and not (directory / "model.safetensors").exists()
    assert max_logit_difference(load_checkpoint(directory).model, hf, prompt_ids()) <= 1e-4


def test_bf16_checkpoint_stays_bf16_unless_a_dtype_is_asked_for(tmp_path, tokenizer):
    hf = hf_model("qwen2").to(torch.bfloat16)
    directory = save_hf(hf, tmp_path / "bf16", tokenizer)
    model = load_checkpoint(directory).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(prompt_ids()).logits.dtype == torch.bfloat16
    upcast = load_checkpoint(directory, dtype=torch.float32).model
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    # (Compared with a fresh load: casting `hf` itself to bf16 and back would round its rotary table.)
    hf_upcast = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert max_logit_difference(upcast, hf_upcast, prompt_ids()) <= 1e-4


def test_missing_tensor_is_named(tmp_path, tokenizer):
    directory = save_hf(hf_model("llama"), tmp_path / "broken", tokenizer)
    state = load_file(directory / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OrchardError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(directory)


def rewrite_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, named", [
    (dict(model_type="qwen2_moe"), "model_type 'qwen2_moe' is not supported"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    (dict(model_type="mistral", sliding_window=16), "sliding_window=16 is not supported"),
])
def test_unsupported_features_are_named(changes, named, tmp_path, tokenizer):
    directory = save_hf(hf_model("llama"), tmp_path / "unsupported", tokenizer)
    rewrite_config(directory, **changes)
    with pytest.raises(OrchardError, match=named) as error:
        load_checkpoint(directory)
    assert str(directory / "config.json") in str(error.value) and "\n" not in str(error.value)


def test_mistral_window_as_long_as_the_context_is_fine(tmp_path, tokenizer):
    directory = save_hf(hf_model("mistral", sliding_window=128), tmp_path / "mistral", tokenizer)
    assert load_checkpoint(directory).model.config.max_position_embeddings == 128


def test_missing_tokenizer_is_named(tmp_path):
    directory = tmp_path / "no-tokenizer"
    hf_model("llama").save_pretrained(directory)
    with pytest.raises(OrchardError, match="tokenizer.json"):
        load_checkpoint(directory)


@pytest.mark.parametrize("config", [  # head_dim given: None would come back as the number it stands for
    ModelConfig(head_dim=64),
    ModelConfig(qk_norm=True, head_dim=32, rope_scaling=LLAMA3_ROPE, eos_token_id=[1, 3], pad_token_id=None),
    ModelConfig(attention_bias=True, head_dim=64, tie_word_embeddings=False,
                rope_scaling={"rope_type": "linear", "factor": 2.0}),
], ids=["llama", "qwen3", "qwen2"])
def test_config_round_trips_and_reads_as_transformers_does(config):
    data = config.to_hf_dict()
    assert ModelConfig.from_hf_dict(data) == config
    theirs = transformers.AutoConfig.for_model(**data)
    assert type(theirs).__name__ == data["architectures"][0].replace("ForCausalLM", "Config")
    assert theirs.rope_parameters["rope_theta"] == config.rope_theta
    assert theirs.rope_parameters["rope_type"] == (config.rope_scaling or {"rope_type": "default"})["rope_type"]
    # A config in transformers 5's own spelling (rope_parameters only) reads the same.
    saved = {k: v for k, v in theirs.to_dict().items() if k not in ("rope_theta", "rope_scaling")}
    assert ModelConfig.from_hf_dict(saved) == config


# --- orchard checkpoints in transformers -----------------------------------------------------


def orchard_checkpoint(path: Path, tokenizer: Tokenizer, **overrides) -> Path:
    settings = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    settings.update(overrides)
    model = CausalLM(ModelConfig(**settings))
    randomize(model, seed=1)
    return save_checkpoint(path, model, tokenizer, {"stage": "pretrain"}, training_state={"step": 1})


@pytest.mark.parametrize("overrides", [
    {},
    dict(attention_bias=True, tie_word_embeddings=False, rope_theta=1e6),
    dict(qk_norm=True, head_dim=32, rope_scaling=LLAMA3_ROPE),
], ids=["llama", "qwen2", "qwen3-llama3-rope"])
def test_export_loads_in_transformers_with_the_same_logits_tokens_and_tokenizer(overrides, tmp_path, tokenizer):
    source = orchard_checkpoint(tmp_path / "run" / "final", tokenizer, **overrides)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (out / "training_state.pt").exists() and (out / "orchard.json").is_file()
    with TransformersLog() as log:
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert_no_weight_complaints(log.text)
    assert not any(info.values()), info
    assert type(hf).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]

    model = load_checkpoint(source).model
    ids = prompt_ids(length=16) % tokenizer.vocab_size
    assert max_logit_difference(model, hf.eval(), ids) <= 1e-4
    ours, theirs = greedy_tokens(model, hf, tokenizer.encode("The quick brown fox"))
    assert ours == theirs and len(ours) == 32
    for text in SENTENCES + ["Numbers 12345 and 混合 text."]:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_export_command_writes_a_directory(tmp_path, tokenizer, capsys):
    source = orchard_checkpoint(tmp_path / "ckpt", tokenizer)
    assert main(["export", str(source), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert str(tmp_path / "hf") in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"


# --- Hub ids ---------------------------------------------------------------------------------


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp, offline. huggingface_hub reads the environment once, at
    import, into `huggingface_hub.constants`; those are what its functions consult at call time."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_resolves_to_the_cached_snapshot_offline(offline_hub, tokenizer):
    repo = offline_hub / "models--tiny-org--tiny-llama"
    snapshot = save_hf(hf_model("llama"), repo / "snapshots" / COMMIT, tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    assert resolve_model_path("hf:tiny-org/tiny-llama").resolve() == snapshot.resolve()
    assert load_checkpoint("hf:tiny-org/tiny-llama").path.resolve() == snapshot.resolve()


def test_unknown_hub_id_is_one_line_error(offline_hub, capsys):
    with pytest.raises(OrchardError, match="hf:tiny-org/no-such-model: not in the Hugging Face cache and could not "
                                           "be downloaded"):
        resolve_model_path("hf:tiny-org/no-such-model")
    assert main(["generate", "hf:tiny-org/no-such-model", "--prompt", "x"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("orchard: error: hf:tiny-org/no-such-model:") and "Traceback" not in "\n".join(error)


def test_a_missing_path_shaped_like_a_hub_id_is_never_downloaded(offline_hub, monkeypatch, tmp_path):
    """`runs/typo` is a local path that does not exist: an error naming it, with no Hub lookup at all."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a local path was looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OrchardError, match=r"^runs/typo: no such checkpoint \(for the Hugging Face Hub model, "
                                           r"write hf:runs/typo\)$"):
        resolve_model_path("runs/typo")
    with pytest.raises(OrchardError, match="hf:../x: not a Hugging Face Hub model id"):
        resolve_model_path("hf:../x")
