"""TEMPORARY stand-in for the method core's secure aggregation interface (issue 13), for the Flower wiring's tests.

The core (``fedplora/methods``) will define on ``FederatedMethod``: ``secure_refusal``, ``secure_layout``,
``secure_encode`` and ``secure_aggregate``. Until it does, this module attaches a minimal version for Fed-PLoRA
(both readings of ``aggregate_over``, no central DP) and the refusals of FlexLoRA and FLoRA. It changes nothing
when the core already defines them. Delete this file, and its two imports (config.secure_refusal,
federation/secure.py), when the core lands.
"""

from __future__ import annotations

import torch

from .adapters.model import A_SUFFIX, B_SUFFIX
from .methods.base import FederatedMethod, head_keys, layer_names
from .methods.fedplora import FedPLoRA
from .methods.flexlora import FlexLoRA
from .methods.flora import FLoRA

WEIGHT_SUFFIX = ".secure_weight"
HEAD_WEIGHT = "secure.head_weight"


def _layout(self, state):
    out = {}
    for layer in layer_names(state):
        R, d_in = state[layer + A_SUFFIX].shape
        out[layer + A_SUFFIX] = (R, d_in)
        out[layer + B_SUFFIX] = (state[layer + B_SUFFIX].shape[0], R)
        out[layer + WEIGHT_SUFFIX] = (R,)
    for key in head_keys(state):
        out[key] = tuple(state[key].shape)
    out[HEAD_WEIGHT] = (1,)
    return out


def _encode(self, task, update, weight_scale, clip):
    if clip is not None:
        raise NotImplementedError("the stand-in has no central DP under secure aggregation")
    w = float(update.num_samples) / weight_scale if self.weighting == "samples" else 1.0
    out = {}
    for layer, idx in task.config["indices"].items():
        idx = torch.tensor(idx, dtype=torch.long)
        A0, B0 = task.arrays[layer + A_SUFFIX].double(), task.arrays[layer + B_SUFFIX].double()
        if self.aggregate_over == "all":  # the pairs it did not train count at their global value
            A, B, W = w * A0.clone(), w * B0.clone(), torch.full((A0.shape[0],), w, dtype=torch.float64)
        else:
            A, B, W = torch.zeros_like(A0), torch.zeros_like(B0), torch.zeros(A0.shape[0], dtype=torch.float64)
            W[idx] = w
        A[idx] = w * update.arrays[layer + A_SUFFIX].double()
        B[:, idx] = w * update.arrays[layer + B_SUFFIX].double()
        out[layer + A_SUFFIX], out[layer + B_SUFFIX], out[layer + WEIGHT_SUFFIX] = A, B, W
    for key in head_keys(task.arrays):
        out[key] = w * update.arrays[key].double()
    out[HEAD_WEIGHT] = torch.tensor([w], dtype=torch.float64)
    return out


def _aggregate(self, state, tasks, sums, clients, generator=None):
    if self.dp is not None:
        raise NotImplementedError("the stand-in has no central DP under secure aggregation")
    new = {}
    for layer in layer_names(state):
        A_old, B_old, W = state[layer + A_SUFFIX], state[layer + B_SUFFIX], sums[layer + WEIGHT_SUFFIX]
        trained = W > 0
        A, B = A_old.double().clone(), B_old.double().clone()
        A[trained] = sums[layer + A_SUFFIX][trained] / W[trained, None]
        B[:, trained] = sums[layer + B_SUFFIX][:, trained] / W[None, trained]
        new[layer + A_SUFFIX], new[layer + B_SUFFIX] = A.to(A_old.dtype), B.to(B_old.dtype)
    for key in head_keys(state):
        new[key] = (sums[key] / sums[HEAD_WEIGHT][0]).to(state[key].dtype)
    return new


def _not_in_standin(self, *args, **kwargs):
    raise NotImplementedError(f"the secure-aggregation stand-in covers fedplora only, not {self.name}")


if not hasattr(FederatedMethod, "secure_layout"):
    FederatedMethod.secure_refusal = None
    FederatedMethod.secure_layout = FederatedMethod.secure_encode = FederatedMethod.secure_aggregate = _not_in_standin
    FedPLoRA.secure_layout, FedPLoRA.secure_encode, FedPLoRA.secure_aggregate = _layout, _encode, _aggregate
    FlexLoRA.secure_refusal = "it aggregates the clients' products B_i A_i (a dense sum per layer), not pairs"
    FLoRA.secure_refusal = "it stacks every client's pairs, so the server needs each client's own pairs"
