"""PLoRA adapters: the layer, its injection into transformers models, PEFT interop."""

from .config import PLoRAConfig, default_target_modules
from .layer import PLoRALayer
from .model import (
    adapter_factors,
    get_plora_model,
    get_plora_state_dict,
    head_parameters,
    plora_layers,
    plora_state_shapes,
    select_and_fold,
    set_plora_state_dict,
    trainable_parameters,
)
from .peft_interop import export_peft_adapter, load_peft_adapter, unwrap_base_copy

__all__ = [
    "PLoRAConfig", "PLoRALayer", "adapter_factors", "default_target_modules", "export_peft_adapter",
    "get_plora_model", "get_plora_state_dict", "head_parameters", "load_peft_adapter", "plora_layers",
    "plora_state_shapes", "select_and_fold", "set_plora_state_dict", "trainable_parameters",
    "unwrap_base_copy",
]
