"""Activation checkpointing: peak memory and step time of one training step with and without it.

    python benchmarks/activation_checkpointing.py                     # CPU: peak resident memory
    python benchmarks/activation_checkpointing.py --device cuda       # GPU: torch.cuda.max_memory_allocated

Each setting (every block recomputed, every 2nd, none) runs in a fresh process, so the CPU's peak
resident set size (ru_maxrss) is that setting's own. The model is Llama-shaped (default 8 blocks of
width 512, fp32 weights, bf16 autocast where the device has fast bf16), batch 2 x 2048 tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one_setting(args) -> dict:
    from orchard.model import CausalLM, ModelConfig
    from orchard.training.runtime import Runtime

    runtime = Runtime.create(args.device, "auto")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=8192, hidden_size=args.width, intermediate_size=args.width * 8 // 3 // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                         num_key_value_heads=args.width // 128, max_position_embeddings=args.seq_len)
    model = CausalLM(config).to(runtime.device).train()
    model.set_activation_checkpointing(args.every)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=runtime.device)
    timings = []
    for _ in range(args.steps):
        started = time.perf_counter()
        with runtime.autocast():
            logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    if runtime.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"every": args.every, "peak_mib": peak, "seconds_per_step": min(timings),
            "tokens_per_s": args.batch * args.seq_len / min(timings), "precision": runtime.precision,
            "device": str(runtime.device), "parameters": model.num_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting (the fastest is reported)")
    parser.add_argument("--every", type=int, default=None, help=argparse.SUPPRESS)  # one setting, in a child
    args = parser.parse_args()
    if args.every is not None:
        print(json.dumps(one_setting(args)))
        return
    rows = []
    for every in (0, 2, 1):
        child = [sys.executable, __file__, *sys.argv[1:], "--every", str(every)]
        rows.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
    first = rows[0]
    memory = "GPU max_memory_allocated" if first["device"].startswith("cuda") else "peak resident memory"
    print(f"{first['parameters']:,} parameters, batch {args.batch} x {args.seq_len} tokens, {first['precision']}, "
          f"{first['device']}; {memory}")
    print(f"{'recomputed blocks':<22}{'peak MiB':>10}{'s/step':>9}{'tokens/s':>10}")
    for row in rows:
        label = {0: "none", 1: "every block"}.get(row["every"], f"every {row['every']}nd block")
        print(f"{label:<22}{row['peak_mib']:>10,.0f}{row['seconds_per_step']:>9.2f}{row['tokens_per_s']:>10,.0f}")


if __name__ == "__main__":
    main()
