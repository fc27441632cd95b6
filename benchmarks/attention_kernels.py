"""Attention's two CPU kernels, forward and backward, timed side by side by length.

    PYTHONPATH=src python benchmarks/attention_kernels.py

Causal, for 6 heads of 64 and 2,048 tokens a batch (8 x 256, 4 x 512, ...), and masked, for a DPO
batch (16 rows of 70 tokens, the last 10 padding, 4 heads), in bf16 and fp32, it prints the time of
one forward and backward pass through SDPA (the CPU's flash attention) and through
`_MatmulAttention` (matmuls around an fp32 softmax), each eagerly and compiled, and the matmul
kernel's largest difference from SDPA. `attention` takes the matmul kernel where these figures say it
wins: on the CPU, bf16, with gradients, up to MATMUL_ATTENTION_MAX_LENGTH tokens compiled and
MATMUL_ATTENTION_MAX_LENGTH_EAGER eagerly.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from orchard.model.attention import (MATMUL_ATTENTION_MAX_LENGTH, MATMUL_ATTENTION_MAX_LENGTH_EAGER, _causal_bias,
                                     _MatmulAttention)

HEADS, HEAD_DIM, TOKENS = 6, 64, 2048


def kernels(mask: torch.Tensor | None):
    """SDPA and the matmul kernel, causal (mask None) or under the boolean mask."""
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)

    def matmul(q, k, v):
        bias = _causal_bias(q.size(-2), q.device) if mask is None else \
            torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        return _MatmulAttention.apply(q, k, v, bias)
    return sdpa, matmul


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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, ms (the model "
          f"takes the matmul kernel in bf16 up to T={MATMUL_ATTENTION_MAX_LENGTH} compiled, "
          f"T={MATMUL_ATTENTION_MAX_LENGTH_EAGER} eagerly)")
    print(f"{'rows':>12} {'dtype':>9} {'sdpa':>8} {'matmul':>8} {'sdpa c.':>8} {'matmul c.':>9}  max |diff|")
    padded = torch.ones(16, 70, dtype=torch.bool)
    padded[:, -10:] = False
    dpo_mask = (torch.ones(70, 70, dtype=torch.bool).tril() & padded[:, None, :]) | torch.eye(70, dtype=torch.bool)
    cases = [(f"{TOKENS // t} x {t}", (TOKENS // t, HEADS, t, HEAD_DIM), None) for t in (128, 256, 512, 1024, 2048)]
    cases.append(("16 x 70 pad", (16, 4, 70, HEAD_DIM), dpo_mask[:, None]))
    for label, shape, mask in cases:
        sdpa, matmul = kernels(mask)
        compiled = [torch.compile(f, dynamic=False) for f in (sdpa, matmul)]
        for dtype in (torch.bfloat16, torch.float32):
            times = [forward_backward_ms(f, shape, dtype) for f in (sdpa, matmul, *compiled)]
            q, k, v = (torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3))
            difference = (sdpa(q, k, v).float() - matmul(q, k, v).float()).abs().max().item()
            print(f"{label:>12} {str(dtype)[6:]:>9} " + " ".join(f"{t:>8.1f}" for t in times) + f"  {difference:.1e}")


if __name__ == "__main__":
    main()
