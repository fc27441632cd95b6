"""Growing a checkpoint into a larger model that starts where it left off: more layers, a wider
residual stream or MLP, more attention heads, written as a new checkpoint to train further.

`orchard grow` is a thin wrapper around `grow_checkpoint`. The arithmetic is
`orchard.model.growth`'s; this module adds what a checkpoint needs around it: refusing what cannot
be grown, where the result goes, and its lineage record, whose `new_parameters` (the inserted
blocks) let `orchard pretrain init=GROWN init_trainable=new` train only those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import OrchardError
from ..files import check_output
from ..lineage import new_record
from ..lineage.record import made_from
from ..model.growth import grow, grown_config
from .layout import (inference_only_error, is_adapter_checkpoint, is_quantized_checkpoint, output_beside,
                     read_model_config, read_record, resolve_checkpoint)
from .load import load_checkpoint
from .save import save_checkpoint

# The `orchard grow` flag of each `grow` argument, for one-line errors that name what the user typed.
FLAGS = {"layers": "--layers", "hidden_size": "--hidden-size", "intermediate_size": "--intermediate-size",
         "num_attention_heads": "--heads", "num_key_value_heads": "--kv-heads", "depth_method": "--depth-method",
         "positions": "--positions", "mlp_method": "--mlp-method"}

# How `summary` names each size.
_SIZE_NAMES = {"num_hidden_layers": "layers", "hidden_size": "hidden", "intermediate_size": "MLP",
               "num_attention_heads": "heads", "num_key_value_heads": "key/value heads"}


@dataclass
class GrowResult:
    """What `grow_checkpoint` made."""

    path: Path
    parameters_before: int
    parameters_after: int
    grew: dict[str, list[int]]
    """Each size that changed, by its config field: [old, new]."""
    new_parameters: list[str]
    """Names of the entirely new parameters (the inserted blocks'); empty after width-only growth."""
    function_preserving: bool
    new_layers: list[int]
    depth_method: str | None = None
    mlp_method: str | None = None

    def summary(self) -> str:
        """The one line `orchard grow` prints."""
        parts = []
        for name, (old, new) in self.grew.items():
            part = f"{_SIZE_NAMES[name]} {old} -> {new}"
            if name == "num_hidden_layers":
                part += f" ({self.depth_method}" + (f", new at {', '.join(map(str, self.new_layers))})"
                                                    if self.depth_method == "identity" else ")")
            elif name == "intermediate_size":
                part += f" ({self.mlp_method})"
            parts.append(part)
        same = "same function" if self.function_preserving else "NOT the same function (stacked)"
        return (f"{self.path}: {self.parameters_before:,} -> {self.parameters_after:,} parameters; "
                f"{', '.join(parts)}; {same}")


def grow_checkpoint(source: str | Path, out: str | Path | None = None, layers: int | None = None,
                    hidden_size: int | None = None, intermediate_size: int | None = None,
                    num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                    depth_method: str = "identity", positions: list[int] | None = None, mlp_method: str = "zero",
                    seed: int = 0, force: bool = False) -> GrowResult:
    """Grow `source` (a checkpoint or run directory, a Hugging Face directory or Hub id) as
    `orchard.model.growth.grow` does and save the float32 result, with the source's tokenizer, to
    the checkpoint directory `out`.

    `out=None` writes beside the source, named `NAME-grown` (into the working directory for a Hub
    id). An existing `out` is replaced only when it is an earlier growth of the same source (or with
    `force`). Quantized and adapter checkpoints are refused: the one holds codes rather than weights, the
    other only adapters. Every size is checked against the source's config.json before the weights
    are read; bad values are one-line errors naming the `orchard grow` flag they come from."""
    resolved = resolve_checkpoint(source)
    if is_quantized_checkpoint(resolved):
        raise inference_only_error(resolved, "grow")
    if is_adapter_checkpoint(resolved):
        base = (read_record(resolved).get("parent") or {}).get("path") or "its base model"
        raise OrchardError(f"{resolved}: an adapter checkpoint has no weights of its own to grow; grow {base}, "
                           f"or merge the adapter first (orchard export {resolved} --format hf --out DIR)")
    settings = {"layers": layers, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
                "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
                "depth_method": depth_method, "positions": positions, "mlp_method": mlp_method}
    try:
        grown_config(read_model_config(resolved), **settings)
    except ValueError as error:
        raise _flag_error(error) from None
    out = output_beside(source, resolved, "-grown") if out is None else Path(out)
    check_output(out, "--out", "grow", owned=lambda target: made_from(target, "grow", resolved), inputs=(resolved,),
                 force=force)

    checkpoint = load_checkpoint(resolved)
    try:
        model, description = grow(checkpoint.model.float(), seed=seed, **settings)
    except ValueError as error:
        raise _flag_error(error) from None
    record = new_record("grow", {**settings, "seed": seed}, {}, parent=resolved)
    record["grew"] = description["grew"]
    if "new_layers" in description:
        record["new_layers"] = description["new_layers"]
    record["new_parameters"] = description["new_parameters"]
    record["function_preserving"] = description["function_preserving"]
    record["metrics"] = {"parameters_before": description["parameters"][0],
                         "parameters_after": description["parameters"][1]}
    save_checkpoint(out, model, checkpoint.tokenizer, record)
    return GrowResult(path=out, parameters_before=description["parameters"][0],
                      parameters_after=description["parameters"][1], grew=description["grew"],
                      new_parameters=description["new_parameters"],
                      function_preserving=description["function_preserving"],
                      new_layers=description.get("new_layers", []), depth_method=description.get("depth_method"),
                      mlp_method=description.get("mlp_method"))


def _flag_error(error: ValueError) -> OrchardError:
    """`growth`'s "argument: problem" as "--flag: problem"."""
    message = str(error)
    name, sep, rest = message.partition(": ")
    return OrchardError(f"{FLAGS[name]}: {rest}" if sep and name in FLAGS else message)
