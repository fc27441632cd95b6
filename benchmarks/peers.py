"""Orchard beside its peers, row by row, each measurement in its own process, orchard and the peer
alternating, with medians and ranges.

    python benchmarks/peers.py                         # training and generation rows, 3 rounds (~6 minutes)
    python benchmarks/peers.py --rows train --rounds 5
    python benchmarks/peers.py --rows lora grpo dpo    # the rows of finetune_methods.py and alignment_vs_trl.py

Rows (the peer dependencies come with the `bench` extra: transformers, TRL, PEFT):
- train: the 13.8M Llama of the speed issue (6 blocks of 384, vocabulary 8192, batch 8 x 256 random
  tokens, bf16 autocast, fused AdamW, clipping), orchard's engine (`Trainer`, the fused head and
  loss) beside transformers' `LlamaForCausalLM` with the same weights, both eager and both
  compiled (`torch.compile` of the model; orchard's `train.compile`). Tokens/s over the timed steps;
  MFU against the bf16 matmul peak measured in the same process.
- generate: greedy decoding of 128 new tokens at batch 1 and 16, fp32, the same weights: orchard's
  `generate` (KV cache) beside transformers' `generate`; tokens/s, and whether the tokens are
  identical. Then at batch 1 orchard's compiled decoding (`SamplingConfig.compile`: static cache,
  compiled step) beside transformers' `generate`, and beside transformers compiled too (its static
  cache and `torch.compile` of its forward). A warm-up call (which compiles) is not timed.
- lora, grpo, dpo: run `finetune_methods.py` (orchard's LoRA beside PEFT's, eager and both
  compiled, with peak memory) and `alignment_vs_trl.py` (DPO steps beside TRL's, eager and both
  compiled; GRPO steps, eager and with orchard's compiled decoding) once per round and read their
  figures (steps/s: the inverse of the median step time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MARK = "PEERS-RESULT "
TRAIN = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=6, max_position_embeddings=512, tie_word_embeddings=True)
BATCH, SEQ_LEN, TRAIN_STEPS, WARMUP = 8, 256, 14, 4
PROMPT, NEW_TOKENS = 16, 128


def orchard_model():
    from orchard.model import CausalLM, ModelConfig

    model = CausalLM(ModelConfig(**TRAIN))
    model.reset_parameters(seed=0)
    return model


def transformers_model():
    """transformers' Llama with orchard_model()'s weights (the same names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    source = orchard_model()
    config = LlamaConfig(**source.config.to_hf_dict(), attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    missing = model.load_state_dict(source.state_dict(), strict=False)
    assert not [k for k in missing.missing_keys if k != "lm_head.weight"], missing
    model.tie_weights()
    return model


def batches(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, TRAIN["vocab_size"], (BATCH, SEQ_LEN + 1), generator=generator) for _ in range(steps)]


def matmul_peak() -> float:
    a, b = torch.randn(2048, 2048).bfloat16(), torch.randn(2048, 2048).bfloat16()
    best = float("inf")
    for _ in range(8):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 2048 ** 3 / best


def train_orchard(compiled: bool) -> dict:
    sys.path.insert(0, str(HERE))
    from train_throughput import RandomTokens

    from orchard.tokenizer import Tokenizer
    from orchard.training import TrainConfig, Trainer

    model = orchard_model()
    train = TrainConfig(max_steps=TRAIN_STEPS, batch_size=BATCH, precision="bf16", device="cpu", eval_every=0,
                        save_every=0, log_every=1, progress=False, compile=compiled, warmup_steps=1)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(train, model, RandomTokens(TRAIN["vocab_size"], BATCH, SEQ_LEN),
                          Tokenizer.train(["benchmark text"] * 10, vocab_size=300), out, record={"stage": "benchmark"},
                          flops_per_token=model.config.training_flops_per_token(SEQ_LEN))
        trainer.fit()
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][WARMUP:]
    return {"tokens_per_s": statistics.median(timed), "flops_per_token": model.config.training_flops_per_token(SEQ_LEN)}


