"""The GPU figures in one go (benchmarks/gpu_check.sh runs this after the CUDA tests).

    PYTHONPATH=src python benchmarks/gpu_check.py                 # on a CUDA machine, ~3 minutes
    PYTHONPATH=src python benchmarks/gpu_check.py --smoke         # the same code on the CPU, tiny sizes

It prints, for a ~124M-parameter Llama-shaped model (12 blocks of width 768, vocabulary 50,304):
- the bf16 matmul peak measured here (a large square matmul), against which MFU is computed;
- training tokens/s and MFU (bf16 autocast, torch.compile unless --no-compile, batch x 1024 tokens),
  with and without activation checkpointing, and the peak memory of each;
- `generate` tokens/s at batch 1 and 32 (greedy, KV cache).
"""

from __future__ import annotations

import argparse
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, size: int, repeats: int) -> float:
    """bf16 FLOP/s of a size x size matmul, the best of `repeats`."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def training(config, runtime, args, checkpoint_every: int) -> dict:
    from orchard.model import CausalLM

    torch.manual_seed(0)
    model = CausalLM(config).to(runtime.device).train()
    model.set_activation_checkpointing(checkpoint_every)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=runtime.device)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings = []
    for step in range(args.warmup + args.steps):
        synchronize(runtime.device)
        started = time.perf_counter()
        with runtime.autocast():
            logits = step_model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(runtime.device)
        if step >= args.warmup:
            timings.append(time.perf_counter() - started)
    tokens_per_second = args.batch * args.seq_len / (sum(timings) / len(timings))
    peak = torch.cuda.max_memory_allocated() / 2**30 if runtime.device.type == "cuda" else float("nan")
    return {"tokens_per_s": tokens_per_second,
            "flops_per_s": tokens_per_second * config.training_flops_per_token(args.seq_len), "peak_gib": peak}


def generation(config, runtime, batch: int, new_tokens: int) -> float:
    from orchard.model import CausalLM
    from orchard.model.generation import SamplingConfig, generate

    torch.manual_seed(0)
    model = CausalLM(config).to(runtime.device).eval()
    if runtime.device.type == "cuda":
        model = model.to(torch.bfloat16)  # what `orchard generate` loads on a GPU
    prompts = [[1 + i, 2, 3, 4, 5, 6, 7, 8] for i in range(batch)]
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    generate(model, prompts, sampling, eos_id=-1, pad_id=0)  # warm-up
    synchronize(runtime.device)
    started = time.perf_counter()
    outputs = generate(model, prompts, sampling, eos_id=-1, pad_id=0)
    synchronize(runtime.device)
    return sum(len(o) for o in outputs) / (time.perf_counter() - started)


def main() -> None:
    from orchard.model import ModelConfig
    from orchard.training.runtime import Runtime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the code, not the GPU")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.seq_len, args.steps, args.warmup, args.compile = 2, 64, 1, 1, False
        config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
        runtime, peak_size, new_tokens = Runtime.create("cpu", "bf16"), 256, 8
    else:
        config = ModelConfig(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)
        runtime, peak_size, new_tokens = Runtime.create("cuda", "bf16"), 8192, 256
    name = torch.cuda.get_device_name() if runtime.device.type == "cuda" else "CPU"
    peak = matmul_peak(runtime.device, peak_size, 10)
    print(f"{name}, torch {torch.__version__}; {config.num_parameters():,} parameters "
          f"({config.num_parameters(False):,} without embeddings)")
    print(f"bf16 matmul peak ({peak_size}^2): {peak / 1e12:.1f} TFLOP/s")
    print(f"training, bf16 autocast, {'compiled, ' if args.compile else ''}batch {args.batch} x {args.seq_len}:")
    for label, every in (("all activations kept", 0), ("activation checkpointing", 1)):
        result = training(config, runtime, args, every)
        print(f"  {label:<26} {result['tokens_per_s']:>10,.0f} tokens/s  MFU {result['flops_per_s'] / peak:6.1%}  "
              f"peak memory {result['peak_gib']:.2f} GiB")
    for batch in (1, 32):
        print(f"generate, greedy, batch {batch:>2}: {generation(config, runtime, batch, new_tokens):>10,.0f} tokens/s")


if __name__ == "__main__":
    main()
