"""Weight-only quantization of a trained model's decoder linear layers, for inference: int8 or int4.

Only the weights of the q/k/v/o and gate/up/down projections are quantized; activations, embeddings,
norms and the lm_head (tied to the embeddings in orchard's small models) stay as they are. Two schemes:

    int8   symmetric, one scale per output row:   scale = absmax(row) / 127
           q = round(w / scale) clamped to [-128, 127]          w ~ q * scale
    int4   asymmetric, per group of G input columns (tinygemm's convention, G = 32 by default):
           scale = (max - min) / 15,  zero = min + 8 * scale,  q = round((w - min) / scale) in [0, 15]
           w ~ (q - 8) * scale + zero
           (scale and zero are stored in bfloat16, and the codes are chosen against the rounded
           values, so every weight within the group's range is within scale / 2 of its value)

An int4 layer whose in_features K is not a multiple of G is stored padded to K' = K rounded up to a
multiple of G (orchard's default MLP width, 688, is a multiple of 16 but not of 32, so every down_proj
would otherwise have to stay unquantized with groups of 32, the only size of those two that the CPU
kernel takes). The padding columns hold the codes nearest to a zero weight, but are left out of their
group's range (so they do not coarsen its grid) and never reach the output: the kernel's input is
padded with zeros, and the dequantized weight is cut back to K columns. K' is not written anywhere
else: it follows from config.json's K and quantization.json's G, and loading checks the tensors'
shapes below against it.

On disk (a quantized checkpoint's `model.safetensors`) each quantized layer `<name>` holds, instead of
`<name>.weight` (out_features N, in_features K; K' = K for int8 and for int4 with whole groups):

    <name>.qweight   int8 (N, K), or for int4 uint8 (N, K'/2): two codes per byte, column 2j in the
                     low nibble and column 2j+1 in the high one
    <name>.scales    int8: float32 (N,); int4: bfloat16 (K'/G, N)
    <name>.zeros     int4 only: bfloat16 (K'/G, N)
    <name>.bias      unchanged, when the layer has one

and `quantization.json` lists the layers (see `orchard.checkpoint`). Why orchard's own format rather
than torchao's: torchao's quantized tensors serialise only through pickle, and none of its int4
layouts runs on a CPU without extra packages; plain tensors in safetensors load anywhere, memory-mapped.

The arithmetic is PyTorch's own fused weight-only kernels, the ones torchao dispatches to:
`_weight_int8pack_mm` and, from a layout converted once at load time, `_weight_int4pack_mm_for_cpu`.
Both take bfloat16 activations (the int8 kernel has a float32 path, but measured here it is 8 times
slower than a float32 matmul for one row and 30 times for 16), so a layer on the kernel path rounds its
input to bfloat16 and returns its output in the input's dtype. On the CPU a layer may hold its codes
twice: the file's (memory-mapped after loading, so pages the OS may drop) and the kernel's copy (int4's
own layout; for int8, a copy where the file's tensor is not aligned as the kernel needs). Where no kernel applies (another device, shapes the kernel does not
take, gradients wanted with respect to the input) a layer dequantizes its weight and multiplies it
in the input's dtype, which works on every device. Quantized layers hold buffers, not parameters:
they are not trained.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OrchardError

BITS = (8, 4)
DEFAULT_GROUP_SIZE = 32
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes the CPU int4 kernel takes; others work through dequantization."""
CLIP_SHRINK_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8)
"""With `minimize_error`, each int4 group's range [min, max] is also tried shrunk by these factors
(the weights outside it clipped), keeping the one with the least squared reconstruction error."""
MINIMIZE_ERROR_DEFAULT = False
"""Off: measured on orchard's quickstart and Tiny Shakespeare models over their whole held-out
splits, clipping lowers the int4 weights' squared error by 5-10% (groups of 32) to 10-13% (128), but
the perplexity increase with groups of 32 went from +0.08% to +0.15% (quickstart) and from +0.21% to
+0.18% (Shakespeare), and with groups of 128 it grew on both (+0.16% to +0.25%, +0.46% to +0.61%):
the squared weight error is not what the model's outputs care about."""
QUANTIZATION_TENSORS = ("qweight", "scales", "zeros")
"""A quantized layer's own tensors, which keep their dtype whatever the model is cast to."""
SCHEMES = {8: "int8-symmetric-per-channel", 4: "int4-asymmetric-grouped"}