def train_transformers(compiled: bool) -> dict:
    model = transformers_model().train()
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    speeds = []
    for step, tokens in enumerate(batches(TRAIN_STEPS)):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step_model(input_ids=tokens, labels=tokens).loss  # shifts the labels itself: 256 targets a row
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARMUP:
            speeds.append(BATCH * SEQ_LEN / (time.perf_counter() - started))
    from orchard.model import ModelConfig
    return {"tokens_per_s": statistics.median(speeds),
            "flops_per_token": ModelConfig(**TRAIN).training_flops_per_token(SEQ_LEN)}


def prompts(batch: int) -> torch.Tensor:
    return torch.randint(1, TRAIN["vocab_size"], (batch, PROMPT), generator=torch.Generator().manual_seed(batch))


def generate_orchard(batch: int, compiled: bool = False) -> dict:
    from orchard.model.generation import SamplingConfig, generate

    model = orchard_model().eval()
    ids = prompts(batch).tolist()
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, compile=compiled)
    generate(model, ids, sampling, eos_id=-1, pad_id=0)  # warm-up
    started = time.perf_counter()
    outputs = generate(model, ids, sampling, eos_id=-1, pad_id=0)
    seconds = time.perf_counter() - started
    return {"tokens_per_s": batch * NEW_TOKENS / seconds, "tokens": digest(outputs)}


def generate_transformers(batch: int, compiled: bool = False) -> dict:
    """transformers' `generate`; compiled: its static cache and a compiled forward, as its docs
    recommend (on the CPU `generate` does not compile by itself)."""
    model = transformers_model().eval()
    ids = prompts(batch)
    settings = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0,
                    eos_token_id=None)
    if compiled:
        model.forward = torch.compile(model.forward, dynamic=False)
        settings["cache_implementation"] = "static"
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), **settings)  # warm-up
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
        seconds = time.perf_counter() - started
    return {"tokens_per_s": batch * NEW_TOKENS / seconds, "tokens": digest(out[:, PROMPT:].tolist())}


def digest(outputs: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()[:12]


WORKERS = {
    "train-orchard": lambda: train_orchard(False), "train-transformers": lambda: train_transformers(False),
    "train-orchard-compiled": lambda: train_orchard(True),
    "train-transformers-compiled": lambda: train_transformers(True),
    "generate-1-orchard": lambda: generate_orchard(1), "generate-1-transformers": lambda: generate_transformers(1),
    "generate-16-orchard": lambda: generate_orchard(16), "generate-16-transformers": lambda: generate_transformers(16),
    "generate-1-orchard-compiled": lambda: generate_orchard(1, compiled=True),
    "generate-1-transformers-compiled": lambda: generate_transformers(1, compiled=True),
}
ROWS = {
    "train": [("training, eager", "train-orchard", "train-transformers"),
              ("training, both compiled", "train-orchard-compiled", "train-transformers-compiled")],
    "generate": [("greedy generation, batch 1", "generate-1-orchard", "generate-1-transformers"),
                 ("greedy generation, batch 16", "generate-16-orchard", "generate-16-transformers"),
                 ("generation, batch 1, orchard compiled", "generate-1-orchard-compiled", "generate-1-transformers"),
                 ("generation, batch 1, both compiled", "generate-1-orchard-compiled",
                  "generate-1-transformers-compiled")],
}
def finetune_figures(stdout: str) -> dict:
    """finetune_methods.py's table: (tokens/s, peak RSS MiB) of orchard's LoRA and PEFT's."""
    table = {line.split()[0]: line.split() for line in stdout.splitlines() if line.split()}
    return {side: (float(table[method][3].replace(",", "")), float(table[method][4].replace(",", "")))
            for side, method in (("orchard", "lora"), ("peer", "peft-lora"))}


def alignment_figures(what: str):
    """alignment_vs_trl.py's line `what`: steps/s of orchard and TRL (the inverse of its median seconds)."""
    def read(stdout: str) -> dict:
        line = next(line for line in stdout.splitlines() if line.startswith(what))
        orchard, trl = (float(value) for value in line.split()[-3:-1])
        return {"orchard": (1 / orchard, None), "peer": (1 / trl, None)}
    return read


LORA = ["finetune_methods.py", "--methods", "lora", "peft-lora"]
ALIGNMENT = ["alignment_vs_trl.py", "--grpo-steps", "10", "--dpo-steps", "20", "--warmup", "3"]
SCRIPT_ROWS = {
    # row: [(label, script and its arguments, reader of its output: {side: (figure, peak MiB or None)})]
    "lora": [("LoRA r=8 training, tokens/s, eager", LORA, finetune_figures),
             ("LoRA r=8 training, both compiled", [*LORA, "--compile", "--steps", "12"], finetune_figures)],
    "dpo": [("DPO steps/s (8 pairs), eager", [*ALIGNMENT, "--only", "dpo"], alignment_figures("DPO step")),
            ("DPO steps/s, both compiled", [*ALIGNMENT, "--only", "dpo", "--compile"], alignment_figures("DPO step"))],
    "grpo": [("GRPO steps/s (16 completions), eager", [*ALIGNMENT, "--only", "grpo"], alignment_figures("GRPO step")),
             ("GRPO steps/s, compiled decoding", [*ALIGNMENT, "--only", "grpo", "--compile-decoding"],
              alignment_figures("GRPO step"))],
}


def run(worker: str) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--worker", worker], capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{worker} failed:\n" + "\n".join((out.stderr or out.stdout).splitlines()[-15:]))
    return json.loads(lines[-1][len(MARK):])


