"""The GPU figures in one go (benchmarks/gpu_check.sh runs this after the CUDA tests).

    PYTHONPATH=src python benchmarks/gpu_check.py                 # on a CUDA machine, ~3 minutes
    PYTHONPATH=src python benchmarks/gpu_check.py --smoke         # the same code on the CPU, tiny sizes

It prints, for a ~124M-parameter Llama-shaped model (12 blocks of width 768, vocabulary 50,304):
- the bf16 matmul peak measured here (a large square matmul), against which MFU is computed;
- training tokens/s and MFU (bf16 autocast, torch.compile unless --no-compile, batch x 1024 tokens),
  with and without activation checkpointing, and the peak memory of each;
- packed sequences (documents of random lengths side by side, as packed SFT batches are): the
  FlexAttention block-mask path against the dense-mask reference, equal logits (and, on a GPU,
  gradients) in fp32, and each one's training step time and peak memory in bf16;
- `generate` tokens/s at batch 1 and 32 (greedy, KV cache).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

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
            loss = step_model(ids[:, :-1], labels=ids[:, 1:]).loss / ids[:, 1:].numel()  # the fused head and loss
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


def packed_batch(config, batch: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows of documents of random lengths (16 to seq_len / 2 tokens), the last 5% of each row padding."""
    generator = torch.Generator().manual_seed(0)
    documents = torch.full((batch, seq_len), -1, dtype=torch.long)
    positions = torch.zeros((batch, seq_len), dtype=torch.long)
    for row in range(batch):
        start, document, end = 0, 0, seq_len - seq_len // 20
        while start < end:
            length = min(int(torch.randint(16, seq_len // 2, (1,), generator=generator)), end - start)
            documents[row, start:start + length] = document
            positions[row, start:start + length] = torch.arange(length)
            start, document = start + length, document + 1
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=generator)
    return {name: tensor.to(device) for name, tensor in
            {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": positions, "document_ids": documents}.items()}


def packed_attention(config, runtime, batch: int, seq_len: int, steps: int) -> None:
    """FlexAttention against the dense mask on packed rows: equality in fp32, then speed and memory in bf16."""
    from orchard.model import CausalLM

    torch.manual_seed(0)
    model = CausalLM(config).to(runtime.device)
    data = packed_batch(config, batch, seq_len, runtime.device)
    backward = runtime.device.type == "cuda"  # FlexAttention has no backward pass on the CPU

    def step(choice: str, autocast) -> tuple[torch.Tensor, dict]:
        model.packed_attention = choice
        model.zero_grad(set_to_none=True)
        with autocast, torch.set_grad_enabled(backward):
            logits = model(data["input_ids"], position_ids=data["position_ids"], document_ids=data["document_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), data["labels"].flatten())
        if backward:
            loss.backward()
        return logits.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (mask_logits, mask_grads), (flex_logits, flex_grads) = step("mask", nullcontext()), step("flex", nullcontext())
    difference = (mask_logits - flex_logits).abs().max().item()
    gradients = max(((mask_grads[n] - flex_grads[n]).abs().max().item() for n in mask_grads), default=float("nan"))
    print(f"packed attention, {batch} x {seq_len} tokens in documents of 16-{seq_len // 2}: flex vs dense mask "
          f"(fp32) logits differ by {difference:.2e}, gradients by {gradients:.2e} "
          f"({'equal' if difference <= 1e-5 and not gradients > 1e-5 else 'NOT EQUAL'} within 1e-5)")
    for choice in ("mask", "flex"):
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timings = []
        for _ in range(steps + 2):
            synchronize(runtime.device)
            started = time.perf_counter()
            step(choice, runtime.autocast())
            synchronize(runtime.device)
            timings.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() / 2**30 if runtime.device.type == "cuda" else float("nan")
        best = min(timings[2:])
        print(f"  {choice:<5} bf16 {'forward+backward' if backward else 'forward'}: {best * 1e3:8.1f} ms  "
              f"{batch * seq_len / best:>10,.0f} tokens/s  peak memory {peak:.2f} GiB")


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
    if args.smoke:
        packed_attention(config, runtime, 2, 128, 1)
    else:
        packed_attention(config, runtime, 8, 4096, 5)
    for batch in (1, 32):
        print(f"generate, greedy, batch {batch:>2}: {generation(config, runtime, batch, new_tokens):>10,.0f} tokens/s")


if __name__ == "__main__":
    main()
