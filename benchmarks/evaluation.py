"""Evaluation through lm-evaluation-harness: the same local tasks with `--model orchard` on an orchard
checkpoint and `--model hf` (transformers) on its Hugging Face export, alternated on one machine;
their metrics must be equal and their per-request log-likelihoods within 1e-4. Then `orchard eval`'s
own multiple-choice task on the same items (the same numbers again) and GSM8K's full test split.

    python benchmarks/evaluation.py --checkpoint runs/quickstart/pretrain [--rounds 3]

The tasks are built from the built-in world and written as lm-eval task YAMLs with local JSONL data:
`world_mc`, multiple choice over the held-out facts' answers (the answer and three other answers of
facts of the same kind, 'Question: ...\\nAnswer:' as lm-eval's ARC and SciQ are written), and
`world_sums`, greedy generation of sums (until a newline, exact match). Both backends run fp32 with
batch size 16; times are wall seconds of `simple_evaluate` with the model loaded and lm-eval's task
index built (~13 s that either backend pays), and of the backend alone on the same requests; median
of --rounds alternated runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MC_YAML = """task: world_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

SUMS_YAML = """task: world_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    regexes_to_ignore: ["^\\\\s+", "[^0-9].*$"]
"""


def write_tasks(directory: Path) -> Path:
    """The two task YAMLs and their data, from the built-in world's held-out split."""
    from orchard.data.synthetic import World
    from orchard.evaluation.completion import arithmetic_items, fact_completion_items

    world = World()
    rng = random.Random(0)
    facts = fact_completion_items(world, "en", split="held_out")
    by_kind: dict[str, list[str]] = {}
    for prompt, answer in facts:
        by_kind.setdefault(prompt.split()[-1], []).append(answer)  # "lives in", "works as", ...
    records = []
    for prompt, answer in facts:
        others = sorted({a for a in by_kind[prompt.split()[-1]] if a != answer})
        if len(others) < 3:
            continue
        choices = [answer, *rng.sample(others, 3)]
        rng.shuffle(choices)
        records.append({"question": prompt, "choices": choices, "answer": choices.index(answer)})
    sums = [{"prompt": p, "answer": a} for p, a in arithmetic_items("en", 200, seed=1)]
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows, yaml in (("world_mc", records, MC_YAML), ("world_sums", sums, SUMS_YAML)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (directory / f"{name}.yaml").write_text(yaml.format(data=data), encoding="utf-8")
    print(f"tasks: world_mc ({len(records)} questions, 4 choices), world_sums ({len(sums)} sums)")
    return directory / "world_mc.jsonl"


def run(lm, task_manager):
    import lm_eval

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=["world_mc", "world_sums"], log_samples=True,
                                      task_manager=task_manager, verbosity="ERROR")
    return time.perf_counter() - started, results


def time_requests(lm, tasks: Path) -> tuple[float, float]:
    """Seconds of the backend alone: the tasks' log-likelihood requests, then their generations,
    handed to the model object directly (no task building, no metrics)."""
    from lm_eval.api.instance import Instance

    choices = [json.loads(line) for line in (tasks / "world_mc.jsonl").read_text().splitlines()]
    sums = [json.loads(line) for line in (tasks / "world_sums.jsonl").read_text().splitlines()]
    scored = [Instance("loglikelihood", {}, (f"Question: {c['question']}\nAnswer:", f" {choice}"), 0)
              for c in choices for choice in c["choices"]]
    generated = [Instance("generate_until", {}, (s["prompt"], {"until": ["\n"], "max_gen_toks": 12,
                                                                "do_sample": False}), 0) for s in sums]
    started = time.perf_counter()
    lm.loglikelihood(scored, disable_tqdm=True)
    middle = time.perf_counter()
    lm.generate_until(generated, disable_tqdm=True)
    return middle - started, time.perf_counter() - middle


def per_request(results, task: str) -> list:
    return [response for sample in results["samples"][task] for response in sample["filtered_resps"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/quickstart/pretrain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gsm8k", default="../shared/data/math/gsm8k_test.jsonl")
    parser.add_argument("--gsm8k-checkpoint", default="runs/quickstart/sft")
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch
    from lm_eval.models.huggingface import HFLM

    from orchard.evaluation.harness import OrchardLM
    from orchard.interop.export import export_hf

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        mc_data = write_tasks(scratch / "tasks")
        export = export_hf(args.checkpoint, scratch / "hf")
        backends = {"orchard": OrchardLM(pretrained=args.checkpoint, device="cpu", batch_size=16),
                    "hf": HFLM(pretrained=str(export), device="cpu", dtype="float32", batch_size=16)}
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=str(scratch / "tasks"))  # indexes lm-eval's ~14,700 tasks once
        times: dict[str, list[float]] = {name: [] for name in backends}
        alone: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
        results = {}
        for _ in range(args.rounds):
            for name, lm in backends.items():
                seconds, results[name] = run(lm, task_manager)
                times[name].append(seconds)
                alone[name].append(time_requests(lm, scratch / "tasks"))
        print(f"\n{'backend':<10}{'world_mc acc':>14}{'acc_norm':>10}{'world_sums em':>15}{'median s':>10}")
        for name in backends:
            mc, sums = results[name]["results"]["world_mc"], results[name]["results"]["world_sums"]
            print(f"{name:<10}{mc['acc,none']:>14.4f}{mc['acc_norm,none']:>10.4f}{sums['exact_match,none']:>15.4f}"
                  f"{statistics.median(times[name]):>10.2f}")
        ours, theirs = (per_request(results[n], "world_mc") for n in backends)
        largest = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
        same_text = per_request(results["orchard"], "world_sums") == per_request(results["hf"], "world_sums")
        print(f"log-likelihoods: {len(ours)} requests, largest difference {largest:.2e}; "
              f"generated sums identical: {same_text}")
        print(f"hf / orchard time: {statistics.median(times['hf']) / statistics.median(times['orchard']):.2f}x "
              "(the whole simple_evaluate, lm-eval's own task building included)")
        for index, kind in enumerate(("loglikelihood (332 requests)", "generate_until (200 sums)")):
            ours, theirs = (statistics.median(t[index] for t in alone[n]) for n in ("orchard", "hf"))
            print(f"the backend alone, {kind}: orchard {ours:.2f} s, hf {theirs:.2f} s, {theirs / ours:.2f}x")

        # orchard eval's own mc task on the same items, and GSM8K at full size.
        command = [sys.executable, "-m", "orchard.cli.main", "eval", args.checkpoint, "--tasks", f"mc:{mc_data}",
                   "--json"]
        own = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        metrics = next(iter(next(iter(own["results"].values())).values()))["metrics"]
        print(f"orchard eval mc: acc {metrics['acc']:.4f}, acc_norm {metrics['acc_norm']:.4f}")
    if Path(args.gsm8k).is_file():
        started = time.perf_counter()
        command = [sys.executable, "-m", "orchard.cli.main", "eval", args.gsm8k_checkpoint, "--tasks",
                   f"gsm8k:{args.gsm8k}", "--batch-size", "32", "--json"]
        own = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        result = next(iter(next(iter(own["results"].values())).values()))
        print(f"gsm8k ({result['items']} problems) on {args.gsm8k_checkpoint}: exact match "
              f"{result['metrics']['exact_match']:.2%}, task {result['seconds']:.1f} s, command "
              f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