def spread(values: list[float]) -> str:
    digits = 2 if statistics.median(values) < 100 else 0
    return f"{statistics.median(values):>9,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=[*ROWS, *SCRIPT_ROWS], default=list(ROWS))
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each side, alternating")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker]()
        if args.worker.startswith("train"):
            result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / matmul_peak()
        print(MARK + json.dumps(result), flush=True)
        return
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"median (min-max) of {args.rounds} processes each, orchard and peer alternating")
    print(f"{'tokens/s unless said':<38}{'peer':>26}{'orchard':>26}{'ratio':>8}")
    for row in args.rows:
        for label, ours, theirs in ROWS.get(row, []):
            results = {ours: [], theirs: []}
            for _ in range(args.rounds):
                for worker in (theirs, ours):
                    results[worker].append(run(worker))
            a = [r["tokens_per_s"] for r in results[ours]]
            b = [r["tokens_per_s"] for r in results[theirs]]
            ratios = [x / y for x, y in zip(a, b)]
            extra = ""
            if "mfu" in results[ours][0]:
                extra = f"  MFU {statistics.median(r['mfu'] for r in results[theirs]):.1%} -> " \
                        f"{statistics.median(r['mfu'] for r in results[ours]):.1%}"
            if "tokens" in results[ours][0]:
                same = results[ours][0]["tokens"] == results[theirs][0]["tokens"]
                extra = f"  tokens {'identical' if same else 'DIFFER'}"
            print(f"{label:<38}{spread(b):>26}{spread(a):>26}{statistics.median(ratios):>7.2f}x{extra}", flush=True)
        for label, command, read in SCRIPT_ROWS.get(row, []):
            figures = []
            for _ in range(args.rounds):
                out = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], capture_output=True,
                                     text=True)
                figures.append(read(out.stdout))
            a, b = ([f[side][0] for f in figures] for side in ("orchard", "peer"))
            ratios = [x / y for x, y in zip(a, b)]
            memory = ""
            if figures[0]["orchard"][1] is not None:
                memory = f"  peak RSS MiB {statistics.median(f['peer'][1] for f in figures):,.0f} -> " \
                         f"{statistics.median(f['orchard'][1] for f in figures):,.0f}"
            print(f"{label:<38}{spread(b):>26}{spread(a):>26}{statistics.median(ratios):>7.2f}x{memory}", flush=True)


if __name__ == "__main__":
    main()
