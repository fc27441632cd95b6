"""Attention over packed documents, the two paths of `orchard.model.attention`, timed side by side.

    PYTHONPATH=src python benchmarks/packed_attention.py            # the CPU (or the GPU when there is one)

For one attention call (batch 2, 8 query and 4 key/value heads of 64, 512 tokens in 6 documents per
row, the last 20 tokens padding) it prints the time of SDPA with the dense (T x T) mask, FlexAttention
eagerly and FlexAttention compiled, and how far each is from the dense result. `auto` takes the
dense mask on the CPU and compiled FlexAttention on CUDA; these figures are why.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from orchard.model.attention import document_block_mask, document_mask


def timed(function, repeats: int, device: torch.device) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, H, K, T, D = 2, 8, 4, 512, 64
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, generator=generator).to(device) for n in (H, K, K))
    documents = torch.full((B, T), -1, dtype=torch.long)
    for row in range(B):
        cuts = sorted(torch.randint(1, T - 20, (5,), generator=generator).tolist())
        for document, (start, end) in enumerate(zip([0, *cuts], [*cuts, T - 20])):
            documents[row, start:end] = document
    documents = documents.to(device)
    dense, block = document_mask(documents), document_block_mask(documents)
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1),
                                               attn_mask=dense)
    compiled = torch.compile(flex_attention, dynamic=False)
    paths = {
        "SDPA, dense mask": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1), attn_mask=dense),
        "FlexAttention, eager": lambda: flex_attention(q, k, v, block_mask=block, enable_gqa=True),
        "FlexAttention, compiled": lambda: compiled(q, k, v, block_mask=block, enable_gqa=True),
    }
    print(f"{device.type}, torch {torch.__version__}: attention of {B} x {T} tokens, {H} heads ({K} key/value) of {D}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        for name, function in paths.items():
            seconds = timed(function, 5, device)
            difference = (function() - reference).abs().max().item()
            print(f"  {name:<24} {seconds * 1e3:8.2f} ms   max difference from the dense path {difference:.1e}")


if __name__ == "__main__":
    main()
