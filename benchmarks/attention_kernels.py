"""Causal attention's two CPU kernels, forward and backward, timed side by side by length.

    PYTHONPATH=src python benchmarks/attention_kernels.py

For 6 heads of 64 and 2,048 tokens a batch (8 x 256, 4 x 512, ...), in bf16 and fp32, it prints
the time of one forward and backward pass through SDPA's causal kernel (the CPU's flash attention)
and through `_MatmulAttention` (matmuls around an fp32 softmax), each eagerly and compiled, and the
matmul kernel's largest difference from SDPA. `causal_attention` takes the matmul kernel where these
figures say it wins: on the CPU, bf16, compiled, with gradients, up to MATMUL_ATTENTION_MAX_LENGTH.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from orchard.model.attention import MATMUL_ATTENTION_MAX_LENGTH, _causal_bias, _MatmulAttention

HEADS, HEAD_DIM, TOKENS = 6, 64, 2048


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def matmul(q, k, v):
    return _MatmulAttention.apply(q, k, v, _causal_bias(q.size(-2), q.device))


def forward_backward_ms(function, shape, dtype, repeats: int = 10) -> float:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator).to(dtype).requires_grad_(True) for _ in range(3))
    upstream = torch.randn(shape, generator=generator).to(dtype)
    for _ in range(3):
        function(q, k, v).backward(upstream)
    started = time.perf_counter()
    for _ in range(repeats):
        function(q, k, v).backward(upstream)
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    torch._dynamo.config.recompile_limit = 64  # a compilation per shape and dtype
    compiled = {name: torch.compile(f, dynamic=False) for name, f in (("sdpa", sdpa), ("matmul", matmul))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, ms "
          f"(matmul kernel used up to T={MATMUL_ATTENTION_MAX_LENGTH}, bf16, compiled)")
    print(f"{'T':>5} {'dtype':>9} {'sdpa':>8} {'matmul':>8} {'sdpa c.':>8} {'matmul c.':>9}  max |diff|")
    for length in (128, 256, 512, 1024, 2048):
        shape = (TOKENS // length, HEADS, length, HEAD_DIM)
        for dtype in (torch.bfloat16, torch.float32):
            times = [forward_backward_ms(f, shape, dtype) for f in (sdpa, matmul, compiled["sdpa"], compiled["matmul"])]
            q, k, v = (torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3))
            difference = (sdpa(q, k, v).float() - matmul(q, k, v).float()).abs().max().item()
            print(f"{length:>5} {str(dtype)[6:]:>9} " + " ".join(f"{t:>8.1f}" for t in times) + f"  {difference:.1e}")


if __name__ == "__main__":
    main()
