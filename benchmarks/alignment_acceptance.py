"""Alignment on the built-in world, each method with a fixed CPU budget, before and after.

Starting from the quickstart's SFT model (run `orchard quickstart` first, or pass --sft):

* DPO on the world's preference pairs: held-out preference accuracy by implicit reward, and by
  likelihood (which is meaningful before training, when implicit rewards are all zero);
* GRPO with the exact-match reward: held-out greedy exact match;
* RLAIF: a judge (the pretrained model fine-tuned to grade replies on the training pairs) scores
  GRPO's replies; its win rate over the SFT model's replies on held-out questions.

    python benchmarks/alignment_acceptance.py [--budget 10m] [--sft runs/quickstart/sft/final]

Prints one table of before/after figures; the runs stay in --out for `orchard info` and plots.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from orchard.checkpoint import load_checkpoint
from orchard.config import Duration, load_config
from orchard.data.synthetic import World, exact_match_items, preference_pairs, write_jsonl
from orchard.evaluation.completion import chat_exact_match
from orchard.evaluation.report import read_metrics
from orchard.methods import dpo, grpo, sft
from orchard.rewards.models import JudgeScorer, judge_conversations


def first(metrics_file: Path, key: str) -> float:
    return next((row[key] for row in read_metrics(metrics_file) if key in row), float("nan"))


def off_topic_conversations(world: World, seed: int = 0) -> list[dict]:
    """Judge training on the mistake fine-tuned models make most here: a true statement about the
    person asked about that answers another question (graded 0), beside the right answer (10)."""
    rng = random.Random(seed)
    kept, _ = world.split_facts()
    conversations = []
    for fact in kept:
        others = [other for other in world.facts_about(fact.subject) if other.relation != fact.relation]
        if not others:
            continue
        for lang in ("en", "zh"):
            pair = {"prompt": [{"role": "user", "content": fact.question(lang)}],
                    "chosen": [{"role": "assistant", "content": fact.sentence(lang)}],
                    "rejected": [{"role": "assistant", "content": rng.choice(others).sentence(lang)}]}
            conversations += judge_conversations([pair])
    return conversations


def graded_samples(sft_dir: Path, world: World, per_question: int = 4, seed: int = 0) -> list[dict]:
    """Judge training on the policy's own mistakes: the SFT model's sampled replies to the training
    questions, graded 10 when exact match accepts them and 0 otherwise."""
    from orchard.data.synthetic import answer_matches
    from orchard.model.generation import SamplingConfig, generate_text
    from orchard.rewards.models import JUDGE_PROMPT, _dialogue

    checkpoint = load_checkpoint(sft_dir)
    tokenizer = checkpoint.tokenizer
    items = exact_match_items(world, "train")
    turn_end = [tokenizer.token_to_id("<|im_end|>")]
    conversations = []
    for start in range(0, len(items), 32):
        chunk = items[start:start + 32]
        prompts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                   for messages, _ in chunk for _ in range(per_question)]
        sampling = SamplingConfig(max_new_tokens=32, temperature=1.0, seed=seed + start)
        replies = generate_text(checkpoint.model, tokenizer, prompts, sampling, add_bos=False, end_token_ids=turn_end)
        for n, reply in enumerate(replies):
            messages, expected = chunk[n // per_question]
            grade = 10 if answer_matches(reply, expected) else 0
            conversations.append({"messages": [
                {"role": "user", "content": JUDGE_PROMPT.format(question=_dialogue(messages), answer=reply.strip())},
                {"role": "assistant", "content": str(grade)}]})
    return conversations


def greedy_replies(checkpoint_dir: Path, items: list) -> list[str]:
    checkpoint = load_checkpoint(checkpoint_dir)
    return [example[2] for example in chat_exact_match(checkpoint.model, checkpoint.tokenizer, items).examples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="runs/quickstart/sft/final", help="the SFT checkpoint to start from")
    parser.add_argument("--pretrain", default="runs/quickstart/pretrain/final", help="the judge's starting point")
    parser.add_argument("--budget", default="10m", help="training time of each method (default 10m)")
    parser.add_argument("--out", default="runs/bench-alignment", help="where the runs go")
    parser.add_argument("--only", nargs="*", default=["dpo", "grpo", "rlaif"], help="which experiments")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    budget = Duration.parse(args.budget)
    out = Path(args.out)
    sft_dir = Path(args.sft)
    if not (sft_dir / "config.json").is_file():
        sys.exit(f"{sft_dir}: no SFT checkpoint; run `orchard quickstart` first or pass --sft")
    held_out = exact_match_items(World(), "held_out")
    rows = []

    if "dpo" in args.only:
        config = load_config(dpo.DPOConfig, None, [
            f"init={sft_dir}", f"out={out / 'dpo'}", f"train.max_time={budget}", "train.max_steps=100000",
            "train.lr=1e-4", "train.eval_every=50", "train.save_every=100", "train.eval_batches=50",
            "train.progress=false"])
        result = dpo.run(config)
        metrics = Path(config.out) / "metrics.jsonl"
        for key, label in (("val_accuracy", "DPO: held-out preference accuracy (implicit reward)"),
                           ("val_likelihood_accuracy", "DPO: held-out preference accuracy (likelihood)")):
            rows.append([label, first(metrics, key), result.state.metrics[key], result.state.step])

    if "grpo" in args.only:
        config = load_config(grpo.GRPOConfig, None, [
            f"init={sft_dir}", f"out={out / 'grpo'}", f"train.max_time={budget}", "train.max_steps=100000",
            "train.lr=1e-4", "train.batch_size=8", "max_new_tokens=32", "train.eval_every=50", "train.save_every=50",
            "data.eval_prompts=400", "train.progress=false"])
        result = grpo.run(config)
        rows.append([f"GRPO: held-out exact match (greedy, {len(held_out)} questions)",
                     first(Path(config.out) / "metrics.jsonl", "val_reward/exact_match"),
                     result.state.metrics["val_reward/exact_match"], result.state.step])

    if "rlaif" in args.only:
        judge_data = out / "judge_conversations.jsonl"
        write_jsonl(judge_data, judge_conversations(preference_pairs(World(), "train"))
                    + off_topic_conversations(World()) + graded_samples(sft_dir, World()))
        judge_config = load_config(sft.SFTConfig, None, [
            f"init={args.pretrain}", f"out={out / 'judge'}", f"data.path={judge_data}", "data.max_length=256",
            "train.max_steps=300", "train.batch_size=16", "train.lr=1e-3", "train.progress=false"])
        judge_dir = sft.run(judge_config).final_dir
        config = load_config(grpo.GRPOConfig, None, [
            f"init={sft_dir}", f"out={out / 'rlaif'}", f"rewards=[judge:{judge_dir}]", f"train.max_time={budget}",
            "train.max_steps=100000", "train.lr=1e-4", "train.batch_size=8", "max_new_tokens=32",
            "train.eval_every=50", "train.save_every=50", "data.eval_prompts=100", "train.progress=false"])
        result = grpo.run(config)
        started = time.perf_counter()
        judge = JudgeScorer(str(judge_dir))
        prompts = [messages for messages, _ in held_out]
        outcome = judge.win_rate(prompts, greedy_replies(result.final_dir, held_out),
                                 greedy_replies(sft_dir, held_out))
        baseline = judge.win_rate(prompts, greedy_replies(sft_dir, held_out), greedy_replies(sft_dir, held_out))
        rows.append([f"RLAIF: judge's win rate over the SFT model ({len(prompts)} held-out questions)",
                     baseline["win_rate"], outcome["win_rate"], result.state.step])
        rows.append(["RLAIF: judge's mean grade of the replies (0-1)", outcome["baseline_mean_grade"],
                     outcome["mean_grade"], result.state.step])
        print(f"win/tie/loss {outcome['wins']}/{outcome['ties']}/{outcome['losses']}, unparsed {outcome['unparsed']} "
              f"({time.perf_counter() - started:.0f}s to judge)")

    print(f"\nstarting from {sft_dir}, {float(budget):.0f} s of training each, {torch.get_num_threads()} threads")
    print(f"{'experiment':75} {'before':>8} {'after':>8} {'steps':>6}")
    for label, before, after, steps in rows:
        print(f"{label:75} {before:8.1%} {after:8.1%} {steps:6d}")


if __name__ == "__main__":
    main()
