"""Tool use on the built-in world and on GSM8K: what SFT on tool conversations and GRPO over tool
episodes do, measured on held-out questions.

Starting from the quickstart's SFT model (a 3.4M-parameter chat model of the synthetic world):

1. SFT on the built-in tool conversations (`data.builtin=tools`: calculator calls for word
   problems, lookups of people's facts, a quarter plain conversations);
2. `orchard eval --tasks tools` on the SFT and tool-SFT models: held-out word problems (held-out
   operands) and questions about held-out facts, with the tools offered and without them;
3. GRPO over episodes with both tools on the world's questions (exact match, 0 for a failed
   call): held-out greedy exact match, mean@8 and pass@8 before and after;
4. GRPO on GSM8K's training questions with the calculator (rewards numeric_match + 0.2 *
   tool_use), evaluated on test questions: the reward that rises is the tool-use term, the model
   being far too small to solve grade-school maths.

    python benchmarks/tool_use.py [--sft runs/quickstart/sft/final] [--sft-steps 900] [--grpo-steps 30]

Prints one table per part; the runs stay in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from orchard.config import load_config
from orchard.evaluation.compare import evaluate_checkpoints
from orchard.evaluation.report import read_metrics
from orchard.evaluation.subject import EvalOptions
from orchard.evaluation.tool_tasks import ToolUse
from orchard.methods import grpo, sft
from orchard.training.runtime import Runtime

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOOL_GRPO = ["environment=calculator,lookup", "tool_listing=brief", "max_new_tokens=96", "num_generations=8",
             "beta=0", "loss_aggregation=token", "train.log_every=1", "train.progress=false"]


def before_after(metrics_file: Path, keys: list[str]) -> list[list[str]]:
    rows = [row for row in read_metrics(metrics_file) if keys[0] in row]
    return [[label, *(f"{row[key]:.1%}" for key in keys)] for label, row in (("before", rows[0]), ("after", rows[-1]))]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def timed(run, config):
    started = time.perf_counter()
    result = run(config)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="runs/quickstart/sft/final")
    parser.add_argument("--out", default="runs/bench-tool-use")
    parser.add_argument("--sft-steps", type=int, default=900)
    parser.add_argument("--grpo-steps", type=int, default=30)
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--grpo-prompts", type=int, default=16, help="prompts per GRPO step (x 8 episodes)")
    parser.add_argument("--gsm8k-steps", type=int, default=20)
    parser.add_argument("--eval-items", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.out)

    config = load_config(sft.SFTConfig, None, [
        f"init={args.sft}", f"out={out / 'tool-sft'}", "data.builtin=tools", "data.max_conversations=4000",
        "data.max_length=256", f"train.max_steps={args.sft_steps}", "train.lr=1e-3", "train.progress=false"])
    tool_sft, sft_seconds = timed(sft.run, config)
    print(f"tool SFT: {args.sft_steps} steps in {sft_seconds:.0f} s", file=sys.stderr)
    comparison = evaluate_checkpoints({"SFT": Path(args.sft), "tool SFT": tool_sft.final_dir}, [ToolUse()],
                                      EvalOptions(limit=args.eval_items, batch_size=32, chat=True),
                                      Runtime.for_inference("cpu"))
    print("\n## Held-out questions with and without the tools (orchard eval --tasks tools)\n")
    print(comparison.markdown())

    config = load_config(grpo.GRPOConfig, None, [
        f"init={tool_sft.final_dir}", f"out={out / 'tool-grpo'}", *TOOL_GRPO, f"train.max_steps={args.grpo_steps}",
        f"train.lr={args.grpo_lr}", f"train.batch_size={args.grpo_prompts}", f"train.eval_every={args.grpo_steps}",
        f"train.save_every={args.grpo_steps}", "data.eval_prompts=100"])
    _, seconds = timed(grpo.run, config)
    print(f"\n## GRPO over tool episodes, built-in world, {args.grpo_steps} steps in {seconds:.0f} s (100 held-out "
          "questions)\n")
    keys = ["val_reward/exact_match", "val_mean@8/exact_match", "val_pass@8/exact_match", "val_tool_failures"]
    print(table(["", "greedy exact match", "mean@8", "pass@8", "failed calls (greedy)"],
                before_after(out / "tool-grpo" / "metrics.jsonl", keys)))

    if not (SHARED / "math").is_dir():
        sys.exit(f"{SHARED / 'math'}: GSM8K is not there")
    config = load_config(grpo.GRPOConfig, None, [
        f"init={tool_sft.final_dir}", f"out={out / 'gsm8k-grpo'}", *TOOL_GRPO, "environment=calculator",
        f"data.path={SHARED / 'math' / 'gsm8k_train.jsonl'}", f"data.val_path={SHARED / 'math' / 'gsm8k_test.jsonl'}",
        "data.eval_prompts=50", "data.max_prompt_length=300", "rewards=[numeric_match,0.2*tool_use]",
        f"train.max_steps={args.gsm8k_steps}", "train.batch_size=4", "train.lr=1e-4",
        f"train.eval_every={args.gsm8k_steps}", f"train.save_every={args.gsm8k_steps}"])
    _, seconds = timed(grpo.run, config)
    metrics = out / "gsm8k-grpo" / "metrics.jsonl"
    rewards = [row["reward"] for row in read_metrics(metrics) if "reward" in row]
    print(f"\n## GRPO on GSM8K with the calculator, {args.gsm8k_steps} steps in {seconds:.0f} s (50 test questions)\n")
    print(f"training reward, mean of the first 5 steps {sum(rewards[:5]) / 5:.3f}, of the last 5 "
          f"{sum(rewards[-5:]) / 5:.3f}\n")
    print(table(["", "numeric match (greedy)", "mean@8 numeric match", "tool_use (greedy)", "mean@8 tool_use",
                 "failed calls (greedy)"],
                before_after(metrics, ["val_reward/numeric_match", "val_mean@8/numeric_match", "val_reward/tool_use",
                                       "val_mean@8/tool_use", "val_tool_failures"])))
    (out / "results.json").write_text(json.dumps({"gsm8k_training_rewards": rewards}, indent=1))


if __name__ == "__main__":
    main()
