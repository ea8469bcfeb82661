"""Federated LoRA methods, one module each, all behind ``FederatedMethod``."""

from .base import ClientInfo, ClientTask, ClientUpdate, FederatedMethod, UpdateRejected
from .fedit import FedIT
from .fedplora import FedPLoRA, select_indices
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA

METHODS: dict[str, type[FederatedMethod]] = {
    "fedplora": FedPLoRA, "fedit": FedIT, "hetlora": HetLoRA, "flexlora": FlexLoRA, "flora": FLoRA,
}


def make_method(name: str, plora, **options) -> FederatedMethod:
    """The method named by a (validated) RunConfig's ``method``."""
    return METHODS[name](plora, **options)


__all__ = ["ClientInfo", "ClientTask", "ClientUpdate", "FLoRA", "FedIT", "FedPLoRA", "FederatedMethod", "FlexLoRA",
           "HetLoRA", "METHODS", "UpdateRejected", "make_method", "select_indices"]
