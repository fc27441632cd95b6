"""`orchard grpo` and its rollouts: the training layout and its log-probabilities against each row run
alone, end tokens kept by the sampler, item counts per aggregation, the loss assembled from its
parts, short runs (metrics, failing rewards, no reference with beta=0, the adapter-free base as the
LoRA reference), a reward the policy learns to earn, and CLI errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from orchard.checkpoint import load_checkpoint
from orchard.config import load_config
from orchard.methods import grpo, rollouts
from orchard.losses.rl import batch_scaled_advantages, group_advantages, normalised_advantages, rloo_advantages
from orchard.methods.grpo import GRPO, GRPOConfig, advantages
from orchard.losses.tokens import IGNORE_INDEX
from orchard.methods.prompts import Prompt, PromptDataConfig, load_prompts
from orchard.methods.rollouts import Rollouts, completion_log_probs, layout
from orchard.model.generation import SamplingConfig, generate
from orchard.peft.config import PeftConfig, ReferenceModel, apply_peft
from orchard.rewards import Rewards
from orchard.training.runtime import Runtime
from cli_errors import run_error

IDS = torch.tensor([[5, 9, 12, 7, 30, 41]])


def run_grpo(chat_base, out, *overrides):
    config = load_config(GRPOConfig, None, [
        f"init={chat_base.dir}", f"out={out}", "num_generations=4", "max_new_tokens=6", "data.max_prompts=16",
        "data.eval_prompts=4", "train.batch_size=2", "train.precision=fp32", "train.device=cpu", "train.eval_every=0",
        "train.warmup_steps=0", "train.save_every=0", *overrides])
    return grpo.run(config)


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def capture_method(monkeypatch) -> dict:
    captured = {}
    original = GRPO.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured["method"] = self

    monkeypatch.setattr(GRPO, "__init__", init)
    return captured


# --- rollouts -----------------------------------------------------------------------------------------


def test_layout_by_hand():
    batch = layout([[5, 6, 7], [8]], [[9, 1], [10, 11, 12]], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 1, 2], [2, 2, 8, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["completion_ids"].tolist() == [[9, 1, IGNORE_INDEX], [10, 11, 12]]
    assert batch["completion_mask"].tolist() == [[True, True, False], [True, True, True]]
    empty = layout([[5], [6, 7]], [[], []], pad_id=0)
    assert empty["input_ids"].tolist() == [[0, 5, 0], [6, 7, 0]]
    assert empty["attention_mask"].tolist() == [[0, 1, 0], [1, 1, 0]]
    assert empty["completion_mask"].tolist() == [[False], [False]]


def test_completion_log_probs_equal_each_row_run_alone(chat_base):
    model = load_checkpoint(chat_base.dir).model.float()
    model.add_score_head(1, seed=2)
    prompts = [[5, 9, 12, 7, 30], [40, 41], [100, 101, 102]]
    completions = [[60, 61], [70, 71, 72, 73, 4], [80]]
    batch = layout(prompts, completions, pad_id=2)
    with torch.no_grad():
        logps, values = completion_log_probs(model, batch, with_values=True)
        assert torch.equal(completion_log_probs(model, batch), logps)
    assert logps.shape == values.shape == (3, 5)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            out = model(torch.tensor([prompt + completion]))
        start = len(prompt) - 1  # the position that predicts the first completion token
        expected = out.logits[0].log_softmax(-1)[range(start, start + len(completion)), completion]
        assert torch.allclose(logps[row, :len(completion)], expected, atol=1e-5), row
        assert torch.allclose(values[row, :len(completion)], out.scores[0, start:start + len(completion), 0],
                              atol=1e-5)
        assert (logps[row, len(completion):] == 0).all()


def test_generate_keeps_the_end_token_exactly_when_a_row_ended_by_it(chat_base):
    model = load_checkpoint(chat_base.dir).model
    prompts = [[5, 9, 12], [40, 41], [7]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=0)
    free = generate(model, prompts, sampling, [], pad_id=2)  # no end token: six tokens each
    early, last = free[0][2], free[1][5]  # row 0 ends on its third token, row 1 on its sixth, row 2 never
    assert early not in free[0][:2] + free[1] + free[2] and last not in free[0][:3] + free[1][:5] + free[2]
    kept = generate(model, prompts, sampling, [early, last], pad_id=2, keep_end_token=True)
    dropped = generate(model, prompts, sampling, [early, last], pad_id=2)
    assert kept == [free[0][:3], free[1], free[2]]
    assert dropped == [free[0][:2], free[1][:5], free[2]]


def test_rollouts_are_a_pure_function_of_the_step(chat_base, tmp_path):
    checkpoint = load_checkpoint(chat_base.dir)
    model, tokenizer = checkpoint.model.float(), checkpoint.tokenizer
    train, val, record = load_prompts(PromptDataConfig(max_prompts=8, eval_prompts=3), tokenizer, seed=0)
    assert len(train) == 8 and len(val) == 3 and record["val_prompts"] == 3
    rendered = tokenizer.apply_chat_template(train[0].messages, add_generation_prompt=True)
    assert train[0].ids == tokenizer.encode(rendered) and rendered.endswith("<|im_start|>assistant\n")
    # Held-out prompts from a file beside the built-in training prompts.
    (tmp_path / "val.jsonl").write_text('{"prompt": "What is 2 + 2?", "answer": 4}\n'
                                        '{"prompt": "Where does Tom Snow live?", "answer": "Greenfield"}\n')
    _, from_file, _ = load_prompts(PromptDataConfig(max_prompts=8, val_path=str(tmp_path / "val.jsonl")), tokenizer, 0)
    assert [(p.messages[-1]["content"], p.answer) for p in from_file] == [("What is 2 + 2?", "4"),
                                                                           ("Where does Tom Snow live?", "Greenfield")]
    rewards = Rewards(["exact_match", "length_penalty"])
    rollouts = Rollouts(model, tokenizer, train, rewards, SamplingConfig(max_new_tokens=5, temperature=1.0), 3,
                        batch_size=2, grad_accum=1, seed=4, runtime=Runtime())
    first, again, other = rollouts.batch(0, 0, 0, 1), rollouts.batch(0, 0, 0, 1), rollouts.batch(1, 0, 0, 1)
    assert all(torch.equal(first[k], again[k]) for k in first if k != "rewards_by_function")
    assert not torch.equal(first["input_ids"], other["input_ids"])
    assert first["input_ids"].shape[0] == 6 and first["completion_mask"].shape[1] <= 5
    # Each prompt's group is consecutive; the rewards are those of the decoded replies (end tokens dropped).
    lengths = first["completion_mask"].sum(1).tolist()
    replies = [tokenizer.decode([t for t in row[:n].tolist() if t not in rollouts.end_ids])
               for row, n in zip(first["completion_ids"], lengths)]
    assert first["rewards_by_function"][:, 1].tolist() == pytest.approx([-len(r.split()) / 100 for r in replies])
    assert first["rewards"].tolist() == pytest.approx(first["rewards_by_function"].sum(1).tolist())
    prompt_rows = first["input_ids"][:, :first["input_ids"].shape[1] - first["completion_mask"].shape[1]]
    assert torch.equal(prompt_rows[0], prompt_rows[2]) and not torch.equal(prompt_rows[2], prompt_rows[3])
    assert rollouts.end_ids == [tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")]
    metrics = rollouts.evaluate(val)
    assert set(metrics) == {"val_reward", "val_completion_length", "val_reward_failures", "val_reward/exact_match",
                            "val_reward/length_penalty"}


# --- the method ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation, expected", [("sequence", 3), ("token", 8), ("dr_grpo", 18)])
def test_count_follows_the_aggregation(aggregation, expected):
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    method = GRPO(GRPOConfig(loss_aggregation=aggregation, max_new_tokens=6), None, [], None)
    assert method.count({"completion_mask": mask}) == expected


@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
def test_loss_is_minus_advantage_plus_kl_aggregated(chat_base, aggregation):
    """On-policy the ratio is 1: each token's loss is -A + beta * k3(ref - logp)."""
    model = load_checkpoint(chat_base.dir).model.float()
    batch = layout([[5, 9, 12], [40, 41], [7, 8], [9]], [[60, 61], [70, 71, 72], [80], [90, 91]], pad_id=2)
    with torch.no_grad():
        logps = completion_log_probs(model, batch)
    delta = 0.3
    batch.update(rewards=torch.tensor([1.0, 0.0, 2.0, 0.0]), reward_valid=torch.ones(4, dtype=torch.bool),
                 rewards_by_function=torch.tensor([[1.0], [0.0], [2.0], [0.0]]),
                 advantages=torch.tensor([0.5, -0.5, 1.5, -1.5]), ref_logps=(logps + delta) * batch["completion_mask"])
    config = GRPOConfig(beta=0.1, num_generations=2, loss_aggregation=aggregation, max_new_tokens=4)
    method = GRPO(config, SimpleNamespace(rewards=SimpleNamespace(names=["r"])), [], None)
    total, metrics = method.loss(model, batch)
    k3 = math.exp(delta) - delta - 1
    lengths = [2, 3, 1, 2]
    per_row = [-a + 0.1 * k3 for a in batch["advantages"].tolist()]
    expected = {"sequence": sum(per_row),
                "token": sum(p * n for p, n in zip(per_row, lengths)),
                "dr_grpo": sum(p * n for p, n in zip(per_row, lengths))}[aggregation]
    assert total.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["kl"] == pytest.approx(k3, abs=1e-5) and metrics["reward"] == pytest.approx(0.75)
    assert metrics["completion_length"] == pytest.approx(2.0) and metrics["frac_reward_zero_std"] == 0.0
    assert metrics["rewards/r"] == pytest.approx(0.75)
    total.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