# --- the pure functions ------------------------------------------------------------------------


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): int8 (N, K) codes and float32 (N,) scales, one per output row."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def dequantize_weight_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> uint8 (N, K/2): column 2j in the low nibble, 2j+1 in the high one."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 (N, K) codes; the inverse of `pack_int4`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _int4_grid(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16-representable (scale, zero) of the 16-level grid spanning [low, high], as float32."""
    scale = ((high - low).clamp(min=1e-8) / 15).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    return scale, zero


def _int4_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The nearest grid level of every weight. Computed from the stored (rounded) scale and zero, so
    the codes are the best ones for the grid that dequantization actually uses."""
    base = zero - 8 * scale
    return torch.clamp(torch.round((groups - base[..., None]) / scale[..., None]), 0, 15)


def padded_in_features(in_features: int, group_size: int | None) -> int:
    """K rounded up to whole groups: the number of input columns an int4 layer stores."""
    return in_features if not group_size else -(-in_features // group_size) * group_size


def quantize_weight_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                         minimize_error: bool = MINIMIZE_ERROR_DEFAULT
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, scales, zeros): uint8 (N, K'/2) codes, bfloat16 (K'/G, N) scales and zeros, where K'
    is K padded to whole groups (`padded_in_features`) with zero weights.

    Without `minimize_error` each group's grid spans its [min, max], so no weight is off by more than
    half a step (plus the bfloat16 rounding of the grid's ends); with it, shrunk ranges are tried too
    (CLIP_SHRINK_FACTORS) and each group keeps its least squared error. Padding columns count in
    neither the range nor the error: they multiply inputs that are always zero."""
    N, K = weight.shape
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")
    padded = padded_in_features(K, group_size)
    groups = F.pad(weight.detach().float(), (0, padded - K)).reshape(N, padded // group_size, group_size)
    real = (torch.arange(padded, device=weight.device) < K).reshape(padded // group_size, group_size)  # (K'/G, G)
    low = groups.masked_fill(~real, math.inf).amin(-1)                            # (N, K'/G)
    high = groups.masked_fill(~real, -math.inf).amax(-1)
    best_scale, best_zero = _int4_grid(low, high)
    best_codes = _int4_codes(groups, best_scale, best_zero)
    if minimize_error:
        best_error = ((((best_codes - 8) * best_scale[..., None] + best_zero[..., None] - groups) * real) ** 2
                      ).sum(-1)
        for factor in CLIP_SHRINK_FACTORS:
            if factor == 1.0:
                continue
            scale, zero = _int4_grid(low * factor, high * factor)
            codes = _int4_codes(groups, scale, zero)
            error = ((((codes - 8) * scale[..., None] + zero[..., None] - groups) * real) ** 2).sum(-1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_codes = torch.where(better[..., None], codes, best_codes)
    packed = pack_int4(best_codes.reshape(N, padded))
    return packed, best_scale.t().contiguous().to(torch.bfloat16), best_zero.t().contiguous().to(torch.bfloat16)


def dequantize_weight_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                           dtype: torch.dtype = torch.float32, in_features: int | None = None) -> torch.Tensor:
    """(N, K) weights from `quantize_weight_int4`'s output: its first `in_features` columns (all K'
    of them when None)."""
    codes = unpack_int4(packed).float()
    N, padded = codes.shape
    groups = codes.reshape(N, padded // group_size, group_size)
    weight = (groups - 8) * scales.float().t()[..., None] + zeros.float().t()[..., None]
    return weight.reshape(N, padded)[:, :in_features].to(dtype)


# --- the kernels -----------------------------------------------------------------------------


def int4_kernel_supported(out_features: int, group_size: int) -> bool:
    """Whether `_weight_int4pack_mm_for_cpu` takes this shape: one of its group sizes, and
    out_features a multiple of 16 (its weight conversion's requirement). The stored input columns are
    whole groups by construction (padded)."""
    return group_size in KERNEL_GROUP_SIZES and out_features % 16 == 0


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it at an address that is a multiple of 64 bytes (the CPU allocator's
    alignment). PyTorch 2.13's `_weight_int8pack_mm` crashes (segfault) on a weight or an input that is
    not 16-byte aligned, as a memory-mapped safetensors weight or a slice of a larger tensor may be."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


@functools.cache
def _kernel_agrees(bits: int) -> bool:
    """Once per process: does this PyTorch's CPU kernel compute what the format means? (Guards
    against a build without it, or a version that changes its convention.)"""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator)
    x = torch.randn(3, 64, generator=generator)
    layer = QuantizedLinear.from_linear_weight(weight, None, bits, 32)
    try:
        kernel = layer._build_kernel()
        if kernel is None:
            return False
        expected = F.linear(x.bfloat16().float(), layer.dequantized_weight())
        actual = layer._kernel_forward(x, kernel).float()
    except (RuntimeError, NotImplementedError):
        return False
    return bool((actual - expected).abs().max() <= 0.02 * expected.abs().max())


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is int8 (per output row) or int4 (per group of input columns).

    Holds buffers only (`qweight`, `scales`, `zeros` for int4, and `bias` when the layer has one);
    see the module docstring for the layout. `in_features` is the true K, `padded_in_features` the
    columns stored (K rounded up to whole int4 groups). `use_kernel = False` forces the dequantizing
    path."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = False, device: torch.device | str | None = None):
        super().__init__()
        if bits not in BITS:
            raise OrchardError(f"bits: must be 8 or 4, got {bits}")
        if bits == 4 and not group_size:
            raise OrchardError("group_size: int4 needs one")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size if bits == 4 else None
        self.padded_in_features = padded_in_features(in_features, self.group_size)
        self.use_kernel = True
        self._kernel: tuple | None = None      # operands of the CPU kernel, built when first needed
        self._kernel_unsupported = False
        if bits == 8:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
            self.register_buffer("zeros", None)
        else:
            padded = self.padded_in_features
            self.register_buffer("qweight", torch.empty(out_features, padded // 2, dtype=torch.uint8, device=device))
            shape = (padded // group_size, out_features)
            self.register_buffer("scales", torch.empty(shape, dtype=torch.bfloat16, device=device))
            self.register_buffer("zeros", torch.empty(shape, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def from_linear_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
                           group_size: int | None = DEFAULT_GROUP_SIZE,
                           minimize_error: bool = MINIMIZE_ERROR_DEFAULT) -> QuantizedLinear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bits, group_size, bias is not None, device="meta")
        if bits == 8:
            layer.qweight, layer.scales = quantize_weight_int8(weight)
        else:
            layer.qweight, layer.scales, layer.zeros = quantize_weight_int4(weight, group_size, minimize_error)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = DEFAULT_GROUP_SIZE,
                    minimize_error: bool = MINIMIZE_ERROR_DEFAULT) -> QuantizedLinear:
        return cls.from_linear_weight(linear.weight, linear.bias, bits, group_size, minimize_error)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out_features, in_features) weight the codes stand for."""
        if self.bits == 8:
            return dequantize_weight_int8(self.qweight, self.scales, dtype)
        return dequantize_weight_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype, self.in_features)

    def kernel_supported(self) -> bool:
        """Whether this layer can use PyTorch's fused CPU kernel (once its buffers are on the CPU)."""
        if self.bits == 4 and not int4_kernel_supported(self.out_features, self.group_size):
            return False
        return _kernel_agrees(self.bits)

    def prepare(self) -> bool:
        """Build the CPU kernel's operands now (loading does, so the first token is not slower);
        returns whether this layer will use the kernel on its current device."""
        if not (self.use_kernel and self.qweight.device.type == "cpu"):
            return False
        if self._kernel is None and not self._kernel_unsupported:
            self._kernel = self._build_kernel() if self.kernel_supported() else None
            self._kernel_unsupported = self._kernel is None
        return self._kernel is not None

    def _build_kernel(self) -> tuple | None:
        try:
            if self.bits == 8:
                return (_aligned(self.qweight.contiguous()), _aligned(self.scales.to(torch.bfloat16)))
            codes = unpack_int4(self.qweight).to(torch.int32)
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            scales_and_zeros = torch.stack([self.scales, self.zeros], dim=-1).to(torch.bfloat16).contiguous()
            return (packed, scales_and_zeros)
        except (RuntimeError, NotImplementedError, AttributeError):
            return None  # a PyTorch without the kernel, or a shape it refuses: dequantize instead

    def _kernel_forward(self, x: torch.Tensor, kernel: tuple) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.padded_in_features != self.in_features:
            # Zero inputs for the padding columns, whatever their codes dequantize to.
            x2d = F.pad(x2d, (0, self.padded_in_features - self.in_features))
        x2d = _aligned(x2d.contiguous())
        if self.bits == 8:
            weight, scales = kernel
            return torch._weight_int8pack_mm(x2d, weight, scales)
        packed, scales_and_zeros = kernel
        return torch._weight_int4pack_mm_for_cpu(x2d, packed, self.group_size, scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_cpu = x.device.type == "cpu"
        if self._kernel is None and on_cpu:
            self.prepare()
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        # The kernels have no backward: an input that needs gradients takes the dequantizing path.
        if (self._kernel is not None and self.use_kernel and on_cpu and x.numel()
                and not (x.requires_grad and torch.is_grad_enabled())):
            out = self._kernel_forward(x, self._kernel).to(dtype).view(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias.to(dtype)
        weight = self.dequantized_weight(dtype)
        return F.linear(x.to(dtype), weight, None if self.bias is None else self.bias.to(dtype))

    def _apply(self, fn, recurse=True):
        # Casting the model (`.float()`, `.to(torch.bfloat16)`) must not cast the scales and zeros,
        # whose dtype is part of the format: they go through `fn` viewed as integers, which only
        # moves them. The kernel's operands are rebuilt on the new device when needed.
        integer = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
        kept = {name: self._buffers[name].dtype for name in ("scales", "zeros")
                if self._buffers.get(name) is not None and self._buffers[name].dtype in integer}
        for name, dtype in kept.items():
            self._buffers[name] = self._buffers[name].view(integer[dtype])
        try:
            super()._apply(fn, recurse)
        finally:
            for name, dtype in kept.items():
                self._buffers[name] = self._buffers[name].view(dtype)
        self._kernel, self._kernel_unsupported = None, False
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel, self._kernel_unsupported = None, False

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        if self.padded_in_features != self.in_features:
            group += f" (stored padded to {self.padded_in_features} inputs)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}, "
                f"bias={self.bias is not None}")


# --- whole models ------------------------------------------------------------------------------


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder's projection layers (plain or quantized) by full module name
    (`model.layers.0.self_attn.q_proj`, ...): what `quantize_model` may quantize."""
    found = {}
    for index, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, QuantizedLinear)):
                found[f"model.layers.{index}.{name}"] = module
    return found


def check_quantization_settings(bits: int, group_size: int | None) -> int | None:
    """The group size to use (None for int8), or a one-line error naming what is wrong."""
    if bits not in BITS:
        raise OrchardError(f"bits: must be 8 or 4, got {bits}")
    if bits == 8:
        if group_size is not None:
            raise OrchardError("group_size: int8 has one scale per output row; a group size applies to 4 bits")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise OrchardError(f"group_size: must be a power of two of at least 16 (32, 64, 128 and 256 use the "
                           f"fused CPU kernel), got {group_size}")
    return group_size


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int | None = DEFAULT_GROUP_SIZE,
                   minimize_error: bool = MINIMIZE_ERROR_DEFAULT) -> list[str]:
    """Replace the decoder's linear layers by QuantizedLinear ones, in place; returns their names
    (all of them but those already quantized). `group_size` is ignored for int8."""
    group_size = check_quantization_settings(bits, group_size if bits == 4 else None)
    quantized = []
    for name, module in decoder_linears(model).items():
        if not isinstance(module, nn.Linear):
            continue  # already quantized
        if module._modules or module._forward_hooks or module._forward_pre_hooks:
            raise OrchardError(f"{name}: has adapters attached; merge them into the weights before quantizing")
        _replace(model, name, QuantizedLinear.from_linear(module, bits, group_size, minimize_error))
        quantized.append(name)
    return quantized


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def quantization_settings(model: nn.Module) -> dict | None:
    """What `quantization.json` says about `model`, or None when nothing in it is quantized."""
    layers = quantized_layers(model)
    if not layers:
        return None
    kinds = {(layer.bits, layer.group_size) for layer in layers.values()}
    if len(kinds) > 1:
        raise OrchardError(f"the model mixes quantization settings {sorted(kinds, key=str)}; one is supported")
    ((bits, group_size),) = kinds
    return {"bits": bits, "group_size": group_size, "scheme": SCHEMES[bits], "modules": list(layers)}


def apply_quantization_layout(model: nn.Module, settings: dict, where: str = "quantization.json",
                              device: torch.device | str = "meta") -> None:
    """Swap empty QuantizedLinear layers in for the layers `settings` (a quantization.json) names,
    ready for the checkpoint's tensors to be loaded into them."""
    bits, modules = settings.get("bits"), settings.get("modules")
    try:
        group_size = check_quantization_settings(bits, settings.get("group_size"))
    except (OrchardError, TypeError) as error:
        raise OrchardError(f"{where}: {error}") from None
    if not isinstance(modules, list) or not all(isinstance(name, str) for name in modules):
        raise OrchardError(f"{where}: modules: expected a list of layer names")
    linears = decoder_linears(model)
    for name in modules:
        module = linears.get(name)
        if not isinstance(module, nn.Linear):
            raise OrchardError(f"{where}: {name} is not a linear layer of this model")
        _replace(model, name, QuantizedLinear(module.in_features, module.out_features, bits, group_size,
                                              module.bias is not None, device=device))


def prepare_quantized(model: nn.Module) -> int:
    """Build every quantized layer's kernel operands for its device; returns how many use a kernel."""
    return sum(layer.prepare() for layer in quantized_layers(model).values())


def quantization_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names of the quantized layers' own tensors (codes, scales, zeros), whose dtype a
    load must leave alone."""
    return {f"{name}.{tensor}" for name, layer in quantized_layers(model).items()
            for tensor in QUANTIZATION_TENSORS if getattr(layer, tensor, None) is not None}
