"""`orchard reward` and the score head: the Bradley-Terry loss by hand, score heads saved and loaded
(full and adapter checkpoints, config.json architectures), a short run that learns to prefer the
chosen replies, and its checkpoint used as a `model:PATH` reward."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchard.checkpoint import adapter_tensors, load_checkpoint, save_checkpoint
from orchard.config import load_config
from orchard.data.preferences import PreferencePair, tokenize_preference_pair
from orchard.data.synthetic import World, preference_pairs
from orchard.methods import reward
from orchard.methods.pairs import TokenizedPair, collate_pairs
from orchard.methods.reward import bradley_terry_loss
from orchard.model import CausalLM, ModelConfig
from orchard.peft.config import PeftConfig, apply_peft
from orchard.rewards import Rewards
from orchard.rewards.models import sequence_scores

IDS = torch.tensor([[5, 9, 12, 7, 30, 41], [8, 3, 3, 100, 2, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def run_reward(chat_base, out, *overrides):
    config = load_config(reward.RewardConfig, None, [
        f"init={chat_base.dir}", f"out={out}", f"data.path={chat_base.pairs}", f"data.val_path={chat_base.val_pairs}",
        "train.batch_size=4", "train.precision=fp32", "train.device=cpu", "train.log_every=1", "train.warmup_steps=0",
        "train.eval_every=0", *overrides])
    return reward.run(config)


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scores(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(ids, attention_mask=mask).scores


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -1.0])

    def by_hand(c, r, margin, coef):
        return math.log1p(math.exp(-(c - r - margin))) + coef * (c + r) ** 2

    for margin, coef in ((0.0, 0.0), (0.5, 0.0), (0.5, 0.1), (-1.0, 2.0)):
        expected = [by_hand(c, r, margin, coef) for c, r in zip(chosen.tolist(), rejected.tolist())]
        assert bradley_terry_loss(chosen, rejected, margin, coef).tolist() == pytest.approx(expected, rel=1e-6)
    assert bradley_terry_loss(chosen, rejected)[2].item() == pytest.approx(math.log(2))
    # Gradients: d/dc = -sigmoid(-(c - r - m)) + 2 k (c + r), and the opposite sign of the first term for r.
    c, r = torch.tensor([2.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    bradley_terry_loss(c, r, 0.5, 0.1).sum().backward()
    s = 1 / (1 + math.exp(0.5))
    assert c.grad.item() == pytest.approx(-s + 0.2 * 3) and r.grad.item() == pytest.approx(s + 0.2 * 3)


def test_score_head_round_trip_in_a_full_checkpoint(chat_base, tmp_path):
    checkpoint = load_checkpoint(chat_base.dir)
    model = checkpoint.model
    assert model.config.num_labels == 0 and scores(model) is None
    model.add_score_head(1, seed=3)
    before = scores(model)
    assert before.shape == (2, 6, 1)
    with torch.no_grad():
        out = model(IDS, attention_mask=MASK, compute_logits=False)
        assert out.logits is None and torch.equal(out.scores, before)
        logits = model(IDS, attention_mask=MASK).logits
    save_checkpoint(tmp_path / "rm", model, checkpoint.tokenizer, record={"stage": "test"})
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM", "LlamaForSequenceClassification"]
    assert config["num_labels"] == 1 and ModelConfig.from_hf_dict(config).num_labels == 1
    loaded = load_checkpoint(tmp_path / "rm").model
    assert loaded.config.num_labels == 1
    assert torch.equal(scores(loaded), before)
    with torch.no_grad():
        assert torch.equal(loaded(IDS, attention_mask=MASK).logits, logits)
    # Right-padded rows are scored at their last real token.
    last_real = [before[0, 5, 0].item(), before[1, 3, 0].item()]
    assert sequence_scores(loaded, IDS, MASK).tolist() == pytest.approx(last_real)


def test_hf_configs_have_a_score_head_only_as_sequence_classifiers():
    base = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2).to_hf_dict()
    assert base["architectures"] == ["LlamaForCausalLM"] and "num_labels" not in base
    assert ModelConfig.from_hf_dict(base).num_labels == 0
    # transformers writes a num_labels into every config; a causal LM still has no head.
    assert ModelConfig.from_hf_dict({**base, "num_labels": 2}).num_labels == 0
    assert ModelConfig.from_hf_dict({**base, "architectures": ["LlamaForSequenceClassification"]}).num_labels == 1
    assert ModelConfig.from_hf_dict({**base, "architectures": ["LlamaForSequenceClassification"],
                                     "num_labels": 3}).num_labels == 3
    qwen = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, attention_bias=True, num_labels=1)
    assert qwen.to_hf_dict()["architectures"] == ["Qwen2ForCausalLM", "Qwen2ForSequenceClassification"]
    assert CausalLM(ModelConfig.from_hf_dict(qwen.to_hf_dict())).score.weight.shape == (1, 32)


def test_adapter_checkpoint_keeps_its_trained_score_head(chat_base, tmp_path):
    checkpoint = load_checkpoint(chat_base.dir)
    model = checkpoint.model.float()
    apply_peft(model, PeftConfig(method="lora", r=4), seed=0)
    model.add_score_head(1, seed=1)  # after the base is frozen: the head trains with the adapters
    torch.manual_seed(0)
    with torch.no_grad():  # stand-ins for trained values
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    expected_scores, tensors = scores(model), adapter_tensors(model)
    assert "score.weight" in tensors and any(".lora." in name for name in tensors)
    save_checkpoint(tmp_path / "rm-lora", model, checkpoint.tokenizer,
                    record={"stage": "test", "parent": {"path": str(chat_base.dir)}})
    assert not (tmp_path / "rm-lora" / "model.safetensors").exists()
    assert json.loads((tmp_path / "rm-lora" / "adapters.json").read_text())["score_head"] == {"num_labels": 1}
    loaded = load_checkpoint(tmp_path / "rm-lora").model
    assert loaded.config.num_labels == 1
    assert torch.allclose(scores(loaded), expected_scores, atol=1e-6)
    assert torch.equal(loaded.score.weight, model.score.weight)
    # A frozen head (a language model's, say) is not an adapter's to save.
    frozen = load_checkpoint(chat_base.dir).model
    frozen.add_score_head(1)
    apply_peft(frozen, PeftConfig(method="lora"), seed=0)
    assert "score.weight" not in adapter_tensors(frozen)


def test_reward_model_learns_and_serves_as_a_reward(chat_base, tmp_path):
    # Built-in pairs (64 for training), validated on the first 32 built-in held-out pairs.
    result = run_reward(chat_base, tmp_path / "rm", "data.path=null", "data.val_path=null", "data.max_pairs=64",
                        "train.max_steps=15", "train.lr=1e-2", "train.eval_every=100", "train.eval_batches=8")
    evals = [line for line in lines(tmp_path / "rm") if "val_accuracy" in line]
    assert [e["step"] for e in evals] == [0, 15]
    assert evals[1]["val_accuracy"] >= evals[0]["val_accuracy"] + 0.2, evals
    assert evals[1]["val_margin"] > evals[0]["val_margin"] and evals[1]["val_loss"] < evals[0]["val_loss"], evals
    train = [line for line in lines(tmp_path / "rm") if "loss" in line]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=0.05) and "rewards/accuracies" in train[0]

    final = result.final_dir
    record = json.loads((final / "orchard.json").read_text())
    assert record["stage"] == "reward" and record["parent"]["path"] == str(chat_base.dir.resolve())
    assert record["parameters"]["trainable"] == record["parameters"]["total"] == 31_392 + 32  # the head included
    assert "SequenceClassification" in json.loads((final / "config.json").read_text())["architectures"][-1]
    checkpoint = load_checkpoint(final)
    assert checkpoint.model.config.num_labels == 1

    # As a reward: the scores `orchard reward` gives the pairs when it validates, chosen above rejected.
    pairs = preference_pairs(World(), "held_out", num_pairs=8)
    tokenized = [TokenizedPair(*tokenize_preference_pair(PreferencePair(p["prompt"], p["chosen"], p["rejected"], "t"),
                                                         checkpoint.tokenizer, 512)) for p in pairs]
    batch = collate_pairs(tokenized, checkpoint.tokenizer.pad_id)
    with torch.no_grad():
        expected = sequence_scores(checkpoint.model, batch["input_ids"], batch["attention_mask"])
    prompts = [p["prompt"] for p in pairs] * 2
    replies = [p["chosen"][0]["content"] for p in pairs] + [p["rejected"][0]["content"] for p in pairs]
    scored = Rewards([f"model:{final}"])(prompts, replies, [None] * 16)
    assert scored.valid.all() and scored.failures == {f"model:{final}": 0}
    assert scored.total.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert (scored.total[:8] > scored.total[8:]).float().mean() >= 0.5


def test_lora_reward_run_saves_the_head_and_resumes_exactly(chat_base, tmp_path, monkeypatch):
    steps = ["train.max_steps=4", "train.save_every=2", "train.lr=2e-2", "peft.method=lora", "peft.r=4"]
    reference = run_reward(chat_base, tmp_path / "reference", *steps)
    final = reference.final_dir
    assert not (final / "model.safetensors").exists()
    record = json.loads((final / "orchard.json").read_text())
    assert record["stage"] == "reward-lora" and record["parameters"]["trainable"] < record["parameters"]["total"] / 4
    loaded = load_checkpoint(final).model
    assert loaded.config.num_labels == 1
    saved = load_checkpoint(final)
    assert torch.equal(scores(loaded), scores(saved.model))
    base = load_checkpoint(chat_base.dir).model
    with torch.no_grad():  # the adapters trained too
        assert not torch.allclose(loaded(IDS).logits, base(IDS).logits)

    original = reward.RewardModeling.batch

    def crash_at_3(self, step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step, *args)

    monkeypatch.setattr(reward.RewardModeling, "batch", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        run_reward(chat_base, tmp_path / "resumed", *steps)
    monkeypatch.setattr(reward.RewardModeling, "batch", original)
    resumed = run_reward(chat_base, tmp_path / "resumed", *steps)
    assert resumed.resumed_from == 2
    assert (resumed.final_dir / "adapters.safetensors").read_bytes() == (final / "adapters.safetensors").read_bytes()


def test_reward_cli_needs_init(capsys):
    from orchard.cli.main import main

    assert main(["reward", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("orchard: error: init:")