# --- runs ---------------------------------------------------------------------------------------------


def test_a_short_run_logs_reward_metrics_and_keeps_a_frozen_reference(chat_base, tmp_path, monkeypatch):
    captured = capture_method(monkeypatch)
    result = run_grpo(chat_base, tmp_path / "run", "rewards=[exact_match, 0.1*length_penalty]", "train.max_steps=3",
                      "train.lr=1e-2")
    logged = lines(tmp_path / "run")
    steps = [line for line in logged if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3]
    for line in steps:
        assert {"reward", "reward_std", "reward_failures", "frac_reward_zero_std", "completion_length",
                "rewards/exact_match", "rewards/length_penalty", "kl"} <= set(line)
        assert math.isfinite(line["loss"]) and line["reward_failures"] == 0 and 1 <= line["completion_length"] <= 6
        assert -0.07 <= line["reward"] <= 1.0 and line["kl"] >= 0
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    final_eval = logged[-1]
    assert {"val_reward", "val_completion_length", "val_reward_failures", "val_reward/exact_match"} <= set(final_eval)
    # Sampled replies too (data.eval_samples=8 by default): mean@8 is never above pass@8.
    assert 0 <= final_eval["val_mean@8/exact_match"] <= final_eval["val_pass@8/exact_match"] <= 1
    record = json.loads((result.final_dir / "orchard.json").read_text())
    assert record["stage"] == "grpo" and record["parent"]["path"] == str(chat_base.dir.resolve())
    # The reference is a frozen copy of the parent, untouched by training.
    method = captured["method"]
    base = load_checkpoint(chat_base.dir).model
    with torch.no_grad(), method.reference.model() as reference:
        assert torch.equal(reference(IDS).logits, base(IDS).logits)
        assert not torch.allclose(method.rollouts.policy(IDS).logits, base(IDS).logits)
    assert not any(p.requires_grad for p in method.reference.copy.parameters())


