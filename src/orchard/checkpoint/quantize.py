"""Post-training weight-only quantization of a checkpoint: int8 or int4 codes for the decoder's linear
layers, written as a new checkpoint that eval, generate and chat load as any other.

`orchard quantize` is a thin wrapper around `quantize_checkpoint`, so the quickstart and the
benchmarks make exactly what the command makes. The arithmetic and the format are
`orchard.model.quantization`'s; this module adds what a checkpoint needs around them: where the
result goes, its lineage record, and not redoing a quantization that is already on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OrchardError
from ..files import check_output
from ..lineage import new_record
from ..lineage.record import made_from, parent_entry
from ..model import CausalLM
from ..model.quantization import (MINIMIZE_ERROR_DEFAULT, SCHEMES, check_quantization_settings, decoder_linears,
                                 quantize_model)
from .layout import (WEIGHTS_FILE, inference_only_error, is_quantized_checkpoint, loaded_paths, output_beside,
                     read_model_config, read_quantization, read_record, resolve_checkpoint, weights_files)
from .load import load_merged
from .save import model_state_dict, save_checkpoint


@dataclass
class QuantizeResult:
    """What `quantize_checkpoint` made (or found already made: `reused`)."""

    path: Path
    quantized: list[str]
    """Names of the layers holding codes (`model.layers.0.self_attn.q_proj`, ...)."""
    skipped: list[str]
    """Decoder linear layers left as they were (none, as `quantize_model` stands)."""
    size_before: int
    """Bytes of the source's weights files (of its tensors, for an adapter checkpoint merged here)."""
    size_after: int
    """Bytes of the quantized checkpoint's model.safetensors."""
    bits: int
    group_size: int | None
    reused: bool = False

    def summary(self) -> str:
        """The one line `orchard quantize` prints."""
        kind = "int8" if self.bits == 8 else f"int4 (groups of {self.group_size})"
        total = len(self.quantized) + len(self.skipped)
        again = " (already there from the same weights and settings: not redone)" if self.reused else ""
        return (f"{self.path}: {len(self.quantized)} of {total} linear layers to {kind}; "
                f"weights {format_size(self.size_before)} -> {format_size(self.size_after)}{again}")


def format_size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def quantize_checkpoint(source: str | Path, out: str | Path | None, bits: int, group_size: int | None = None,
                        minimize_error: bool | None = None, force: bool = False,
                        device: str | torch.device = "cpu") -> QuantizeResult:
    """Quantize `source` (a checkpoint or run directory, a Hugging Face directory or Hub id; an adapter
    checkpoint is merged into its base first) into the checkpoint directory `out`.

    `out=None` writes beside the source, named `NAME-int8` or `NAME-int4-g32` (into the working
    directory for a Hub id, not into the Hugging Face cache). `group_size=None` is 32 for int4 and
    must stay None for int8; `minimize_error=None` is `MINIMIZE_ERROR_DEFAULT` (int4 only). When `out`
    already holds what this call would write (its record names the same parent weights and recipe),
    it is returned as it is: re-running a pipeline reads two records instead of quantizing. Any other
    existing `out` is replaced only when it is an earlier quantization of the same source (or with
    `force`). Bad values
    are one-line errors naming the `orchard quantize` flag they come from."""
    try:
        group_size = check_quantization_settings(bits, group_size)
    except OrchardError as error:
        raise OrchardError("--" + str(error).replace("group_size", "group-size", 1)) from None
    if bits == 8 and minimize_error is not None:
        raise OrchardError("--minimize-error: applies to --bits 4 (int8 scales each row by its largest weight)")
    minimize_error = MINIMIZE_ERROR_DEFAULT if minimize_error is None else minimize_error
    resolved = resolve_checkpoint(source)
    if is_quantized_checkpoint(resolved):
        raise inference_only_error(resolved, "quantize")
    suffix = "-int8" if bits == 8 else f"-int4-g{group_size}"
    out = output_beside(source, resolved, suffix) if out is None else Path(out)
    check_output(out, "--out", "quantize", owned=lambda target: made_from(target, "quantize", resolved),
                 inputs=loaded_paths(resolved), force=force)

    recipe = {"bits": bits, "group_size": group_size, "scheme": SCHEMES[bits]}
    if bits == 4:
        recipe["minimize_error"] = minimize_error
    files = weights_files(resolved)
    existing = _existing_result(out, resolved, recipe)
    if existing is not None:
        return existing

    checkpoint = load_merged(resolved, device)  # quantized where it is (the rounding and int4's error search)
    model = checkpoint.model.eval().requires_grad_(False)
    bytes_before = sum(t.nbytes for t in model_state_dict(model).values())
    quantized = quantize_model(model, bits, group_size, minimize_error)
    skipped = [name for name in decoder_linears(model) if name not in quantized]
    record = new_record("quantize", recipe, {}, parent=resolved)
    # The tensors' bytes: what model.safetensors holds, less its header of a few kB.
    record["metrics"] = {"weights_bytes_before": bytes_before,
                         "weights_bytes_after": sum(t.nbytes for t in model_state_dict(model).values())}
    save_checkpoint(out, model, checkpoint.tokenizer, record)
    return QuantizeResult(path=out, quantized=quantized, skipped=skipped,
                          size_before=_size_before(files, bytes_before),
                          size_after=(out / WEIGHTS_FILE).stat().st_size, bits=bits, group_size=group_size)


def _size_before(files: list[Path], bytes_before: int) -> int:
    # An adapter checkpoint has no weights file of its own: the merged tensors' bytes stand in.
    return sum(f.stat().st_size for f in files) if all(f.is_file() for f in files) else bytes_before


def _existing_result(out: Path, source: Path, recipe: dict) -> QuantizeResult | None:
    """`out` as a result when it is this very quantization already: made by `orchard quantize` from
    `source`'s current weights (path and hash) with `recipe`, with every decoder linear layer
    quantized (which rules out copies made when int4 left layers without whole groups as they were)."""
    if not is_quantized_checkpoint(out):
        return None
    record = read_record(out)
    parent = record.get("parent") or {}
    if record.get("stage") != "quantize" or record.get("recipe") != recipe:
        return None
    if parent != parent_entry(source):
        return None
    modules = read_quantization(out).get("modules")
    with torch.device("meta"):
        linears = list(decoder_linears(CausalLM(read_model_config(out))))
    if not isinstance(modules, list) or set(modules) != set(linears) or not (out / WEIGHTS_FILE).is_file():
        return None
    bytes_before = (record.get("metrics") or {}).get("weights_bytes_before", 0)
    return QuantizeResult(path=out, quantized=linears, skipped=[],
                          size_before=_size_before(weights_files(source), bytes_before),
                          size_after=(out / WEIGHTS_FILE).stat().st_size, bits=recipe["bits"],
                          group_size=recipe["group_size"], reused=True)
