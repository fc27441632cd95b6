"""`orchard ppo`: the batch it prepares (token rewards with the KL penalty, GAE, whitened advantages)
checked against the pure functions, a short run with its metrics, a LoRA run whose value head is
saved with the adapters and restored on resume, failed rewards left out of the loss, and the
rollout reused for num_iterations steps with the clipped ratio then in play."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchard.checkpoint import load_checkpoint
from orchard.config import load_config
from orchard.errors import OrchardError
from orchard.methods import ppo
from orchard.methods.ppo import PPO, PPOConfig
from orchard.losses.rl import gae, token_rewards_with_kl, whiten
from orchard.methods.rollouts import completion_log_probs


def run_ppo(chat_base, out, *overrides):
    config = load_config(PPOConfig, None, [
        f"init={chat_base.dir}", f"out={out}", "max_new_tokens=6", "data.max_prompts=16", "data.eval_prompts=4",
        "train.batch_size=4", "train.precision=fp32", "train.eval_every=0", "train.warmup_steps=0",
        "train.save_every=0", "train.lr=1e-2", *overrides])
    return ppo.run(config)


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def captured(monkeypatch):
    found = {"batches": []}
    init, prepare = PPO.__init__, PPO.prepare

    def keep_method(self, *args, **kwargs):
        init(self, *args, **kwargs)
        found["method"] = self

    def keep_batch(self, batch):
        prepared = prepare(self, batch)
        found["batches"].append({k: v.clone() for k, v in prepared.items()})
        return prepared

    monkeypatch.setattr(PPO, "__init__", keep_method)
    monkeypatch.setattr(PPO, "prepare", keep_batch)
    return found


def test_a_short_run_prepares_batches_as_the_pure_functions_say(chat_base, tmp_path, captured):
    result = run_ppo(chat_base, tmp_path / "run", "train.max_steps=3", "rewards=[0.1*length_penalty]",
                     "kl_coef=0.2", "gamma=0.9", "lam=0.8")
    steps = [line for line in lines(tmp_path / "run") if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3]
    for line in steps:
        assert {"reward", "kl", "policy_loss", "value_loss", "clip_ratio", "reward_failures"} <= set(line)
        assert math.isfinite(line["loss"]) and line["clip_ratio"] == 0.0  # one update per rollout: ratio 1
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    batch = captured["batches"][0]
    mask = batch["loss_mask"]
    rewards = token_rewards_with_kl(batch["rewards"], batch["old_logps"], batch["ref_logps"], mask, 0.2)
    advantages, returns = gae(rewards, batch["old_values"], mask, 0.9, 0.8)
    torch.testing.assert_close(batch["advantages"], whiten(advantages, mask))
    torch.testing.assert_close(batch["returns"], returns)
    # The first rollout's policy is the parent with a fresh value head: its values are the head's
    # output, and its log-probabilities the parent's.
    parent = load_checkpoint(chat_base.dir).model
    on_policy = completion_log_probs(parent, {k: v for k, v in batch.items()})
    torch.testing.assert_close(batch["old_logps"] * mask, on_policy * mask, atol=1e-5, rtol=1e-5)
    trained = load_checkpoint(result.final_dir)
    assert trained.model.config.num_labels == 1  # the value head is saved with the policy


def test_lora_saves_the_value_head_with_the_adapters_and_resumes(chat_base, tmp_path):
    out = tmp_path / "lora"
    run_ppo(chat_base, out, "train.max_steps=2", "train.save_every=2", "peft.method=lora", "peft.r=4")
    first = load_checkpoint(out / "final").model
    assert first.config.num_labels == 1
    head = first.score.weight.detach().clone()
    base = load_checkpoint(chat_base.dir).model
    assert not hasattr(base, "score") or base.config.num_labels == 0
    # Raising the limit resumes from step 2 with the trained head, not a fresh one.
    result = run_ppo(chat_base, out, "train.max_steps=4", "train.save_every=2", "peft.method=lora", "peft.r=4")
    assert result.resumed_from == 2
    resumed = load_checkpoint(out / "final").model
    assert not torch.equal(resumed.score.weight, head)  # trained on from where it was
    assert resumed.score.weight.shape == head.shape


def test_failed_rewards_are_left_out_of_the_loss(chat_base, tmp_path, captured, monkeypatch):
    from orchard.rewards import functions

    def flaky(prompts, completions, answers, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    monkeypatch.setitem(functions.BUILTIN_REWARDS, "flaky", flaky)
    run_ppo(chat_base, tmp_path / "run", "train.max_steps=2", "rewards=[flaky]")
    steps = [line for line in lines(tmp_path / "run") if "loss" in line]
    assert all(line["reward_failures"] == 2 and math.isfinite(line["loss"]) for line in steps)
    for batch in captured["batches"]:
        invalid = ~batch["reward_valid"]
        assert not batch["loss_mask"][invalid].any() and (batch["advantages"][invalid] == 0).all()


def test_a_rollout_serves_num_iterations_steps(chat_base, tmp_path, captured):
    run_ppo(chat_base, tmp_path / "run", "train.max_steps=4", "num_iterations=2", "rewards=[0.1*length_penalty]")
    assert len(captured["batches"]) == 2  # rollouts for steps 0-1 and 2-3
    steps = [line for line in lines(tmp_path / "run") if "loss" in line]
    assert steps[0]["clip_ratio"] == 0.0 and steps[1]["clip_ratio"] > 0.0  # lr 1e-2 moves the policy past the clip


def test_num_iterations_must_divide_save_every():
    with pytest.raises(OrchardError, match="save_every"):
        load_config(PPOConfig, None, ["num_iterations=3", "train.save_every=10"])