def test_failing_rewards_are_counted_and_training_goes_on(chat_base, tmp_path, monkeypatch, user_module):
    name = user_module("def picky(prompts, completions, answers, **kwargs):\n"
                       "    if any(len(c) % 2 for c in completions):\n"
                       "        raise ValueError('odd length')\n"
                       "    return [1.0] * len(completions)\n")
    seen = []
    original = GRPO.batch

    def keep(self, *args):
        batch = original(self, *args)
        seen.append(batch)
        return batch

    monkeypatch.setattr(GRPO, "batch", keep)
    run_grpo(chat_base, tmp_path / "run", f"rewards=[{name}:picky, 0.1*length_penalty]", "train.max_steps=3",
             "train.lr=1e-2", "beta=0")
    steps = [line for line in lines(tmp_path / "run") if "loss" in line]
    assert len(steps) == 3 and all(math.isfinite(line["loss"]) for line in steps)
    failures = sum(line["reward_failures"] for line in steps)
    assert 0 < failures < 3 * 8
    for batch in seen:
        valid = batch["reward_valid"]
        assert (batch["advantages"][~valid] == 0).all() and (batch["rewards"][~valid] == 0).all()
        assert torch.isnan(batch["rewards_by_function"][~valid, 0]).all()
        assert not torch.isnan(batch["advantages"]).any()
    assert sum(int((~b["reward_valid"]).sum()) for b in seen) == failures
    assert all(line[f"rewards/{name}:picky"] == 1.0 for line in steps)  # the mean over the samples it scored


