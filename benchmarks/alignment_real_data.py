"""GRPO on GSM8K and DPO on HH-RLHF: short runs on real data, figures before and after.

The data sets are read from ../shared/data (see each folder's README for its license); nothing is
copied into the repository. Starting from the quickstart's checkpoints (a 3.4M-parameter model
pretrained on the synthetic world, which has never seen grade-school maths or these dialogues):

* GSM8K: a short SFT on the training solutions teaches the `#### N` answer form, then GRPO with
  rewards numeric_match + 0.5 * answer_format on training questions; the held-out reward is on
  the test questions. A model this small solves almost none of them: the reward that rises is
  mostly the format's.
* HH-RLHF (helpful-base, test file, 95/5 split): DPO from the SFT model; held-out margin and
  preference accuracy before and after.

    python benchmarks/alignment_real_data.py [--steps-grpo 40] [--steps-dpo 100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchard.config import load_config
from orchard.data.synthetic import write_jsonl
from orchard.evaluation.report import read_metrics
from orchard.methods import dpo, grpo, sft

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def first(metrics_file: Path, key: str) -> float:
    return next((row[key] for row in read_metrics(metrics_file) if key in row), float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", default="runs/quickstart/pretrain/final")
    parser.add_argument("--sft", default="runs/quickstart/sft/final")
    parser.add_argument("--out", default="runs/bench-real-alignment")
    parser.add_argument("--steps-sft", type=int, default=300)
    parser.add_argument("--steps-grpo", type=int, default=40)
    parser.add_argument("--steps-dpo", type=int, default=100)
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED}: the shared data sets are not there")
    out = Path(args.out)
    rows = []

    gsm8k = SHARED / "math"
    records = [json.loads(line) for line in (gsm8k / "gsm8k_train.jsonl").read_text().splitlines()]
    conversations = out / "gsm8k_sft.jsonl"
    write_jsonl(conversations, ({"messages": [{"role": "user", "content": r["question"]},
                                              {"role": "assistant", "content": r["answer"]}]} for r in records))
    sft_config = load_config(sft.SFTConfig, None, [
        f"init={args.pretrain}", f"out={out / 'gsm8k-sft'}", f"data.path={conversations}", "data.max_length=512",
        "data.truncation=skip", f"train.max_steps={args.steps_sft}", "train.batch_size=8", "train.lr=1e-3",
        "train.progress=false"])
    sft_dir = sft.run(sft_config).final_dir
    config = load_config(grpo.GRPOConfig, None, [
        f"init={sft_dir}", f"out={out / 'gsm8k-grpo'}", f"data.path={gsm8k / 'gsm8k_train.jsonl'}",
        f"data.val_path={gsm8k / 'gsm8k_test.jsonl'}", "data.eval_prompts=50", "data.max_prompt_length=256",
        "rewards=[numeric_match, 0.5*answer_format]", "max_new_tokens=192", "num_generations=8",
        "train.batch_size=2", f"train.max_steps={args.steps_grpo}", "train.lr=5e-5", "train.eval_every=20",
        "train.save_every=20", "train.progress=false"])
    result = grpo.run(config)
    metrics = Path(config.out) / "metrics.jsonl"
    training = [row for row in read_metrics(metrics) if "reward" in row]
    window = max(1, len(training) // 4)
    rows += [["GSM8K GRPO: mean training reward, first vs last quarter of steps",
              sum(r["reward"] for r in training[:window]) / window,
              sum(r["reward"] for r in training[-window:]) / window],
             ["GSM8K GRPO: held-out answer_format (greedy, 50 test questions)",
              first(metrics, "val_reward/answer_format"), result.state.metrics["val_reward/answer_format"]],
             ["GSM8K GRPO: held-out numeric_match (greedy, 50 test questions)",
              first(metrics, "val_reward/numeric_match"), result.state.metrics["val_reward/numeric_match"]]]

    config = load_config(dpo.DPOConfig, None, [
        f"init={args.sft}", f"out={out / 'hh-dpo'}", f"data.path={SHARED / 'preference' / 'helpful-base_test.jsonl.gz'}",
        "data.val_fraction=0.05", "data.max_length=512", "data.on_error=skip", f"train.max_steps={args.steps_dpo}",
        "train.batch_size=4", "train.lr=5e-5", "train.eval_every=50", "train.save_every=50",
        "train.eval_batches=30", "train.progress=false"])
    result = dpo.run(config)
    metrics = Path(config.out) / "metrics.jsonl"
    rows += [["HH-RLHF DPO: held-out reward margin (beta 0.1)", first(metrics, "val_margin"),
              result.state.metrics["val_margin"]],
             ["HH-RLHF DPO: held-out preference accuracy (implicit reward)", first(metrics, "val_accuracy"),
              result.state.metrics["val_accuracy"]],
             ["HH-RLHF DPO: held-out preference accuracy (likelihood)", first(metrics, "val_likelihood_accuracy"),
              result.state.metrics["val_likelihood_accuracy"]]]

    print(f"\n{'run':70} {'before':>8} {'after':>8}")
    for label, before, after in rows:
        print(f"{label:70} {before:8.3f} {after:8.3f}")


if __name__ == "__main__":
    main()
