"""fedplora: heterogeneous federated LoRA fine-tuning (Fed-PLoRA and its baselines).

Quick use, PEFT-style::

    from fedplora import PLoRAConfig, get_plora_model, select_and_fold
    model = get_plora_model(model, PLoRAConfig(rank=8)   # query/value, scale 1 (alpha = rank))
    select_and_fold(model, [0, 3, 5])   # train 3 of the 8 pairs, the rest folded in
"""

import logging as _logging

# bitsandbytes (imported by peft whenever it is installed) warns at import that optional CPU kernels are absent
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

from .adapters import (  # noqa: E402
    PLoRAConfig,
    PLoRALayer,
    export_peft_adapter,
    get_plora_model,
    get_plora_state_dict,
    load_peft_adapter,
    plora_layers,
    select_and_fold,
    set_plora_state_dict,
    trainable_parameters,
)
from .measure import aggregation_noise, init_noise, nbytes
from .methods import ClientInfo, ClientTask, ClientUpdate, FederatedMethod, FedPLoRA, UpdateRejected, make_method

__version__ = "0.1.0"

__all__ = [
    "ClientInfo", "ClientTask", "ClientUpdate", "FedPLoRA", "FederatedMethod", "PLoRAConfig", "PLoRALayer",
    "UpdateRejected", "aggregation_noise", "export_peft_adapter", "get_plora_model", "get_plora_state_dict",
    "init_noise", "load_peft_adapter", "make_method", "nbytes", "plora_layers", "select_and_fold",
    "set_plora_state_dict", "trainable_parameters",
]
