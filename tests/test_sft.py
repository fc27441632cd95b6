"""`orchard sft`: full and LoRA fine-tuning through the shared engine, adapter checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchard.checkpoint import load_checkpoint, save_checkpoint
from orchard.cli.main import main
from orchard.config import load_config
from orchard.data.synthetic import write_instruction_corpus
from orchard.methods import sft
from orchard.model import CausalLM, ModelConfig
from orchard.tokenizer import Tokenizer

SENTENCES = ["Where does Tom Snow live? Tom Snow lives in Greenfield.", "汤姆·斯诺住在绿野镇。",
             "What is 12 + 7? 19", "Mira Stone has a pet cat."] * 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-base")
    tokenizer = Tokenizer.train(iter(SENTENCES), vocab_size=400)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = CausalLM(config)
    model.reset_parameters(seed=0)
    save_checkpoint(root / "base", model, tokenizer, record={"stage": "test"})
    corpus = write_instruction_corpus(root / "chat.jsonl", split="train", num_conversations=120)
    return {"dir": root / "base", "corpus": corpus}


def run_sft(base, out, *overrides):
    config = load_config(sft.SFTConfig, None, [
        f"init={base['dir']}", f"out={out}", f"data.path={base['corpus']}", "data.max_length=256",
        "train.batch_size=4", "train.eval_every=0", "train.precision=fp32", "train.log_every=1",
        "train.warmup_steps=2", *overrides])
    return sft.run(config)


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_full_sft_lowers_the_loss_and_records_its_parent(base, tmp_path):
    result = run_sft(base, tmp_path / "full", "train.max_steps=20", "train.lr=5e-3")
    curve = losses(tmp_path / "full")
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5, curve
    record = json.loads((result.final_dir / "orchard.json").read_text())
    assert record["stage"] == "sft" and record["parent"]["path"] == str(base["dir"].resolve())
    assert record["parameters"]["trainable"] == record["parameters"]["total"]


def test_lora_trains_only_adapters_and_saves_only_them(base, tmp_path):
    result = run_sft(base, tmp_path / "lora", "train.max_steps=12", "train.lr=1e-2", "peft.method=lora", "peft.r=4")
    curve = losses(tmp_path / "lora")
    assert curve[-1] < curve[0]
    final = result.final_dir
    assert not (final / "model.safetensors").exists()  # the base stays where it is
    assert (final / "adapters.safetensors").is_file() and (final / "peft" / "adapter_config.json").is_file()
    record = json.loads((final / "orchard.json").read_text())
    assert record["stage"] == "sft-lora" and record["parameters"]["trainable"] < record["parameters"]["total"] / 5
    # Loading the adapter checkpoint gives the base with the trained adapter applied.
    tuned, original = load_checkpoint(final), load_checkpoint(base["dir"])
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        assert not torch.allclose(tuned.model(ids).logits, original.model(ids).logits)
    assert torch.equal(tuned.model.model.embed_tokens.weight, original.model.model.embed_tokens.weight)


def test_compiled_lora_run_compiles_its_blocks_and_trains_as_eager(base, tmp_path, monkeypatch):
    """train.compile=true on SFT (packed rows of changing lengths and label counts) compiles the
    decoder blocks, not the whole model with its loss; the losses of a bf16 LoRA run stay within 2%
    of the eager run's, and the model is eager again after the run."""
    import orchard.training.engine as engine

    flags, trainers, runs = [], [], {}
    compiled_method = engine.Trainer._compiled

    def compiled(trainer, model):
        flags.append(getattr(trainer.method, "fixed_shapes", False))
        wrapped = compiled_method(trainer, model)
        flags.append(trainer.model.compiled_blocks)
        trainers.append(trainer)
        return wrapped

    monkeypatch.setattr(engine.Trainer, "_compiled", compiled)
    for mode in ("false", "true"):
        torch.compiler.reset()
        result = run_sft(base, tmp_path / mode, "train.max_steps=6", "train.lr=1e-2", "peft.method=lora", "peft.r=4",
                         "train.precision=bf16", f"train.compile={mode}")
        runs[mode] = losses(tmp_path / mode)
        assert json.loads((result.final_dir / "orchard.json").read_text())["training"]["compiled_at_step"] == \
            (0 if mode == "true" else None)
    assert flags == [False, True] and trainers[0].model.compiled_blocks is False
    assert max(abs(a - b) / a for a, b in zip(runs["false"], runs["true"])) < 0.02, runs


