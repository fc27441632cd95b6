"""LoRA adapters in PEFT's format: written so ``peft.PeftModel.from_pretrained`` loads them on the
exported base model, and read from adapters PEFT (or anything following its format) saved.

An adapter directory holds

    adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, use_rslora, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, in_features)
                                 base_model.model.<module>.lora_B.weight  (out_features, r)

where <module> is the module's name in the Hugging Face model (``model.layers.0.self_attn.q_proj``),
which is also its name in orchard's model. The adapted layer computes
``W x + scaling * B (A x)`` with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA), so merging adds ``scaling * B @ A`` to ``W``.

Only plain LoRA on linear layers is supported; an adapter using anything else (DoRA,
modules_to_save, per-module ranks, bias training, ...) is refused with an error naming the key,
rather than loaded into something that computes a different function.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import OrchardError
from ..files import atomic_directory, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"  # older PEFT versions' pickle
KEY_PREFIX = "base_model.model."
# Files save_lora_adapter may replace: the directory is written as a whole.
_ADAPTER_FILES = {CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE, "README.md"}

# <prefix><module>.lora_A[.<adapter name>].weight; PEFT's save_pretrained drops the adapter name.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# adapter_config.json keys naming features orchard does not implement: any value other than these
# defaults changes what the adapter computes (or how its tensors are laid out).
_UNSUPPORTED = {
    "use_dora": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "fan_in_fan_out": False,
    "lora_bias": False,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "velora_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
}


@dataclass
class LoraAdapterConfig:
    r: int
    lora_alpha: float
    target_modules: list[str]
    lora_dropout: float = 0.0
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    bias: str = "none"
    extra: dict = field(default_factory=dict, repr=False)
    """Other adapter_config.json entries read from a PEFT adapter (kept, not interpreted)."""

    def scaling(self) -> float:
        """What B @ A is multiplied by: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (as PEFT)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self) -> dict:
        """adapter_config.json as PEFT 0.21 writes it for a plain LoRA on a causal LM."""
        alpha = int(self.lora_alpha) if float(self.lora_alpha).is_integer() else self.lora_alpha
        return {
            "alpha_pattern": {},
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias,
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layer_replication": None,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": alpha,
            "lora_bias": False,
            "lora_dropout": self.lora_dropout,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "modules_to_save": None,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": None,
            "target_modules": sorted(self.target_modules),
            "task_type": "CAUSAL_LM",
            "use_dora": False,
            "use_rslora": self.use_rslora,
        }


def _targets(module: str, target_modules: list[str]) -> bool:
    # PEFT's rule for a list: the module's name is a target or ends with "." + a target.
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _check_weights(config: LoraAdapterConfig, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   where: str) -> None:
    for module, (a, b) in weights.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != config.r or b.shape[1] != config.r:
            raise OrchardError(f"{where}: {module}: LoRA A must be (r, in) and B (out, r) with r={config.r}, "
                               f"got A {tuple(a.shape)} and B {tuple(b.shape)}")


