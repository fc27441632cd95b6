"""Alignment speed beside TRL: rollout throughput, time per GRPO step and per DPO step, orchard's
`orchard.methods.grpo` / `orchard.methods.dpo` against TRL's GRPOTrainer / DPOTrainer.

    python benchmarks/alignment_vs_trl.py                   # ~5 minutes on 2 CPU cores
    python benchmarks/alignment_vs_trl.py --quick           # a smoke run: 3 steps each, 1 untimed
    python benchmarks/alignment_vs_trl.py --checkpoint runs/quickstart/sft --precision fp32

(TRL: `pip install -e '.[bench]'`.) Both sides train the SAME weights: a fresh quickstart-sized
model (4 layers x 256, GQA 4/2 heads, a 2048-token BPE trained on the built-in world) or
`--checkpoint`, saved as an orchard checkpoint and exported with `orchard.interop.export.export_hf`,
which transformers loads as a `LlamaForCausalLM` (the logits are checked to agree). The tokenizer is
the checkpoint's own, which `AutoTokenizer` loads; its chat template is checked to render every
prompt to the same text and ids on both sides.

What is measured, each in its own process with the same number of threads and precision (fp32
weights, bf16 autocast with `--precision bf16`), on the same data in the same order:

* rollouts: B prompts x G=8 sampled completions of exactly 64 new tokens (temperature 1, no top-k or
  top-p, an end token no model can produce), orchard's KV-cache `generate` beside transformers'
  `model.generate(num_return_sequences=8)`; completions/s and tokens/s, median of the timed calls;
* GRPO: B=2 prompts x 8 completions = 16 per optimizer step, 64 new tokens at most, beta 0.04 (a
  reference model; TRL's KL term the plain k3 as orchard's, use_bias_correction_kl=False),
  exact-match reward on the built-in world's questions, one generation per
  optimizer step (TRL: steps_per_generation=1, num_iterations=1), per-sequence loss aggregation
  (TRL's loss_type="grpo"), no gradient checkpointing; a step is everything between two optimizer
  steps (sampling, rewards, reference pass, forward/backward, AdamW, logging): orchard's
  metrics.jsonl `elapsed` differences, TRL's time between `on_step_end` callbacks;
* DPO: 8 pairs per step (one padded batch of 16 rows), sigmoid loss, beta 0.1, max length 256;
  the reference log-probabilities precomputed before training on both sides (orchard always does;
  TRL with precompute_ref_log_probs=True) and timed apart from the steps.

The first `--warmup` steps of each are not timed; the median of the rest is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SEED = 0
G = 8  # completions per prompt
NEW_TOKENS = 64
GRPO_PROMPTS = 2  # prompts per GRPO step: 16 completions
DPO_BATCH = 8  # pairs per DPO step
DPO_MAX_LENGTH = 256
GRPO_BETA, DPO_BETA = 0.04, 0.1
GRPO_LR, DPO_LR = 1e-5, 5e-5
VAL_PROMPTS, VAL_PAIRS = 2, 8  # held-out data the runs need; orchard evaluates on it once, after the timed steps
NEVER = 10**9  # an end-token id no model produces, so rollouts run their full 64 tokens
MARK = "@@result "
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


# --- setup (parent process) ----------------------------------------------------------------------

def build_checkpoint(directory: Path) -> Path:
    """A fresh quickstart-sized orchard model and a tokenizer trained on the built-in world."""
    from orchard.checkpoint import save_checkpoint
    from orchard.data.synthetic import World, generate_documents, instruction_conversations
    from orchard.model import CausalLM, ModelConfig
    from orchard.tokenizer import Tokenizer

    world = World()
    texts = [m["content"] for r in instruction_conversations(world, "train") for m in r["messages"]]
    tokenizer = Tokenizer.train(iter(texts + list(generate_documents(2000, seed=SEED, world=world))), vocab_size=2048)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                         pad_token_id=tokenizer.pad_id, **MODEL)
    model = CausalLM(config)
    model.reset_parameters(seed=SEED)
    return save_checkpoint(directory, model, tokenizer, {"stage": "benchmark"})


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def prepare(args, work: Path) -> dict:
    """The checkpoint, its transformers export and the data files both sides read; checks that
    transformers sees the same weights and renders the same prompts."""
    from orchard.checkpoint import load_checkpoint
    from orchard.data.synthetic import World, preference_pairs, verifiable_prompts
    from orchard.interop.export import export_hf

    checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint(work / "orchard")
    hf_dir = export_hf(checkpoint, work / "hf")
    world = World()
    grpo_prompts = verifiable_prompts(world, "train", num_items=GRPO_PROMPTS * args.grpo_steps)
    rollout_prompts = verifiable_prompts(world, "train", num_items=args.rollout_prompts)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
             for r in preference_pairs(world, "train", num_pairs=DPO_BATCH * args.dpo_steps)]
    files = {
        "checkpoint": str(load_checkpoint(checkpoint).path), "hf": str(hf_dir),
        "grpo_train": str(write_jsonl(work / "grpo_train.jsonl", grpo_prompts)),
        "grpo_val": str(write_jsonl(work / "grpo_val.jsonl", verifiable_prompts(world, "held_out",
                                                                                num_items=VAL_PROMPTS))),
        "rollout": str(write_jsonl(work / "rollout.jsonl", rollout_prompts)),
        "dpo_train": str(write_jsonl(work / "dpo_train.jsonl", pairs)),
        "dpo_val": str(write_jsonl(work / "dpo_val.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                            for r in preference_pairs(world, "held_out",
                                                                                      num_pairs=VAL_PAIRS)])),
    }
    files["checks"] = check_same_model(files, grpo_prompts + rollout_prompts, pairs)
    return files


def check_same_model(files: dict, prompts: list[dict], pairs: list[dict]) -> dict:
    import transformers

    from orchard.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(files["checkpoint"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(files["hf"])
    conversations = ([(p["prompt"], True) for p in prompts] +
                     [(p["prompt"] + p[side], False) for p in pairs for side in ("chosen", "rejected")])
    for messages, generation_prompt in conversations:
        ours = checkpoint.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        if ours != theirs or checkpoint.tokenizer.encode(ours) != tokenizer(theirs, add_special_tokens=False)["input_ids"]:
            raise SystemExit(f"the exported tokenizer renders {messages!r} differently:\n{ours!r}\n{theirs!r}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(files["hf"], dtype=torch.float32).eval()
    ids = torch.tensor([checkpoint.tokenizer.encode(checkpoint.tokenizer.apply_chat_template(
        prompts[0]["prompt"], add_generation_prompt=True))])
    with torch.no_grad():
        difference = (hf(ids).logits - checkpoint.model.float().eval()(ids).logits).abs().max().item()
    if difference > 1e-3:
        raise SystemExit(f"transformers' logits differ from orchard's by {difference}: not the same model")
    return {"hf_class": type(hf).__name__, "parameters": checkpoint.model.num_parameters(),
            "max_logit_difference": difference, "prompts_checked": len(conversations),
            "config": {k: getattr(checkpoint.model.config, k) for k in ("vocab_size", *MODEL)}}


# --- helpers shared by the workers -------------------------------------------------------------

def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def timed(times: list[float], warmup: int) -> list[float]:
    return times[warmup:] if len(times) > warmup else times


def step_times_from_ends(start: float, ends: list[float]) -> list[float]:
    marks = [start, *ends]
    return [b - a for a, b in zip(marks, marks[1:])]


def epoch_order(count: int, samples: int | None = None, seed: int = SEED) -> list[int]:
    """The indices of the first `samples` (default `count`) items orchard's engine takes from `count`
    items with `seed` (a fresh permutation each epoch), for TRL to take them in too."""
    from orchard.data.packing import EpochOrder

    order = EpochOrder(count, seed)
    return [order[i] for i in range(count if samples is None else samples)]


def trl_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time between optimizer steps, as orchard's `elapsed` counts it: everything the step
        costs (data, generation, rewards, forward/backward, optimizer, logging)."""

        def __init__(self):
            self.start, self.begins, self.ends = None, [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def results(self) -> dict:
            return {"step_times": step_times_from_ends(self.start, self.ends),
                    "begin_to_end": [e - b for b, e in zip(self.begins, self.ends)]}

    return StepTimer()


def trl_common(precision: str, steps: int, out: str, lr: float, compiled: bool, seed: int = SEED) -> dict:
    """TrainingArguments both TRL trainers get, chosen to match orchard's engine (AdamW betas 0.9/0.95,
    eps 1e-8, fused; clip 1.0)."""
    return dict(torch_compile=compiled, output_dir=out, max_steps=steps, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0,
                weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
                optim="adamw_torch_fused", gradient_accumulation_steps=1, gradient_checkpointing=False,
                bf16=precision == "bf16", fp16=False, use_cpu=True, logging_steps=1, report_to="none",
                save_strategy="no", eval_strategy="no", seed=seed, data_seed=seed, dataloader_num_workers=0,
                disable_tqdm=True)


def trl_grpo_args(prompts_per_step: int, num_generations: int, max_new_tokens: int, temperature: float, beta: float,
                  loss_type: str) -> dict:
    """GRPOConfig fields beyond `trl_common` that make TRL's GRPO orchard's: one generation of
    prompts_per_step x num_generations completions per optimizer step, used once (steps_per_generation=1,
    num_iterations=1); no top-k or top-p; clip 0.2 both ways; group-std advantages; the plain k3 KL
    (orchard's: no importance weight on it, use_bias_correction_kl=False); the dataset taken in the order
    given (shuffle_dataset=False: it is written in orchard's order)."""
    return dict(per_device_train_batch_size=prompts_per_step * num_generations, num_generations=num_generations,
                steps_per_generation=1, num_iterations=1, max_completion_length=max_new_tokens,
                temperature=temperature, top_p=1.0, top_k=0, beta=beta, epsilon=0.2, loss_type=loss_type,
                scale_rewards="group", use_bias_correction_kl=False, mask_truncated_completions=False,
                shuffle_dataset=False, log_completions=False)


def exact_match_reward(prompts, completions, answer, rivals=None, **kwargs):
    """orchard's `exact_match`, as a TRL reward function (`answer` and `rivals` are the dataset's
    columns)."""
    from orchard.rewards.functions import exact_match

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return exact_match(prompts, texts, answer, rivals)


def trl_policy(hf_dir: str):
    """The exported model and tokenizer as TRL's trainers take them, fp32; its replies end where
    orchard's do: at end-of-text or the chat template's end of turn."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return model, tokenizer


# --- workers ---------------------------------------------------------------------------------------

def rollout_orchard(files: dict, args) -> dict:
    from orchard.checkpoint import load_checkpoint
    from orchard.model.generation import SamplingConfig, generate

    checkpoint = load_checkpoint(files["checkpoint"])
    model, tokenizer = checkpoint.model.float().eval(), checkpoint.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True))
               for r in read_jsonl(files["rollout"])]
    batch = [ids for ids in prompts for _ in range(G)]
    times, tokens = [], []
    for call in range(args.rollout_warmup + args.rollout_calls):
        sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0, seed=call)
        started = time.perf_counter()
        with torch.no_grad(), autocast(args.precision):
            out = generate(model, batch, sampling, eos_id=[NEVER], pad_id=tokenizer.pad_id)
        times.append(time.perf_counter() - started)
        tokens.append(sum(len(o) for o in out))
    return {"times": times, "tokens": tokens, "completions": len(batch)}


def rollout_transformers(files: dict, args) -> dict:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(files["hf"], padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(files["hf"], dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
             for r in read_jsonl(files["rollout"])]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    times, tokens = [], []
    for call in range(args.rollout_warmup + args.rollout_calls):
        torch.manual_seed(call)
        started = time.perf_counter()
        with torch.no_grad(), autocast(args.precision):
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=NEW_TOKENS, num_return_sequences=G, eos_token_id=NEVER,
                                 pad_token_id=tokenizer.pad_token_id)
        times.append(time.perf_counter() - started)
        tokens.append(int((out[:, inputs["input_ids"].size(1):] != tokenizer.pad_token_id).sum()))
    return {"times": times, "tokens": tokens, "completions": out.size(0)}


def grpo_orchard(files: dict, args, out: Path) -> dict:
    from orchard.methods import grpo
    from orchard.methods.rollouts import PromptDataConfig
    from orchard.training import TrainConfig

    config = grpo.GRPOConfig(
        init=files["checkpoint"], out=str(out), rewards=["exact_match"], num_generations=G,
        max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, beta=GRPO_BETA, epsilon=0.2,
        compile_decoding=args.compile_decoding,
        loss_aggregation="sequence", scale_rewards=True,
        data=PromptDataConfig(path=files["grpo_train"], val_path=files["grpo_val"], eval_prompts=VAL_PROMPTS),
        train=TrainConfig(max_steps=args.grpo_steps, batch_size=GRPO_PROMPTS, grad_accum=1, lr=GRPO_LR,
                          warmup_steps=0, weight_decay=0.0, grad_clip=1.0, precision=args.precision, device="cpu",
                          eval_every=0, save_every=0, log_every=1, seed=SEED, progress=False,
                          compile=args.compile or "auto"))
    grpo.run(config)
    rows = [r for r in read_jsonl(str(out / "metrics.jsonl")) if "elapsed" in r]
    elapsed = [r["elapsed"] for r in rows]
    return {"step_times": step_times_from_ends(0.0, elapsed),
            "completion_length": [r["completion_length"] for r in rows]}


def grpo_trl(files: dict, args, out: Path) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    records = read_jsonl(files["grpo_train"])
    dataset = Dataset.from_list([records[i] for i in epoch_order(len(records))])
    model, tokenizer = trl_policy(files["hf"])
    config = GRPOConfig(**trl_common(args.precision, args.grpo_steps, str(out), GRPO_LR, args.compile),
                        **trl_grpo_args(GRPO_PROMPTS, G, NEW_TOKENS, 1.0, GRPO_BETA, "grpo"))
    timer = trl_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {**timer.results(), "completion_length": lengths, "generation_batch_size": config.generation_batch_size,
            "autocast": trainer.accelerator.mixed_precision}


def dpo_orchard(files: dict, args, out: Path) -> dict:
    from orchard.checkpoint import load_checkpoint
    from orchard.methods import dpo
    from orchard.methods.pairs import PreferenceDataConfig, load_pairs
    from orchard.training import TrainConfig
    from orchard.training.runtime import Runtime

    config = dpo.DPOConfig(
        init=files["checkpoint"], out=str(out), loss="dpo", beta=DPO_BETA,
        data=PreferenceDataConfig(path=files["dpo_train"], val_path=files["dpo_val"], max_length=DPO_MAX_LENGTH),
        train=TrainConfig(max_steps=args.dpo_steps, batch_size=DPO_BATCH, grad_accum=1, lr=DPO_LR, warmup_steps=0,
                          weight_decay=0.0, grad_clip=1.0, precision=args.precision, device="cpu", eval_every=0,
                          eval_batches=1, save_every=0, log_every=1, seed=SEED, progress=False,
                          compile=args.compile or "auto"))
    # The reference pass `dpo.run` makes first, timed here on its own (in a scratch directory: the
    # run directory must be new to `dpo.run`, which computes it again before its steps).
    checkpoint = load_checkpoint(config.init)
    train, val, _ = load_pairs(config.data, checkpoint.tokenizer, SEED)
    scratch = out.parent / f"{out.name}-reference"
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dpo.cached_reference(scratch, checkpoint.model.float().train(), train, val, checkpoint.tokenizer.pad_id,
                         2 * DPO_BATCH, checkpoint.record.get("weights_sha256"),
                         Runtime(torch.device("cpu"), args.precision))
    reference_seconds = time.perf_counter() - started
    dpo.run(config)
    rows = [r for r in read_jsonl(str(out / "metrics.jsonl")) if "elapsed" in r]
    return {"step_times": step_times_from_ends(0.0, [r["elapsed"] for r in rows]),
            "reference_seconds": reference_seconds, "reference_pairs": len(train) + len(val),
            "step_tokens": [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows, rows)]}


def dpo_trl(files: dict, args, out: Path) -> dict:
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    records = read_jsonl(files["dpo_train"])
    dataset = Dataset.from_list([records[i] for i in epoch_order(len(records))])
    val = Dataset.from_list(read_jsonl(files["dpo_val"]))
    shapes: list[int] = []
    reference = {"seconds": 0.0, "pairs": 0}

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer, noting how long the reference precomputation takes and each batch's size."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            started = time.perf_counter()
            result = super()._precompute_ref_logps(dataset, name, batch_size)
            reference["seconds"] += time.perf_counter() - started
            reference["pairs"] += len(dataset)
            return result

        def compute_loss(self, model, inputs, *rest, **kwargs):
            if model.training:
                shapes.append(inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, *rest, **kwargs)

    model = transformers.AutoModelForCausalLM.from_pretrained(files["hf"], dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(files["hf"])
    config = DPOConfig(**trl_common(args.precision, args.dpo_steps, str(out), DPO_LR, args.compile),
                       per_device_train_batch_size=DPO_BATCH, per_device_eval_batch_size=DPO_BATCH,
                       max_length=DPO_MAX_LENGTH, beta=DPO_BETA, loss_type=["sigmoid"],
                       precompute_ref_log_probs=True, precompute_ref_batch_size=2 * DPO_BATCH,
                       train_sampling_strategy="sequential")
    timer = trl_timer()
    trainer = TimedDPOTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=val,
                              processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {**timer.results(), "reference_seconds": reference["seconds"], "reference_pairs": reference["pairs"],
            "step_tokens": shapes, "autocast": trainer.accelerator.mixed_precision}


WORKERS = {"rollout-orchard": rollout_orchard, "rollout-transformers": rollout_transformers,
           "grpo-orchard": grpo_orchard, "grpo-trl": grpo_trl, "dpo-orchard": dpo_orchard, "dpo-trl": dpo_trl}


def run_worker(name: str, args) -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    files = json.loads(Path(args.files).read_text())
    fn = WORKERS[name]
    if name.startswith("rollout"):
        result = fn(files, args)
    else:
        result = fn(files, args, Path(files["work"]) / name)
    result["threads"] = torch.get_num_threads()
    print(MARK + json.dumps(result), flush=True)


# --- the parent: run the workers, print the table ------------------------------------------------

def spawn(name: str, args, files_path: Path) -> dict | None:
    command = [sys.executable, __file__, "--worker", name, "--files", str(files_path), "--threads", str(args.threads),
               "--precision", args.precision, "--grpo-steps", str(args.grpo_steps), "--dpo-steps", str(args.dpo_steps),
               "--rollout-prompts", str(args.rollout_prompts), "--rollout-calls", str(args.rollout_calls),
               "--rollout-warmup", str(args.rollout_warmup)] + (["--compile-decoding"] if args.compile_decoding else []) \
        + (["--compile"] if args.compile else [])
    return run_worker_process(name, command, args.threads)


def run_worker_process(name: str, command: list[str], threads: int) -> dict | None:
    """Run a worker `command` with `threads` threads everywhere (torch, OpenMP, MKL) and quiet
    libraries; its result is the JSON it prints after MARK, or None (with its output's tail) if it
    failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
    if out.returncode != 0 or not lines:
        tail = "\n    ".join((out.stderr or out.stdout).strip().splitlines()[-15:])
        print(f"  {name}: failed (exit {out.returncode}):\n    {tail}", flush=True)
        return None
    print(f"  {name}: done in {time.perf_counter() - started:.0f}s", flush=True)
    return json.loads(lines[-1][len(MARK):])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    from orchard.training.runtime import cpu_has_bf16_matmul

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="an orchard checkpoint to use instead of a fresh quickstart-sized model")
    parser.add_argument("--precision", choices=["bf16", "fp32"],
                        default="bf16" if cpu_has_bf16_matmul() else "fp32",
                        help="both sides (default: bf16 autocast where the CPU has bf16 matmuls, else fp32)")
    parser.add_argument("--threads", type=int, default=cores, help=f"torch threads for both sides (default {cores})")
    parser.add_argument("--steps", type=int, help="optimizer steps of GRPO and DPO alike (warm-up included)")
    parser.add_argument("--grpo-steps", type=int, default=6)
    parser.add_argument("--dpo-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing")
    parser.add_argument("--rollout-prompts", type=int, default=GRPO_PROMPTS, help="B, prompts per rollout call")
    parser.add_argument("--rollout-calls", type=int, default=3, help="timed rollout calls")
    parser.add_argument("--rollout-warmup", type=int, default=1, help="untimed rollout calls first")
    parser.add_argument("--quick", action="store_true", help="3 steps of each (1 untimed), 1 timed rollout call")
    parser.add_argument("--only", nargs="+", choices=["rollout", "grpo", "dpo"], default=["rollout", "grpo", "dpo"])
    parser.add_argument("--workdir", help="keep the checkpoint, export, data and run directories here")
    parser.add_argument("--compile-decoding", action="store_true",
                        help="orchard's GRPO rollouts decode with a compiled step (compile_decoding=true; the first, "
                             "compiling, rollout falls in the untimed warm-up steps)")
    parser.add_argument("--compile", action="store_true",
                        help="both sides' training steps compiled: orchard's train.compile=true (its blocks), TRL's "
                             "torch_compile=True (the compiling steps fall in the untimed warm-up)")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args)
        return
    if args.quick:
        args.grpo_steps = args.dpo_steps = 3
        args.warmup, args.rollout_calls = 1, 1
    if args.steps:
        args.grpo_steps = args.dpo_steps = args.steps
    if min(args.grpo_steps, args.dpo_steps) <= args.warmup:
        parser.error(f"--steps must exceed --warmup ({args.warmup}) so that some steps are timed")

    import transformers
    import trl

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        for name in WORKERS:  # a run directory left from an earlier run would be resumed, not rerun
            if (work / name).exists():
                raise SystemExit(f"{work / name} exists: give another --workdir")
        started = time.perf_counter()
        files = {**prepare(args, work), "work": str(work)}
        checks = files["checks"]
        files_path = work / "files.json"
        files_path.write_text(json.dumps(files))
        bf16_note = "bf16 autocast, fp32 weights" if args.precision == "bf16" else "fp32"
        print(f"machine: {cpu_name()}, {cores} cores available, {args.threads} torch threads per side; "
              f"CPU bf16 matmuls: {'yes' if cpu_has_bf16_matmul() else 'no'} -> {args.precision} ({bf16_note}); "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"software: python {platform.python_version()}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, trl {trl.__version__}")
        c = checks["config"]
        print(f"model: {'--checkpoint ' + args.checkpoint if args.checkpoint else 'fresh quickstart-sized model'}: "
              f"{c['num_hidden_layers']} layers x {c['hidden_size']}, {c['num_attention_heads']}/"
              f"{c['num_key_value_heads']} heads, vocab {c['vocab_size']}, {checks['parameters'] / 1e6:.1f}M "
              f"parameters; transformers loads it as {checks['hf_class']} (max |logit difference| "
              f"{checks['max_logit_difference']:.1e}); {checks['prompts_checked']} chats render to the same ids")
        print(f"runs (each side in its own process), set-up {time.perf_counter() - started:.0f}s:", flush=True)
        results = {}
        for part in args.only:
            for side in (("orchard", "transformers") if part == "rollout" else ("orchard", "trl")):
                results[f"{part}-{side}"] = spawn(f"{part}-{side}", args, files_path)
        print_report(args, results)


