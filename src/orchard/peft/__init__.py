"""Parameter-efficient fine-tuning: adapters added to a built model without renaming its weights."""

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

__all__ = ["LoraConfig", "adapter_configs", "adapter_routing", "adapter_state_dict", "add_lora", "load_adapter",
           "load_adapter_weights", "merge_adapter", "remove_adapter", "save_adapter", "set_active_adapters",
           "trainable_parameter_count", "unmerge_adapter"]
