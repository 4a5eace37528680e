"""MoSLoRA adapters for the language model: the layer, injection by module name, and adapter files."""

from mm_moslora.adapters.inject import (
    DEFAULT_TARGET_MODULES,
    adapter_modules,
    count_parameters,
    format_parameter_report,
    inject_adapters,
    is_target_module,
    merge_adapters,
    unload_adapters,
    unmerge_adapters,
)
from mm_moslora.adapters.io import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    adapter_state_dict,
    export_peft,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from mm_moslora.adapters.moslora import AdapterConfig, MoSLoRALinear, fold_mixer, lora_scaling

__all__ = [
    "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "DEFAULT_TARGET_MODULES", "AdapterConfig", "MoSLoRALinear",
    "adapter_modules", "adapter_state_dict", "count_parameters", "export_peft", "fold_mixer",
    "format_parameter_report", "inject_adapters", "is_target_module", "load_adapter", "lora_scaling",
    "merge_adapters", "read_adapter_config", "save_adapter", "unload_adapters", "unmerge_adapters",
]
