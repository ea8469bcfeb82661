"""Federated LoRA methods, one module each, all behind ``FederatedMethod``."""

from .base import ClientInfo, ClientTask, ClientUpdate, FederatedMethod, UpdateRejected
from .fedplora import FedPLoRA, select_indices

METHODS: dict[str, type[FederatedMethod]] = {"fedplora": FedPLoRA}


def make_method(name: str, plora, **options) -> FederatedMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](plora, **options)


__all__ = ["ClientInfo", "ClientTask", "ClientUpdate", "FederatedMethod", "FedPLoRA", "METHODS",
           "UpdateRejected", "make_method", "select_indices"]
