"""Peak memory of one SFT training step with a large vocabulary: the output projection fused with the
loss (orchard's path, `model(..., labels=)`) beside the reference (the (N, vocab) logits, then the
cross-entropy on them in fp32).

    python benchmarks/sft_memory.py                         # vocabulary 32,768, batch 8 x 512 packed tokens
    python benchmarks/sft_memory.py --vocab 151936          # Qwen2.5's vocabulary

Each path runs in its own process (so the peak resident memory, ru_maxrss, is its own): a small
Llama (4 blocks of 512) on packed rows with 80% of the tokens supervised, bf16 autocast, forward,
backward and AdamW, twice. It prints each peak, the difference, and the size of the batch's fp32
logits that the fused path never makes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from orchard.losses.tokens import IGNORE_INDEX, token_cross_entropy
from orchard.model import CausalLM, ModelConfig


def step(path: str, vocab: int, batch: int, seq_len: int) -> dict:
    config = ModelConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq_len,
                         tie_word_embeddings=True)
    model = CausalLM(config).train()
    model.reset_parameters(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
        labels = ids[:, 1:].clone()
        labels[:, : seq_len // 5] = IGNORE_INDEX  # the prompts
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if path == "fused":
                loss = model(ids[:, :-1], labels=labels).loss
            else:
                loss = token_cross_entropy(model(ids[:, :-1]).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"path": path, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--worker", choices=["fused", "logits"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(step(args.worker, args.vocab, args.batch, args.seq_len)))
        return
    peaks = {}
    for path in ("logits", "fused"):
        out = subprocess.run([sys.executable, __file__, "--worker", path, "--vocab", str(args.vocab), "--batch",
                              str(args.batch), "--seq-len", str(args.seq_len)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{path} failed: {out.stderr.strip().splitlines()[-1]}")
        peaks[path] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    logits = args.batch * args.seq_len * args.vocab * 4
    print(f"one SFT step, vocabulary {args.vocab:,}, batch {args.batch} x {args.seq_len}, bf16 autocast; peak resident:")
    print(f"  logits, then the loss    {peaks['logits'] / 2**20:>8,.0f} MiB")
    print(f"  fused head and loss      {peaks['fused'] / 2**20:>8,.0f} MiB")
    print(f"  saved                    {(peaks['logits'] - peaks['fused']) / 2**20:>8,.0f} MiB "
          f"(the batch's fp32 logits: {logits / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