def test_interrupted_lora_run_resumes_to_the_same_adapter(base, tmp_path, monkeypatch):
    steps = ["train.max_steps=8", "train.save_every=4", "train.lr=1e-2", "peft.method=lora", "peft.r=4"]
    reference = run_sft(base, tmp_path / "reference", *steps)
    original = sft.ConversationLanguageModeling.batch

    def crash_at_6(self, step, *args):
        if step == 6:
            raise KeyboardInterrupt
        return original(self, step, *args)

    monkeypatch.setattr(sft.ConversationLanguageModeling, "batch", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        run_sft(base, tmp_path / "resumed", *steps)
    monkeypatch.setattr(sft.ConversationLanguageModeling, "batch", original)
    resumed = run_sft(base, tmp_path / "resumed", *steps)
    assert resumed.resumed_from == 4
    assert (resumed.final_dir / "adapters.safetensors").read_bytes() == \
           (reference.final_dir / "adapters.safetensors").read_bytes()


def test_sft_cli_and_bad_records(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n')
    code = main(["sft", f"init={base['dir']}", f"data.path={bad}", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("orchard: error:") and "bad.jsonl:1" in err[-1]
    assert not (tmp_path / "run" / "final").exists()
    assert main(["sft", "train.max_steps=2"]) == 2
    assert "init" in capsys.readouterr().err


def test_several_adapters_share_one_base_in_one_batch(base, tmp_path, capsys):
    run_sft(base, tmp_path / "a", "train.max_steps=3", "train.lr=5e-2", "peft.method=lora", "peft.r=2")
    run_sft(base, tmp_path / "b", "train.max_steps=3", "train.lr=5e-2", "peft.method=lora", "peft.r=4",
            "train.seed=7")
    capsys.readouterr()
    argv = ["generate", str(base["dir"]), "--prompt", "Tom", "--temperature", "0", "--max-new-tokens", "6",
            "--adapter", f"first={tmp_path / 'a'}", "--adapter", f"second={tmp_path / 'b'}"]
    assert main(argv) == 0
    batched = capsys.readouterr().out
    assert "--- first" in batched and "--- second" in batched
    # Each row of the batch equals that adapter's checkpoint run alone.
    for name in ("a", "b"):
        assert main(["generate", str(tmp_path / name), "--prompt", "Tom", "--temperature", "0",
                     "--max-new-tokens", "6"]) == 0
        alone = capsys.readouterr().out.strip()
        label = "first" if name == "a" else "second"
        assert batched.split(f"--- {label}\n")[1].split("\n---")[0].strip() == alone


def test_exporting_an_adapter_checkpoint_merges_it(base, tmp_path):
    from orchard.interop.export import export_hf

    result = run_sft(base, tmp_path / "lora", "train.max_steps=3", "train.lr=5e-2", "peft.method=lora")
    merged_dir = export_hf(result.final_dir, tmp_path / "merged")
    merged, adapted = load_checkpoint(merged_dir), load_checkpoint(result.final_dir)
    ids = torch.tensor([[3, 8, 21, 5, 40]])
    with torch.no_grad():
        assert (merged.model(ids).logits - adapted.model(ids).logits).abs().max() < 1e-5
    assert not any(".lora." in key for key in merged.model.state_dict())


ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft"


@pytest.mark.skipif(not ALPACA.is_dir(), reason=f"Alpaca data not found under {ALPACA} (shared data is read, never copied)")
@pytest.mark.parametrize("name", ["alpaca_data.json.gz", "alpaca_data_zh.json.gz"])
def test_alpaca_sets_train_with_right_masks(base, tmp_path, name):
    from orchard.data.conversations import read_conversations, tokenize_conversation

    path = ALPACA / name
    tokenizer = load_checkpoint(base["dir"]).tokenizer
    with_input = next(c for c in read_conversations(path, on_error="skip") if "\n\n" in c.messages[0]["content"])
    example = tokenize_conversation(with_input, tokenizer, max_length=4096)
    supervised = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    assert tokenizer.decode(supervised, skip_special_tokens=False) == with_input.messages[-1]["content"] + "<|im_end|>"
    run_sft(base, tmp_path / "run", f"data.path={path}", "data.max_conversations=300", "data.on_error=skip",
            "train.max_steps=15", "train.lr=1e-2")
    curve = losses(tmp_path / "run")
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve


def test_qlora_trains_adapters_on_an_nf4_base(tmp_path):
    pytest.importorskip("torchao", reason="QLoRA's NF4 weights come from torchao, which is not installed")
    from orchard.peft.quantized import quantize_base_nf4

    model = CausalLM(ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2))
    model.reset_parameters(seed=0)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    quantized = quantize_base_nf4(model, ["q_proj", "gate_proj", "up_proj", "down_proj"])
    assert quantized == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
                         "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "NF4Tensor"
    with torch.no_grad():
        after = model(ids).logits
    # 4-bit weights change the function a little, not a lot.
    assert 0 < (after - before).abs().max() < 0.1 * before.abs().max()


@pytest.mark.parametrize("method", ["dora", "adapter", "prefix"])
def test_every_peft_method_saves_only_its_parameters_and_reloads(base, tmp_path, method):
    result = run_sft(base, tmp_path / method, "train.max_steps=4", "train.save_every=2", "train.lr=2e-2",
                     f"peft.method={method}", "peft.bottleneck=8", "peft.num_virtual_tokens=4")
    final = result.final_dir
    assert not (final / "model.safetensors").exists() and not (final / "peft").exists()
    record = json.loads((final / "orchard.json").read_text())
    assert record["parameters"]["trainable"] < record["parameters"]["total"] / 4
    tuned = load_checkpoint(final)
    again = load_checkpoint(final)
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    with torch.no_grad():
        logits = tuned.model(ids).logits
        assert torch.equal(logits, again.model(ids).logits)  # reloading is deterministic
        assert not torch.allclose(logits, load_checkpoint(base["dir"]).model(ids).logits)
    # Resuming from the step-2 checkpoint ends where the uninterrupted run ended.
    (final.parent / "step-000004").rename(final.parent / "moved")
    import shutil
    shutil.rmtree(final)
    resumed = run_sft(base, tmp_path / method, "train.max_steps=4", "train.save_every=2", "train.lr=2e-2",
                      f"peft.method={method}", "peft.bottleneck=8", "peft.num_virtual_tokens=4")
    assert resumed.resumed_from == 2
    assert (resumed.final_dir / "adapters.safetensors").read_bytes() == \
           (final.parent / "moved" / "adapters.safetensors").read_bytes()
