"""Federated LoRA methods, one module each, all behind ``FederatedMethod``; the registry builds them from a config.

Adding a method: one module here (its maths, its capabilities and the settings it reads, declared on its class)
and one line in ``METHODS``.
"""

from ..adapters import PLoRAConfig
from .base import ClientInfo, ClientTask, ClientUpdate, FederatedMethod, UpdateRejected
from .fedexlora import FedExLoRA
from .fedit import FedIT
from .fedplora import FedPLoRA, select_indices
from .flexlora import FlexLoRA
from .flora import FLoRA
from .fslora import FSLoRA
from .hetlora import HetLoRA
from .rblora import RBLoRA

METHODS: dict[str, type[FederatedMethod]] = {
    "fedplora": FedPLoRA, "fedit": FedIT, "hetlora": HetLoRA, "flexlora": FlexLoRA, "flora": FLoRA,
    "fslora": FSLoRA, "rblora": RBLoRA, "fedexlora": FedExLoRA,
}


def plora_config(cfg) -> PLoRAConfig:
    """The adapter a (validated) RunConfig asks for: global rank R, alpha, targets, dropout, how pairs fold."""
    return PLoRAConfig(rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.targets, dropout=cfg.lora_dropout,
                       fold=cfg.fold)


def build_method(cfg) -> FederatedMethod:
    """The method a validated RunConfig names, with the settings it reads (``config_options``)."""
    return METHODS[cfg.method].from_config(cfg, plora_config(cfg))


def make_method(name: str, plora, **options) -> FederatedMethod:
    """The method called ``name`` with explicit constructor options (library use)."""
    return METHODS[name](plora, **options)


__all__ = ["ClientInfo", "ClientTask", "ClientUpdate", "FLoRA", "FSLoRA", "FedExLoRA", "FedIT", "FedPLoRA",
           "FederatedMethod", "FlexLoRA", "HetLoRA", "RBLoRA", "METHODS", "UpdateRejected", "build_method", "make_method", "plora_config", "select_indices"]
