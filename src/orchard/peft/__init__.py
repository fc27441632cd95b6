"""Parameter-efficient fine-tuning: adapters added to a built model without renaming its weights.

LoRA/DoRA (`lora`), bottleneck adapters (`adapters`) and prefix tuning (`prefix`). Their tensors'
state-dict names carry a marker: ".lora.", ".adapter." and ".prefix." respectively. `config` is the
`peft.*` recipe section and how a method applies it; `surgery` describes what a model carries as
plain data and redoes it on load; `format` reads and writes PEFT's adapter files; `quantized`
freezes a base in NF4 for QLoRA."""

from .adapters import AdapterConfig, adapter_modules, add_adapters, remove_adapters
from .lora import (
    LoraConfig,
    adapter_configs,
    adapter_routing,
    adapter_state_dict,
    add_lora,
    load_adapter,
    load_adapter_weights,
    merge_adapter,
    remove_adapter,
    save_adapter,
    set_active_adapters,
    trainable_parameter_count,
    unmerge_adapter,
)
from .prefix import (
    PrefixConfig,
    add_prefix,
    fold_prefix_projection,
    has_prefix,
    remove_prefix,
)

__all__ = ["AdapterConfig", "LoraConfig", "PrefixConfig", "adapter_configs", "adapter_modules", "adapter_routing",
           "adapter_state_dict", "add_adapters", "add_lora", "add_prefix", "fold_prefix_projection", "has_prefix",
           "load_adapter", "load_adapter_weights", "merge_adapter", "remove_adapter", "remove_adapters",
           "remove_prefix", "save_adapter", "set_active_adapters", "trainable_parameter_count", "unmerge_adapter"]
