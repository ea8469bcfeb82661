"""What several methods share: the leading-pairs client (FedIT, HetLoRA, FlexLoRA) and factor helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_plora_state_dict, select_and_fold, set_plora_state_dict
from ..measure import LayerFactors
from ..state import A_SUFFIX, B_SUFFIX, State, head_keys, layer_names
from .base import ClientInfo, ClientTask, ClientUpdate, FederatedMethod


def leading_pairs(state: State, rank: int) -> State:
    """The first ``rank`` pairs of every layer, plus the heads (copies, so only they go on the wire)."""
    out: State = {}
    for layer in layer_names(state):
        out[layer + A_SUFFIX] = state[layer + A_SUFFIX][:rank].clone()
        out[layer + B_SUFFIX] = state[layer + B_SUFFIX][:, :rank].clone()
    out.update({k: state[k] for k in head_keys(state)})
    return out


def selected_pairs(state: State, indices: dict[str, list[int]]) -> State:
    """Per layer the pairs at ``indices`` (in that order), plus the heads: what a client whose model holds only its
    selected pairs is sent (Select-N-Drop, FSLoRA's sketch)."""
    out: State = {}
    for layer, idx in indices.items():
        i = torch.tensor(idx, dtype=torch.long)
        out[layer + A_SUFFIX] = state[layer + A_SUFFIX][i].clone()
        out[layer + B_SUFFIX] = state[layer + B_SUFFIX][:, i].clone()
    out.update({k: state[k] for k in head_keys(state)})
    return out


def placed_pairs(arrays: State, indices: dict[str, list[int]], rank: int, b_scale: float = 1.0) -> State:
    """The inverse: all R pairs of each layer, the given ones at ``indices`` (B times ``b_scale``), zeros elsewhere;
    the heads as they are."""
    out = dict(arrays)
    for layer, idx in indices.items():
        A, B = arrays[layer + A_SUFFIX], arrays[layer + B_SUFFIX]
        full_A = torch.zeros(rank, A.shape[1], dtype=A.dtype)
        full_B = torch.zeros(B.shape[0], rank, dtype=B.dtype)
        full_A[idx], full_B[:, idx] = A, (B if b_scale == 1.0 else b_scale * B)
        out[layer + A_SUFFIX], out[layer + B_SUFFIX] = full_A, full_B
    return out


def pad_pairs(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad r pairs to ``rank`` pairs; a zero pair adds nothing to B @ A."""
    r = A.shape[0]
    return F.pad(A, (0, 0, 0, rank - r)), F.pad(B, (0, rank - r))


def stack_pairs(weights: list[float], updates: list[ClientUpdate], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[w_1 B_1 | ... | w_n B_n] and [A_1; ...; A_n] in float64: their product is sum_i w_i B_i A_i."""
    B = torch.cat([w * u.arrays[layer + B_SUFFIX].double() for w, u in zip(weights, updates)], dim=1)
    A = torch.cat([u.arrays[layer + A_SUFFIX].double() for u in updates], dim=0)
    return B, A


def average_heads(state: State, updates: list[ClientUpdate], weights: list[float]) -> State:
    """FedAvg of the non-adapter trainables (e.g. a classifier head), for product-space methods."""
    out = {}
    for key in head_keys(state):
        acc = torch.zeros_like(state[key], dtype=torch.float64)
        for w, u in zip(weights, updates):
            acc += w * u.arrays[key].double()
        out[key] = acc.to(state[key].dtype)
    return out


class LeadingPairsMethod(FederatedMethod):
    """A client trains a plain rank-r_i LoRA: the first r_i pairs (FedIT, HetLoRA, FlexLoRA).

    The server sends exactly those r_i pairs (and the heads). The client's rank-R model holds them with zero
    pairs beyond, so it computes W0 + s B_r A_r, and it trains, keeps optimizer state for and uploads r_i
    pairs only. Subclasses pick the rank (``client_rank``), what the global pairs mean and how they combine.
    """

    def configure_client(self, state: State, client: ClientInfo, server_round: int) -> ClientTask:
        rank = self.client_rank(client)
        return ClientTask(arrays=leading_pairs(state, rank), config={"rank": rank})

    def client_setup(self, model: nn.Module, task: ClientTask) -> None:
        full = dict(task.arrays)
        for layer in layer_names(task.arrays):
            full[layer + A_SUFFIX], full[layer + B_SUFFIX] = pad_pairs(
                task.arrays[layer + A_SUFFIX], task.arrays[layer + B_SUFFIX], self.rank)
        set_plora_state_dict(model, full)
        select_and_fold(model, range(task.config["rank"]))

    def client_update(self, model: nn.Module, task: ClientTask, num_samples: int) -> ClientUpdate:
        rank = task.config["rank"]
        return ClientUpdate(leading_pairs(get_plora_state_dict(model), rank), {"rank": rank}, num_samples)

    def expected_update_shapes(self, task: ClientTask, state: State) -> dict[str, tuple[int, ...]]:
        return {key: tuple(t.shape) for key, t in task.arrays.items()}

    def trained_pairs(self, task: ClientTask, update: ClientUpdate) -> dict[str, list[int]]:
        """Client i holds the leading pairs 0..r_i-1 of every layer (a zero-padded entry beyond is not data)."""
        return {layer: list(range(update.arrays[layer + A_SUFFIX].shape[0]))
                for layer in layer_names(update.arrays)}

    def client_start_factors(self, task: ClientTask) -> LayerFactors:
        return self.global_factors(task.arrays)

    def client_end_factors(self, task: ClientTask, update: ClientUpdate) -> LayerFactors:
        return self.global_factors(update.arrays)
