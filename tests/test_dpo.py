"""`orchard dpo`: per-token log-probabilities, each loss checked against sequences scored alone, the
reference cache, a short run that learns the built-in preferences, LoRA, resume, and CLI errors."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext

import pytest
import torch

from orchard.checkpoint import load_checkpoint
from orchard.config import load_config
from orchard.losses.preference import dpo_loss, ipo_loss, orpo_loss, simpo_loss
from orchard.losses.tokens import IGNORE_INDEX, token_log_probs
from orchard.methods import dpo, pairs
from orchard.methods.dpo import DPOConfig, PreferenceOptimization
from orchard.methods.pairs import REFERENCE_FILE, PreferenceDataConfig, cached_reference, load_pairs
from orchard.training.run_directory import RUN_FILE
from orchard.training.distributed import Shard
from orchard.training.runtime import Runtime
from cli_errors import run_error


def run_dpo(chat_base, out, *overrides):
    config = load_config(DPOConfig, None, [
        f"init={chat_base.dir}", f"out={out}", f"data.path={chat_base.pairs}", f"data.val_path={chat_base.val_pairs}",
        "train.batch_size=4", "train.precision=fp32", "train.device=cpu", "train.log_every=1", "train.warmup_steps=0",
        "train.eval_every=0", *overrides])
    return dpo.run(config)


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def parts(chat_base):
    """The parent model in fp32, its tokenizer, and the small train / held-out pair files tokenised."""
    checkpoint = load_checkpoint(chat_base.dir)
    data = PreferenceDataConfig(path=str(chat_base.pairs), val_path=str(chat_base.val_pairs))
    train, val, _ = load_pairs(data, checkpoint.tokenizer, seed=0)
    return checkpoint.model.float(), checkpoint.tokenizer, train, val


def alone(model, example) -> tuple[float, float]:
    """(summed, per-token mean) log-probability of a tokenised conversation's supervised tokens, from
    one unpadded forward pass in float64 arithmetic after the logits."""
    with torch.no_grad():
        logits = model(torch.tensor([example.input_ids])).logits[0].double()
    logps = logits.log_softmax(-1)
    targets = [t for t in range(1, len(example.input_ids)) if example.labels[t] != IGNORE_INDEX]
    total = sum(logps[t - 1, example.input_ids[t]].item() for t in targets)
    return total, total / len(targets)


def test_token_log_probs_is_log_softmax_gathered():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = IGNORE_INDEX
    labels[2, 4] = IGNORE_INDEX
    expected = torch.gather(logits.log_softmax(-1), -1, labels.clamp(min=0)[..., None])[..., 0]
    expected[labels == IGNORE_INDEX] = 0.0
    found = token_log_probs(logits, labels)
    assert found.shape == (3, 5) and found.dtype == torch.float32
    assert torch.allclose(found, expected, atol=1e-6)
    assert (found[labels == IGNORE_INDEX] == 0).all() and (found[labels != IGNORE_INDEX] < 0).all()
    # bf16 logits are scored in fp32.
    assert token_log_probs(logits.bfloat16(), labels).dtype == torch.float32


def test_a_partly_set_train_section_keeps_the_dpo_defaults():
    config = load_config(DPOConfig, None, ["train.max_steps=3", "loss=ipo"])
    assert config.train.max_steps == 3 and config.train.lr == 5e-5 and config.train.batch_size == 8
    assert config.train.warmup_steps == 10 and config.train.weight_decay == 0.0 and config.uses_reference
    assert not load_config(DPOConfig, None, ["loss=simpo"]).uses_reference


def test_at_step_zero_dpo_is_log_two_with_zero_rewards(parts):
    model, tokenizer, train, val = parts
    config = load_config(DPOConfig, None, ["train.batch_size=4", "beta=0.5"])
    reference = {"train": pairs.reference_log_probs(model, train, tokenizer.pad_id, 8, nullcontext),
                 "val": pairs.reference_log_probs(model, val, tokenizer.pad_id, 8, nullcontext)}
    assert reference["train"].shape == (len(train), 2) and model.training  # put back in training mode
    method = PreferenceOptimization(config, train, val, tokenizer.pad_id, reference)
    for step in (0, 5):
        batch = method.batch(step, 0, 0, 1)
        assert method.count(batch) == 4 and batch["input_ids"].shape[0] == 8
        losses, found = method.pair_losses(model, batch)
        assert losses.tolist() == pytest.approx([math.log(2)] * 4, abs=1e-5)
        assert found["chosen"].abs().max() < 1e-5 and found["rejected"].abs().max() < 1e-5
        # The reference rows belong to the pairs of the batch.
        assert torch.allclose(found["logps_chosen"], reference["train"][batch["pair_index"], 0], atol=1e-4)
        total, metrics = method.loss(model, batch)
        assert total.item() == pytest.approx(4 * math.log(2), abs=1e-4)
        assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                "logps/chosen", "logps/rejected"}
    evaluation = method.evaluate(model, Shard())
    assert evaluation["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(evaluation["val_margin"]) < 1e-5


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "orpo"])
def test_each_loss_equals_its_function_of_sequences_scored_alone(parts, loss):
    model, tokenizer, train, val = parts
    config = load_config(DPOConfig, None, [f"loss={loss}", "beta=0.3", "label_smoothing=0.1", "simpo_gamma=0.7",
                                           "orpo_lambda=0.2", "train.batch_size=3"])
    generator = torch.Generator().manual_seed(1)
    reference = None
    if config.uses_reference:  # made-up reference log-probabilities, so the reference terms matter
        reference = {"train": -60 + 20 * torch.rand(len(train), 2, generator=generator),
                     "val": -60 + 20 * torch.rand(len(val), 2, generator=generator)}
    method = PreferenceOptimization(config, train, val, tokenizer.pad_id, reference)
    batch = method.batch(2, 0, 0, 1)
    losses, found = method.pair_losses(model, batch)
    losses.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()

    index = batch["pair_index"].tolist()
    chosen = torch.tensor([alone(model, train[i].chosen) for i in index], dtype=torch.float32)
    rejected = torch.tensor([alone(model, train[i].rejected) for i in index], dtype=torch.float32)
    assert torch.allclose(found["logps_chosen"], chosen[:, 0], atol=1e-4)
    assert torch.allclose(found["logps_rejected"], rejected[:, 0], atol=1e-4)
    if loss in ("dpo", "ipo"):
        ref_chosen, ref_rejected = reference["train"][index, 0], reference["train"][index, 1]
        expected = (dpo_loss(chosen[:, 0], rejected[:, 0], ref_chosen, ref_rejected, 0.3, 0.1) if loss == "dpo"
                    else ipo_loss(chosen[:, 0], rejected[:, 0], ref_chosen, ref_rejected, 0.3))
        assert torch.allclose(found["chosen"], 0.3 * (chosen[:, 0] - ref_chosen), atol=1e-4)
    elif loss == "simpo":
        expected = simpo_loss(chosen[:, 1], rejected[:, 1], 0.3, 0.7, 0.1)
    else:
        expected = orpo_loss(chosen[:, 1], rejected[:, 1], -chosen[:, 1], 0.2)
    assert torch.allclose(losses.detach(), expected, rtol=1e-4, atol=1e-5), (losses, expected)


def test_reference_log_probs_are_cached_for_the_same_pairs_parent_and_precision(parts, tmp_path, monkeypatch):
    model, tokenizer, train, val = parts
    calls = []
    original = pairs.reference_log_probs

    def counted(model, pairs, *args):
        calls.append(len(pairs))
        return original(model, pairs, *args)

    monkeypatch.setattr(pairs, "reference_log_probs", counted)

    def cached(train_pairs=train, sha="abc", precision="fp32"):
        return cached_reference(tmp_path, model, train_pairs, val, tokenizer.pad_id, 8, sha,
                                Runtime(precision=precision))

    first = cached()
    assert calls == [len(train), len(val)] and (tmp_path / REFERENCE_FILE).is_file()
    for i in (0, len(train) - 1):  # each row: the summed log-probability of the reply, scored alone
        assert first["train"][i].tolist() == pytest.approx([alone(model, train[i].chosen)[0],
                                                             alone(model, train[i].rejected)[0]], abs=1e-4)
    assert first["val"][3, 1].item() == pytest.approx(alone(model, val[3].rejected)[0], abs=1e-4)
    again = cached()
    assert len(calls) == 2 and torch.equal(again["train"], first["train"]) and torch.equal(again["val"], first["val"])
    fewer = cached(train[:-1])  # other data
    assert len(calls) == 4 and torch.equal(fewer["train"], first["train"][:-1])
    cached(train[:-1], sha="another parent")
    assert len(calls) == 6
    cached(train[:-1], sha="another parent", precision="bf16")
    assert len(calls) == 8
    cached(train[:-1], sha="another parent", precision="bf16")
    assert len(calls) == 8


def test_dpo_learns_the_builtin_preferences(chat_base, tmp_path):
    # Built-in training pairs (the first 64), validated on 16 built-in held-out ones (data.val_path).
    result = run_dpo(chat_base, tmp_path / "run", "data.path=null", "data.max_pairs=64", "train.max_steps=15",
                     "train.lr=1e-2", "train.eval_every=100")
    evals = [line for line in lines(tmp_path / "run") if "val_margin" in line]
    assert [e["step"] for e in evals] == [0, 15]
    start, end = evals
    assert abs(start["val_margin"]) < 1e-4 and start["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert end["val_margin"] > 0.2 and end["val_accuracy"] >= start["val_accuracy"] + 0.2, evals
    assert end["val_loss"] < start["val_loss"] - 0.05
    steps = [line for line in lines(tmp_path / "run") if "loss" in line]
    assert len(steps) == 15 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "run" / REFERENCE_FILE).is_file()
    record = json.loads((result.final_dir / "orchard.json").read_text())
    assert record["stage"] == "dpo" and record["parent"]["path"] == str(chat_base.dir.resolve())
    assert record["data"]["train_pairs"] == 64 and record["data"]["val_pairs"] == 16
    assert load_checkpoint(result.final_dir).model.config.num_labels == 0


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_lora_saves_an_adapter_checkpoint(chat_base, tmp_path, loss):
    result = run_dpo(chat_base, tmp_path / "run", f"loss={loss}", "train.max_steps=3", "train.lr=5e-2",
                     "peft.method=lora", "peft.r=4")
    final = result.final_dir
    assert (final / "adapters.safetensors").is_file() and not (final / "model.safetensors").exists()
    record = json.loads((final / "orchard.json").read_text())
    assert record["stage"] == f"{loss}-lora" and record["parameters"]["trainable"] < record["parameters"]["total"] / 4
    # The reference is the parent, scored before the adapters exist; SimPO has none.
    assert (tmp_path / "run" / REFERENCE_FILE).is_file() == (loss == "dpo")
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        assert not torch.allclose(load_checkpoint(final).model(ids).logits,
                                  load_checkpoint(chat_base.dir).model(ids).logits)


def test_an_interrupted_run_resumes_to_the_same_bytes(chat_base, tmp_path, monkeypatch):
    steps = ["train.max_steps=6", "train.save_every=3", "train.lr=1e-2", "loss=ipo"]
    reference = run_dpo(chat_base, tmp_path / "reference", *steps)
    original = PreferenceOptimization.batch

    def crash_at_4(self, step, *args):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step, *args)

    monkeypatch.setattr(PreferenceOptimization, "batch", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        run_dpo(chat_base, tmp_path / "resumed", *steps)
    monkeypatch.setattr(PreferenceOptimization, "batch", original)
    resumed = run_dpo(chat_base, tmp_path / "resumed", *steps)
    assert resumed.resumed_from == 3
    assert (resumed.final_dir / "model.safetensors").read_bytes() == \
           (reference.final_dir / "model.safetensors").read_bytes()


def test_a_raised_limit_extends_the_run_with_the_cached_reference(chat_base, tmp_path, monkeypatch):
    run_dpo(chat_base, tmp_path / "run", "train.max_steps=3", "train.lr=1e-2")
    cache = (tmp_path / "run" / REFERENCE_FILE).read_bytes()
    original = pairs.reference_log_probs

    def must_not_run(*args):
        raise AssertionError("the reference was computed again")

    monkeypatch.setattr(pairs, "reference_log_probs", must_not_run)
    extended = run_dpo(chat_base, tmp_path / "run", "train.max_steps=5", "train.lr=1e-2")
    assert extended.resumed_from == 3 and extended.state.step == 5
    assert [line["step"] for line in lines(tmp_path / "run") if "loss" in line] == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / REFERENCE_FILE).read_bytes() == cache

    # Another run directory with this cache but other pairs computes its own.
    (tmp_path / "other").mkdir()
    for name in (RUN_FILE, REFERENCE_FILE):
        shutil.copy(tmp_path / "run" / name, tmp_path / "other" / name)
    calls = []
    monkeypatch.setattr(pairs, "reference_log_probs", lambda model, pairs, *args: calls.append(len(pairs)) or
                        original(model, pairs, *args))
    run_dpo(chat_base, tmp_path / "other", "train.max_steps=1", "data.max_pairs=20")
    assert calls == [20, 16]
    assert (tmp_path / "other" / REFERENCE_FILE).read_bytes() != cache



def test_dpo_cli_errors(chat_base, tmp_path, capsys):
    assert "init" in run_error(capsys, ["dpo", f"out={tmp_path / 'a'}", "train.max_steps=2"])
    line = run_error(capsys, ["dpo", f"init={chat_base.dir}", f"out={tmp_path / 'b'}", "train.max_step=2"])
    assert line.startswith("orchard: error: train.max_step: unknown key")
    assert "bogus" in run_error(capsys, ["dpo", f"init={chat_base.dir}", f"out={tmp_path / 'c'}", "bogus=1"])
    assert "loss" in run_error(capsys, ["dpo", f"init={chat_base.dir}", f"out={tmp_path / 'd'}", "loss=kto"])
    assert "beta" in run_error(capsys, ["dpo", f"init={chat_base.dir}", f"out={tmp_path / 'e'}", "beta=0"])
    assert not any((tmp_path / name).exists() for name in "abcde")