def print_report(args, results: dict) -> None:
    rows = []

    def add(what: str, ours, theirs, higher_is_better: bool, fmt: str) -> None:
        if ours is None or theirs is None:
            rows.append([what, "-" if ours is None else format(ours, fmt), "-" if theirs is None else format(theirs, fmt),
                         "-"])
            return
        speedup = ours / theirs if higher_is_better else theirs / ours
        rows.append([what, format(ours, fmt), format(theirs, fmt), f"{speedup:.2f}x"])

    notes = []
    if "rollout" in args.only:
        stats = {}
        for side in ("orchard", "transformers"):
            r = results.get(f"rollout-{side}")
            if r:
                times, tokens = timed(r["times"], args.rollout_warmup), timed(r["tokens"], args.rollout_warmup)
                t = median(times)
                stats[side] = (r["completions"] / t, median(tokens) / t, median(tokens) / r["completions"])
        label = f"B={args.rollout_prompts} x G={G}, {NEW_TOKENS} new"
        add(f"rollout completions/s ({label})", stats.get("orchard", (None,))[0],
            stats.get("transformers", (None,))[0], True, ",.1f")
        add("rollout tokens/s", stats.get("orchard", (None, None))[1], stats.get("transformers", (None, None))[1],
            True, ",.0f")
        if stats:
            notes.append("rollout tokens per completion: " + ", ".join(f"{k} {v[2]:.1f}" for k, v in stats.items()))
    for part, steps, what in (("grpo", args.grpo_steps, f"GRPO step, s ({GRPO_PROMPTS} prompts x {G})"),
                              ("dpo", args.dpo_steps, f"DPO step, s ({DPO_BATCH} pairs)")):
        if part not in args.only:
            continue
        ours, theirs = results.get(f"{part}-orchard"), results.get(f"{part}-trl")
        med = {k: median(timed(r["step_times"], args.warmup)) if r else None for k, r in (("o", ours), ("t", theirs))}
        add(f"{what}, median of {steps - args.warmup}", med["o"], med["t"], False, ".3f")
        if part == "grpo":
            for name, r in (("orchard", ours), ("TRL", theirs)):
                if r:
                    lengths = timed(r["completion_length"], args.warmup)
                    notes.append(f"GRPO mean completion length over the timed steps, {name}: "
                                 f"{statistics.fmean(lengths):.1f} tokens")
            if theirs:
                notes.append(f"TRL GRPO generation batch {theirs['generation_batch_size']} (= one optimizer step), "
                             f"accelerate mixed precision: {theirs['autocast']}; TRL median on_step_begin->on_step_end "
                             f"{median(timed(theirs['begin_to_end'], args.warmup)):.3f}s")
        else:
            if ours and theirs:
                add(f"DPO reference pass, ms per pair ({ours['reference_pairs']} / {theirs['reference_pairs']} pairs)",
                    1000 * ours["reference_seconds"] / ours["reference_pairs"],
                    1000 * theirs["reference_seconds"] / theirs["reference_pairs"], False, ".2f")
            for name, r in (("orchard", ours), ("TRL", theirs)):
                if r:
                    notes.append(f"DPO padded tokens per timed step, {name}: "
                                 f"{statistics.fmean(timed(r['step_tokens'], args.warmup)):.0f}")
            if theirs:
                notes.append(f"TRL DPO accelerate mixed precision: {theirs['autocast']}; TRL median "
                             f"on_step_begin->on_step_end {median(timed(theirs['begin_to_end'], args.warmup)):.3f}s")
    header = ["what", "orchard", "TRL", "orchard speed-up"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    print()
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for row in rows:
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    print()
    print(f"settings: precision {args.precision}, {args.threads} threads, seed {SEED}; rollouts temperature 1, top-k 0, "
          f"top-p 1, {NEW_TOKENS} new tokens forced (end token never sampled), {args.rollout_warmup} untimed + "
          f"{args.rollout_calls} timed calls; GRPO {GRPO_PROMPTS} prompts x G={G} per step, <= {NEW_TOKENS} new tokens, "
          f"beta {GRPO_BETA}, epsilon 0.2, per-sequence loss, group-std advantages, lr {GRPO_LR}; DPO {DPO_BATCH} "
          f"pairs per step, sigmoid loss, beta {DPO_BETA}, max length {DPO_MAX_LENGTH}, lr {DPO_LR}; both: AdamW "
          f"(fused, betas 0.9/0.95, no weight decay), clip 1.0, no gradient checkpointing, {args.warmup} untimed "
          f"warm-up steps, GRPO {args.grpo_steps} / DPO {args.dpo_steps} steps; orchard's GRPO decoding "
          f"{'compiled (compile_decoding)' if args.compile_decoding else 'eager'}; training steps "
          f"{'compiled on both sides' if args.compile else 'eager'}")
    for note in notes:
        print(f"  {note}")
    if "rollout" in args.only:
        print("  the rollout rows' TRL column is transformers' model.generate, which GRPOTrainer calls to sample "
              "when use_vllm is off")
    print("differences that remain: random streams differ (torch.multinomial in orchard vs transformers' sampler), "
          "so the sampled tokens, rewards and GRPO completion lengths differ though their distributions do not; "
          "TRL's GRPO loss pass always computes each token's entropy too (compute_entropy=True is hard-coded; a logged "
          "metric); learning-rate schedule shapes (orchard: cosine to 10%, TRL: cosine to 0) do not change the work; "
          "TRL also logs its own metrics each step, as orchard writes metrics.jsonl.")


if __name__ == "__main__":
    main()
