"""The global state as the server keeps it: a flat ``dict[str, Tensor]`` of adapter pairs and heads.

Shared by the methods (which define what the state means) and the aggregation pipeline (which only
needs to tell a layer's pairs from the heads), so neither imports the other for these helpers.
"""

from __future__ import annotations

import torch

from .adapters.layer import MASTER_DTYPE
from .adapters.model import A_SUFFIX, B_SUFFIX

State = dict[str, torch.Tensor]


def layer_names(state: State) -> list[str]:
    """The adapted layers, in the state's order (each holds ``<layer>.plora_A`` and ``<layer>.plora_B``)."""
    return [k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)]


def head_keys(state: State) -> list[str]:
    """Every trainable that is not an adapter pair (a classifier head, modules_to_save)."""
    return [k for k in state if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX))]


def upload_dtype(state: State) -> torch.dtype:
    """The run's declared upload dtype, whatever a client's base dtype or quantization: the adapters' master
    dtype (``adapters.layer.MASTER_DTYPE``, float32), float64 where the global state is (exactness tests)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in state.values()) else MASTER_DTYPE


__all__ = ["A_SUFFIX", "B_SUFFIX", "State", "head_keys", "layer_names", "upload_dtype"]