def save_lora_adapter(directory, config: LoraAdapterConfig,
                      weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write ``weights`` (module name -> (A (r, in), B (out, r))) as a PEFT adapter directory.

    The directory is written whole and renamed into place (a crash leaves the old adapter or the new
    one); an existing directory holding anything but adapter files is refused, not overwritten."""
    directory = Path(directory)
    if config.bias != "none":
        raise OrchardError(f"bias: only 'none' is supported, got {config.bias!r}")
    if not weights:
        raise OrchardError(f"{directory}: no LoRA weights to save")
    _check_weights(config, weights, str(directory))
    for module in weights:
        if not _targets(module, config.target_modules):
            # PEFT would not create a LoRA layer there and would drop the weights without a word.
            raise OrchardError(f"target_modules: {module} is not among {sorted(config.target_modules)}")
    if directory.exists():
        others = sorted(p.name for p in directory.iterdir() if p.name not in _ADAPTER_FILES)
        if not directory.is_dir() or others:
            raise OrchardError(f"{directory}: exists and is not an adapter directory "
                               f"({others[0] if others else 'not a directory'}); choose another path")

    tensors = {}
    for module, (a, b) in weights.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.detach().to("cpu").contiguous()

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_peft_dict(), indent=2) + "\n", encoding="utf-8")
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})

    atomic_directory(directory, write)


def _read_config(config_file: Path) -> LoraAdapterConfig:

    data = read_json(config_file, missing="no such file (not a PEFT adapter directory)")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise OrchardError(f"{config_file}: peft_type is {peft_type!r}; only LoRA adapters (\"LORA\") are supported")
    if data.get("task_type") not in (None, "CAUSAL_LM"):
        raise OrchardError(f"{config_file}: task_type is {data['task_type']!r}; only CAUSAL_LM is supported")
    for key, default in _UNSUPPORTED.items():
        value = data.get(key, default)
        if value != default and value not in (None, False, {}, []):
            raise OrchardError(f"{config_file}: {key} = {json.dumps(value)[:60]} is not supported "
                               f"(orchard reads plain LoRA adapters)")
    if data.get("bias", "none") != "none":
        raise OrchardError(f"{config_file}: bias = {data['bias']!r} is not supported (only \"none\")")
    for key in ("r", "lora_alpha"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise OrchardError(f"{config_file}: {key} must be a positive number, got {json.dumps(value)}")
    if not isinstance(data["r"], int) and not float(data["r"]).is_integer():
        raise OrchardError(f"{config_file}: r must be an integer, got {data['r']}")
    targets = data.get("target_modules")
    if isinstance(targets, str):
        targets = None  # a regex: the weights themselves say which modules are adapted (filled in below)
    elif not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise OrchardError(f"{config_file}: target_modules must be a list of module names or a regex")
    known = {"r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "base_model_name_or_path", "bias"}
    return LoraAdapterConfig(
        r=int(data["r"]),
        lora_alpha=data["lora_alpha"],
        target_modules=targets,
        lora_dropout=float(data.get("lora_dropout") or 0.0),
        use_rslora=bool(data.get("use_rslora", False)),
        base_model_name_or_path=data.get("base_model_name_or_path"),
        extra={k: v for k, v in data.items() if k not in known},
    )


def _read_tensors(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    weights_file = directory / WEIGHTS_FILE
    if weights_file.is_file():
        try:
            return weights_file, load_file(weights_file)
        except (SafetensorError, OSError) as error:
            raise OrchardError(f"{weights_file}: unreadable weights ({error})") from None
    legacy = directory / LEGACY_WEIGHTS_FILE
    if legacy.is_file():
        try:
            return legacy, torch.load(legacy, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
            raise OrchardError(f"{legacy}: unreadable weights ({str(error).splitlines()[0]})") from None
    raise OrchardError(f"{weights_file}: no such file")


def load_lora_adapter(directory) -> tuple[LoraAdapterConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read a PEFT LoRA adapter: its config and module name -> (A (r, in), B (out, r)).

    Keys may carry the adapter's name (``.lora_A.default.weight``, as in a PEFT model's state dict)
    or not (as ``save_pretrained`` writes them). Anything but plain LoRA is an OrchardError naming
    the key."""
    directory = Path(directory)
    if not directory.is_dir():
        raise OrchardError(f"{directory}: no such adapter directory")
    config = _read_config(directory / CONFIG_FILE)
    weights_file, tensors = _read_tensors(directory)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise OrchardError(f"{weights_file}: {key} is not a LoRA A/B weight (unsupported adapter feature)")
        adapters.add(match["adapter"] or "default")
        parts.setdefault(match["module"], {})[match["which"]] = tensor
    if len(adapters) > 1:
        raise OrchardError(f"{weights_file}: holds several adapters ({', '.join(sorted(adapters))}); expected one")
    if not parts:
        raise OrchardError(f"{weights_file}: holds no LoRA weights")
    weights = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise OrchardError(f"{weights_file}: {module} has no {missing} weight")
        weights[module] = (pair["A"], pair["B"])
    _check_weights(config, weights, str(weights_file))
    if config.target_modules is None:
        config.target_modules = sorted({module.rsplit(".", 1)[-1] for module in weights})
    return config, weights


def merged_state_dict(base_state: dict[str, torch.Tensor], config: LoraAdapterConfig,
                      weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A copy of ``base_state`` with ``W + scaling * B @ A`` for each adapted module's ``.weight``
    (computed in float32, stored in W's dtype); other tensors are shared, not copied."""
    merged = dict(base_state)
    scaling = config.scaling()
    for module, (a, b) in weights.items():
        name = f"{module}.weight"
        if name not in base_state:
            raise OrchardError(f"LoRA weights for {module}, but the base model has no {name}")
        weight = base_state[name]
        delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
        if delta.shape != weight.shape:
            raise OrchardError(f"LoRA weights for {module} make a {tuple(delta.shape)} update, "
                               f"but {name} is {tuple(weight.shape)}")
        merged[name] = (weight.float() + scaling * delta).to(weight.dtype)
    return merged