def test_beta_zero_builds_no_reference(chat_base, tmp_path, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("a reference model was built")

    monkeypatch.setattr(rollouts, "ReferenceModel", no_reference)
    run_grpo(chat_base, tmp_path / "run", "beta=0", "train.max_steps=2", "loss_aggregation=token")
    steps = [line for line in lines(tmp_path / "run") if "loss" in line]
    assert len(steps) == 2 and not any("kl" in line for line in steps)


def test_lora_reference_is_the_base_without_adapters(chat_base, tmp_path, monkeypatch):
    # The context manager alone, on adapters with made-up trained values.
    model = load_checkpoint(chat_base.dir).model.float()
    base_logits = model(IDS).logits.detach()
    reference = ReferenceModel(model, PeftConfig(method="lora"))
    assert reference.copy is None and reference.shares_weights
    apply_peft(model, PeftConfig(method="lora", r=4), seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora." in name:
                parameter.add_(0.1)
        adapted = model(IDS).logits
        with reference.model() as base:
            assert base is model and torch.equal(base(IDS).logits, base_logits)
        assert torch.equal(model(IDS).logits, adapted) and not torch.allclose(adapted, base_logits)

    # And in a run: the KL grows from 0 as the adapters move away from the base.
    captured = capture_method(monkeypatch)
    result = run_grpo(chat_base, tmp_path / "run", "peft.method=lora", "peft.r=4", "beta=0.1", "train.max_steps=3",
                      "train.lr=5e-2", "rewards=[length_penalty]")
    steps = [line for line in lines(tmp_path / "run") if "loss" in line]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7) and steps[-1]["kl"] > 0
    assert (result.final_dir / "adapters.safetensors").is_file()
    assert json.loads((result.final_dir / "orchard.json").read_text())["stage"] == "grpo-lora"
    method = captured["method"]
    base = load_checkpoint(chat_base.dir).model
    with torch.no_grad():
        with method.reference.model() as reference:
            assert torch.allclose(reference(IDS).logits, base(IDS).logits, atol=1e-6)
        assert not torch.allclose(method.rollouts.policy(IDS).logits, base(IDS).logits, atol=1e-4)


@pytest.mark.parametrize("variant", [
    [],  # GRPO
    ["advantage_estimator=rloo"],
    ["advantage_estimator=reinforce++"],
    # GSPO: one ratio per reply; two updates per rollout so that the ratio and its clip act.
    ["importance_sampling_level=sequence", "num_iterations=2", "epsilon=3e-3", "epsilon_high=4e-3"],
], ids=["grpo", "rloo", "reinforce++", "gspo"])
def test_the_policy_learns_to_earn_a_simple_reward(chat_base, tmp_path, user_module, monkeypatch, variant):
    # Reward: the share of the reply's characters that are the letter "e".
    name = user_module("def e_share(prompts, completions, answers, **kwargs):\n"
                       "    return [c.count('e') / max(len(c), 1) for c in completions]\n")
    captured = capture_method(monkeypatch)
    run_grpo(chat_base, tmp_path / "run", f"rewards=[{name}:e_share]", "max_new_tokens=8", "train.max_steps=12",
             "train.lr=0.1", "beta=0", "train.seed=3", *variant)
    method = captured["method"]
    rewards_ = torch.tensor([0.0, 1.0, 1.0, 3.0])
    expected = {"grpo": group_advantages(rewards_, 4), "rloo": normalised_advantages(rloo_advantages(rewards_, 4)),
                "reinforce++": batch_scaled_advantages(rewards_, 4)}
    estimator = method.config.advantage_estimator
    torch.testing.assert_close(advantages(rewards_, torch.ones(4, dtype=torch.bool), method.config), expected[estimator])
    rewards = [line["reward"] for line in lines(tmp_path / "run") if "loss" in line]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards


def test_trained_prompts_are_evaluated_beside_the_held_out_ones(chat_base, tmp_path, monkeypatch):
    captured = capture_method(monkeypatch)
    run_grpo(chat_base, tmp_path / "run", "train.max_steps=1", "data.eval_trained_prompts=3", "data.eval_samples=2")
    final_eval = lines(tmp_path / "run")[-1]
    rollouts_ = captured["method"].rollouts
    expected = rollouts_.evaluate(rollouts_.prompts[:3], samples=2)  # the first 3 training prompts, same seeds
    assert {f"trained_{key.removeprefix('val_')}": value for key, value in expected.items()} == \
        {key: value for key, value in final_eval.items() if key.startswith("trained_")}
    assert "val_mean@2/exact_match" in final_eval and "trained_mean@2/exact_match" in final_eval
    with pytest.raises(ValueError, match="data.eval_trained_prompts must not be negative"):
        PromptDataConfig(eval_trained_prompts=-1)


def test_sampled_evaluation_by_hand():
    """mean@k and pass@k from canned samples: 3 prompts, k = 4, two prompts per batch."""
    rollouts_ = SimpleNamespace(rewards=Rewards(["exact_match"]), sampling=SamplingConfig(temperature=1.0),
                                environment=None)
    rollouts_.complete = lambda *args: Rollouts.complete(rollouts_, *args)
    prompts = [Prompt([{"role": "user", "content": q}], a, [1, 2]) for q, a in
               [("q1", "Paris"), ("q2", "7"), ("q3", "red")]]
    replies = ["Paris", "London", "Paris", "no",   # 2 of 4 right
               "8", "9", "6", "5",                 # none right
               "red", "red", "red", "red"]         # all right
    seen_seeds = []

    def sample(ids, sampling, row_seeds=None):
        seen_seeds.extend(row_seeds)
        return [[i] for i in range(len(ids))]
    position = iter(range(len(replies)))
    rollouts_.sample = sample
    rollouts_.texts = lambda completions: [replies[next(position)] for _ in completions]
    metrics = Rollouts._sampled(rollouts_, prompts, 4, prompts_per_batch=2)
    assert metrics == {"val_mean@4/exact_match": (0.5 + 0.0 + 1.0) / 3, "val_pass@4/exact_match": 2 / 3}
    assert len(set(seen_seeds)) == 12  # every sample its own seed


# --- CLI ----------------------------------------------------------------------------------------------



def test_grpo_cli_errors(chat_base, tmp_path, capsys):
    line = run_error(capsys, ["grpo", f"init={chat_base.dir}", "importance_sampling_level=sequence",
                              "loss_aggregation=token"])
    assert "loss_aggregation=sequence" in line
    line = run_error(capsys, ["grpo", f"init={chat_base.dir}", f"out={tmp_path / 'a'}", "rewards=[nonexistent]"])
    assert "rewards" in line and "'nonexistent'" in line
    assert "init" in run_error(capsys, ["grpo", f"out={tmp_path / 'b'}"])
    assert "num_generations" in run_error(capsys, ["grpo", f"init={chat_base.dir}", "num_generations=1"])
    line = run_error(capsys, ["grpo", f"init={chat_base.dir}", f"out={tmp_path / 'c'}", "max_new_tokens=600"])
    assert "max_new_tokens" in line
    line = run_error(capsys, ["grpo", f"init={chat_base.dir}", f"out={tmp_path / 'd'}", "environment=calculator,web"])
    assert line.startswith("orchard: error: environment: unknown tool 'web'; expected calculator, lookup")
    assert "dynamic_sampling" in run_error(capsys, ["grpo", f"init={chat_base.dir}", "dynamic_sampling=-1"])
    assert "tool_listing" in run_error(capsys, ["grpo", f"init={chat_base.dir}", "tool_listing=long"])
    assert not any((tmp_path / name).exists() for name in "abcd")


# --- episodes with tools, and dynamic sampling ------------------------------------------------------------


def test_rollouts_of_tool_episodes_mask_tool_results_and_fail_bad_calls(chat_base):
    from orchard.environments import environment_factory

    checkpoint = load_checkpoint(chat_base.dir)
    model, tokenizer = checkpoint.model.float(), checkpoint.tokenizer
    make_environment = environment_factory("calculator", max_turns=2, listing="brief")
    train, _, _ = load_prompts(PromptDataConfig(max_prompts=4, eval_prompts=2), tokenizer, 0, make_environment())
    assert tokenizer.decode(train[0].ids, skip_special_tokens=False).startswith(
        "<|im_start|>system\nTools: calculator(expression)")
    end = tokenizer.token_to_id("<|im_end|>")
    answer = train[0].answer
    script = {0: f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{answer}"}}}}</tool_call>',
              1: "<tool_call>{not json}</tool_call>"}

    def sample(contexts, sampling, row_seeds=None):
        # Row r of a group of 2: a good call then the answer; a malformed call then the answer.
        replies = []
        for context, seed in zip(contexts, row_seeds or [0] * len(contexts)):
            first_turn = "<tool_response>" not in tokenizer.decode(context, skip_special_tokens=False)
            text = script[seed % 2] if first_turn else answer
            replies.append(tokenizer.encode(text) + [end])
        return replies

    rollouts = Rollouts(model, tokenizer, train, Rewards(["exact_match", "0.5*tool_use"]), SamplingConfig(max_new_tokens=40), 2,
                        batch_size=1, grad_accum=1, seed=0, runtime=Runtime(), environment=make_environment,
                        max_length=400)
    rollouts.sample = sample
    batch = rollouts.batch(0, 0, 0, 1)
    assert batch["tool_calls"].tolist() == [1.0, 0.0] and batch["tool_failed"].tolist() == [0.0, 1.0]
    # The good episode earns the reward; the malformed call fails its episode, right answer or not.
    assert batch["rewards"].tolist() == [1.5, 0.0] and batch["reward_valid"].all()
    assert batch["rewards_by_function"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    good = batch["completion_ids"][0][batch["completion_ids"][0] != IGNORE_INDEX].tolist()
    trained = [t for t, m in zip(good, batch["completion_mask"][0].tolist()) if m]
    read = tokenizer.decode([t for t, m in zip(good, batch["completion_mask"][0].tolist()) if not m],
                            skip_special_tokens=False)
    assert tokenizer.decode(trained, skip_special_tokens=False) == script[0] + "<|im_end|>" + answer + "<|im_end|>"
    assert read == f"\n<|im_start|>user\n<tool_response>\n{answer}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    metrics = rollouts.evaluate(train[:2], samples=2)
    assert {"val_tool_failures", "val_tool_calls", "val_mean@2/exact_match"} <= set(metrics)


def test_dynamic_sampling_replaces_groups_without_signal(chat_base, user_module):
    # Rewards vary within a group only for prompts whose answer has an even length.
    name = user_module("def varied(prompts, completions, answers, **kwargs):\n"
                       "    return [float(sum(map(ord, c)) % 2) if len(a) % 2 == 0 else 0.0\n"
                       "            for c, a in zip(completions, answers)]\n")
    checkpoint = load_checkpoint(chat_base.dir)
    model, tokenizer = checkpoint.model.float(), checkpoint.tokenizer
    train, _, _ = load_prompts(PromptDataConfig(max_prompts=64, eval_prompts=2), tokenizer, 0)
    common = dict(batch_size=4, grad_accum=1, seed=1, runtime=Runtime())
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    plain = Rollouts(model, tokenizer, train, Rewards([f"{name}:varied"]), sampling, 4, **common)
    dynamic = Rollouts(model, tokenizer, train, Rewards([f"{name}:varied"]), sampling, 4, dynamic_sampling=8, **common)

    def signal(batch):
        return (batch["rewards"].view(-1, 4).std(1) > 0).tolist()

    before, after = plain.batch(0, 0, 0, 1), dynamic.batch(0, 0, 0, 1)
    assert after["input_ids"].shape[0] == 16 and 1 <= after["resample_rounds"].item() <= 8
    assert not all(signal(before)) and all(signal(after)), (signal(before), signal(after))
    again = dynamic.batch(0, 0, 0, 1)
    assert torch.equal(after["input_ids"], again["input_ids"])  # refills are seeded by the place in the run


def test_a_short_run_over_tool_episodes(chat_base, tmp_path):
    run_grpo(chat_base, tmp_path / "run", "environment=calculator,lookup", "tool_listing=brief", "max_turns=2",
             "train.max_steps=2", "data.eval_prompts=2", "data.eval_samples=2", "train.eval_every=2",
             "rewards=[exact_match,0.1*tool_use]", "dynamic_sampling=1")
    logged = lines(tmp_path / "run")
    steps = [line for line in logged if "loss" in line]
    assert len(steps) == 2 and all({"tool_failed", "tool_calls", "resample_rounds", "rewards/tool_use"} <= set(s)
                                   for s in steps)
    assert {"val_tool_failures", "val_tool_calls", "val_mean@2/tool_use"} <= set(logged[-1])
    record = json.loads((tmp_path / "run" / "final" / "orchard.json").read_text())
    assert record["data"]["environment"] == "calculator,lookup"
