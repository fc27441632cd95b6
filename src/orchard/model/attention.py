"""The attention kernels the model chooses between, by device, precision and shape.

Attention over a fresh sequence (training, prefill), causal or under a mask (padding, packed
documents; boolean, or additive as `kernel_mask` makes it on the CPU), takes SDPA, except where a plain matmul kernel is faster: on the CPU, in bf16,
with gradients, for rows of at most MATMUL_ATTENTION_MAX_LENGTH tokens compiled, and of at most
MATMUL_ATTENTION_MAX_LENGTH_EAGER eagerly. There PyTorch's CPU flash-attention backward is slow:
B=8, 6 heads, T=256, D=64, causal, forward and backward, 15 ms against 7 ms for `_MatmulAttention`
compiled (they tie at T=1024, beyond it flash wins); a DPO batch of 16 padded rows of 70 tokens, 4
heads, 9 ms against 2 ms eagerly. The (B, H, T, T) scores of short rows are small, and bf16 matmuls
are what the CPU does fastest; eagerly, the kernel's elementwise passes over the scores outweigh the
gain beyond ~128 tokens. fp32 keeps SDPA, which is as fast there (`benchmarks/attention_kernels.py`).

Packed sequences: several documents side by side in one row, each token seeing only the earlier
tokens of its own document (document masking), and a padding token only itself.

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
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

PACKED_ATTENTION = ("auto", "flex", "mask")
MATMUL_ATTENTION_MAX_LENGTH = 512
MATMUL_ATTENTION_MAX_LENGTH_EAGER = 128


class _MatmulAttention(torch.autograd.Function):
    """Attention as two matmuls around a softmax taken in fp32, keeping the (B, H, T, S)
    probabilities for the backward pass, which is then four matmuls and one elementwise pass.
    `bias` (T, S) or (B|1, 1, T, S) is added to the scores: 0 where a query sees a key, -inf where
    not (every query must see at least one key)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.size(-1) ** -0.5 + bias  # (B, H, T, S)
        probabilities = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probabilities, v)                                          # (B, H, T, D)
        ctx.save_for_backward(q, k, v, probabilities, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, probabilities, out = ctx.saved_tensors
        scale = q.size(-1) ** -0.5
        grad_v = torch.matmul(probabilities.transpose(-1, -2), grad)
        grad_probabilities = torch.matmul(grad, v.transpose(-1, -2)).float()
        # Softmax's backward: p * (dp - sum_j p_j dp_j), where sum_j p_j dp_j = (grad . out) per row.
        row = (grad.float() * out.float()).sum(-1, keepdim=True)
        grad_scores = (probabilities.float() * (grad_probabilities - row) * scale).to(q.dtype)
        return torch.matmul(grad_scores, k), torch.matmul(grad_scores.transpose(-1, -2), q), grad_v, None


_CAUSAL_BIASES: dict[torch.device, torch.Tensor] = {}


def _causal_bias(length: int, device: torch.device) -> torch.Tensor:
    """(T, T) fp32: 0 where query i may see key j (j <= i), -inf above the diagonal. One table per
    device, as long as the longest row asked for, sliced: compiled, an added tensor makes a softmax
    kernel twice as fast as a mask computed from positions inside it."""
    table = _CAUSAL_BIASES.get(device)
    if table is None or table.size(0) < length:
        table = _CAUSAL_BIASES[device] = torch.full((length, length), float("-inf"), device=device).triu(1)
    return table[:length, :length]


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as the fp32 bias that attention adds to the scores: 0 where a query sees a key,
    -inf where not. The model converts a dense mask on the CPU once per forward pass, not in each
    layer: SDPA would convert a boolean mask itself in every layer, and a compiled softmax that
    builds the bias from booleans is ~1.6x slower than one that adds it (B=8, 8 heads, T=256:
    8.8 against 5.4 ms)."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


def kernel_mask(mask: torch.Tensor | BlockMask | None) -> torch.Tensor | BlockMask | None:
    """The mask of a forward pass as `attention` takes it fastest in every layer: on the CPU, for up
    to MATMUL_ATTENTION_MAX_LENGTH keys, a dense mask as its additive bias (`additive_mask`, made
    once for all layers); otherwise as given."""
    if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" and mask.size(-1) <= MATMUL_ATTENTION_MAX_LENGTH:
        return additive_mask(mask) if mask.dtype == torch.bool else mask
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of (B, H, T, D) queries over (B, H, S, D) keys and values: causal over a fresh
    sequence (S = T) when `mask` is None, else where the (B|1, 1, T, S) mask allows (boolean, or
    additive: 0 or -inf); by the fastest kernel for the device, precision and shape (see the module
    docstring)."""
    longest = MATMUL_ATTENTION_MAX_LENGTH if torch.compiler.is_compiling() else MATMUL_ATTENTION_MAX_LENGTH_EAGER
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad and k.size(-2) <= longest:
        if mask is None:
            bias = _causal_bias(q.size(-2), q.device)
        elif mask.dtype == torch.bool:
            bias = additive_mask(mask)
        else:
            bias = mask.float()  # already additive
        return _MatmulAttention.apply(q, k, v, bias)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
