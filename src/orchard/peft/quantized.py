"""The frozen base in 4-bit NF4 for QLoRA (Dettmers et al. 2023), through torchao.

Each targeted linear layer keeps its module and its name; only its `weight` becomes a torchao
`NF4Tensor` (blocks of 64 weights with an absmax scale, scales themselves quantized in blocks of
256, as in the paper), which `nn.Linear` multiplies through torchao's dispatch. LoRA adapters then
train on top in full precision, exactly as on an unquantized base.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OrchardError

BLOCK_SIZE = 64
SCALER_BLOCK_SIZE = 256


def quantize_base_nf4(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Turn the weights of the linear layers named by `target_modules` (matched as LoRA matches
    them) into frozen NF4 tensors; returns the quantized layers' names. Layers whose size is not a
    whole number of NF4 blocks stay as they are."""
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        raise OrchardError("peft.method=qlora needs torchao for 4-bit NF4 weights: pip install torchao") from None
    from .lora import target_linears

    quantized = []
    for name, linear in target_linears(model, target_modules).items():
        if linear.weight.numel() % (BLOCK_SIZE * SCALER_BLOCK_SIZE) or linear.in_features % BLOCK_SIZE:
            continue  # NF4 stores whole blocks; such a (small) layer stays in full precision
        weight = linear.weight.detach().to(torch.bfloat16)
        linear.weight = nn.Parameter(to_nf4(weight, BLOCK_SIZE, SCALER_BLOCK_SIZE), requires_grad=False)
        quantized.append(name)
    return quantized
