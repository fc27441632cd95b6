"""Attention over packed sequences: several documents side by side in one row, each token seeing
only the earlier tokens of its own document (document masking), and a padding token only itself.

A packed batch carries `document_ids` (B, T): the document each token belongs to, -1 at padding.
From them the model builds one of two equivalent attentions (equal within 1e-5 in fp32, tested):

- `mask`: a dense boolean (B, 1, T, T) mask for `scaled_dot_product_attention`. It costs T x T
  booleans per row, and rules out the memory-efficient SDPA kernels. On the CPU it is the fastest
  (`benchmarks/packed_attention.py`, B=2, 8 heads, T=512: 5.3 ms, against 9.3 ms for compiled
  FlexAttention and 39 ms eager), so `auto` keeps it there.
- `flex`: FlexAttention with a block mask: per row (T/128)^2 block flags instead of T^2 booleans;
  blocks no query may see are skipped, not computed and thrown away; grouped-query attention is
  native (keys and values are not repeated per query head). On CUDA it runs compiled (one fused
  kernel) and `auto` chooses it.

Why FlexAttention rather than a variable-length kernel (flash-attention's varlen): it keeps the
(B, H, T, D) layout of the rest of the model (no flattening of rows into one sequence), padding and
grouped-query attention are part of its mask function, it is PyTorch's own (as torchtitan uses it
for document masking), and it also runs, slowly and eagerly, on the CPU, which is how it is checked
against the dense path here.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

PACKED_ATTENTION = ("auto", "flex", "mask")


def uses_flex(choice: str, device: torch.device) -> bool:
    """Whether packed sequences on `device` take FlexAttention: `flex`, or `auto` on CUDA."""
    if choice not in PACKED_ATTENTION:
        raise ValueError(f"packed attention: expected one of {', '.join(PACKED_ATTENTION)}, got {choice!r}")
    return choice == "flex" or (choice == "auto" and device.type == "cuda")


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The dense (B, 1, T, T) boolean mask: query i sees key j iff both are of the same document and
    j <= i; a padding token (document -1) sees only itself."""
    T = document_ids.size(1)
    index = torch.arange(T, device=document_ids.device)
    same = (document_ids[:, :, None] == document_ids[:, None, :]) & (document_ids[:, :, None] >= 0)
    causal = index[None, :] <= index[:, None]
    return ((same & causal) | torch.eye(T, dtype=torch.bool, device=document_ids.device))[:, None]


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """The same attention as `document_mask`, as FlexAttention's block mask."""
    B, T = document_ids.shape

    def visible(b, h, q, k):
        same = (document_ids[b, q] == document_ids[b, k]) & (document_ids[b, q] >= 0) & (k <= q)
        return same | (q == k)

    # Compiled, the mask function is evaluated block by block rather than as a whole (B, T, T) tensor.
    return create_block_mask(visible, B, None, T, T, device=document_ids.device,
                             _compile=document_ids.device.type == "cuda")


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention of (B, H, T, D) queries over (B, K, T, D) keys and values (K divides H):
    compiled on CUDA; eagerly elsewhere, where it is a slow reference (see the module docstring)."""
    gqa = k.size(1) != q.size(1)
    if q.device.type == "cuda":
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
