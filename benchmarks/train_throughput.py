"""Training throughput and model FLOPs utilisation (MFU) of orchard's engine.

    python benchmarks/train_throughput.py                    # CPU: fp32 and bf16, ~10M and ~100M models
    python benchmarks/train_throughput.py --device cuda --compile --sizes 100M

It first measures the machine's matmul peak (the best of several large square matmuls, fp32 and
bf16), then runs the real training engine (`orchard.training.Trainer`: AdamW, autocast, clipping,
logging) on random tokens for each model size and precision, and prints tokens/s and
MFU = (training FLOPs per token x tokens/s) / peak. MFU is given against the peak of the same
precision and against the machine's best peak (bf16), so fp32 and bf16 can be compared honestly.
Training FLOPs per token are the usual 6N + 12·L·d·T estimate (`ModelConfig.training_flops_per_token`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from orchard.model import CausalLM, ModelConfig
from orchard.tokenizer import Tokenizer
from orchard.training import TrainConfig, Trainer

SIZES = {
    # name: (config, micro-batch, sequence length)
    "10M": (ModelConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                        num_attention_heads=6, num_key_value_heads=6), 8, 256),
    "100M": (ModelConfig(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4), 4, 256),
}


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(3):
        a @ b
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


class RandomTokens:
    """A method whose batches are random tokens: measures the engine, not the data pipeline."""

    name = "benchmark"
    trainable_modules = None

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int):
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len

    def batch(self, step, micro, rank, world):
        generator = torch.Generator().manual_seed(step * 1000 + micro)
        tokens = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=generator)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def count(self, batch):
        return batch["labels"].numel()

    def loss(self, model, batch):
        return model(batch["input_ids"], labels=batch["labels"]).loss, {}

    def evaluate(self, model, shard):
        return {}


def measure(name: str, precision: str, device: str, steps: int, compile_model: bool, tokenizer: Tokenizer) -> dict:
    config, batch_size, seq_len = SIZES[name]
    model = CausalLM(ModelConfig(**{**config.__dict__}))
    train = TrainConfig(max_steps=steps, batch_size=batch_size, precision=precision, device=device,
                        eval_every=0, save_every=0, log_every=1, progress=False, compile=compile_model,
                        warmup_steps=1)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(train, model, RandomTokens(config.vocab_size, batch_size, seq_len), tokenizer, out,
                          record={"stage": "benchmark"}, flops_per_token=config.training_flops_per_token(seq_len))
        trainer.fit()
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    # The first steps include warm-up (allocations, compilation); time the rest.
    timed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    tokens_per_second = sorted(timed)[len(timed) // 2]
    return {"size": name, "parameters": config.num_parameters(), "precision": trainer.precision,
            "tokens_per_s": tokens_per_second,
            "flops_per_s": tokens_per_second * config.training_flops_per_token(seq_len)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=6, help="training steps per measurement (first 2 untimed)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    best_peak = max(peaks.values())
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
    tokenizer = Tokenizer.train(["benchmark text"] * 10, vocab_size=300)
    results = []
    print(f"{'model':>6} {'params':>8} {'precision':>9} {'tokens/s':>10} {'GFLOP/s':>9} "
          f"{'MFU (own peak)':>15} {'MFU (best peak)':>16}")
    for size in args.sizes:
        for precision in args.precisions:
            result = measure(size, precision, args.device, args.steps, args.compile, tokenizer)
            result["mfu_own_peak"] = result["flops_per_s"] / peaks[precision]
            result["mfu_best_peak"] = result["flops_per_s"] / best_peak
            results.append(result)
            print(f"{size:>6} {result['parameters'] / 1e6:>7.1f}M {precision:>9} {result['tokens_per_s']:>10,.0f} "
                  f"{result['flops_per_s'] / 1e9:>9,.1f} {result['mfu_own_peak']:>15.1%} "
                  f"{result['mfu_best_peak']:>16.1%}", flush=True)
    if args.json:
        print(json.dumps({"peaks": peaks, "results": results}, indent=2))


if __name__ == "__main__":
    main()
