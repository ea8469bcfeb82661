"""FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432): exact aggregation by a residual in the frozen weights.

The mean of the clients' A and the mean of their B multiply to something other than the mean of their products;
FedEx-LoRA keeps the global adapter as (mean B, mean A) and adds the difference, the residual
s (mean_i B_i A_i - mean B mean A), to the frozen weights, so that after aggregation the global model computes
exactly the mean of the clients' models. The residual is a dense d_out x d_in matrix per layer: it accumulates in
the state (``<layer>.fedex_residual``) and is sent down with the pairs (counted in the downlink bytes); each client
adds it under its pairs as a base offset, as the authors' clients load it into their base weights.

Heterogeneous ranks (the paper trains one rank everywhere; docs/method.md, "FedEx-LoRA"): client i trains the
leading r_i pairs and folds the other R - r_i into its frozen weights (Select-N-Fold), so it starts exactly at the
global model; its full factors are then its trained pairs and the global values of the folded ones, and the means
and the residual are taken over those full factors. Weights: ``weighting`` (uniform, the paper's, or samples).
Where we follow the authors' code (``RaghavSinghal10/fedex-lora``, ``fed_agg.py``): the residual carries the
LoRA scale s = alpha / R; their transpose before adding it is GPT-2's Conv1D layout, which ours does not need.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import get_plora_state_dict, plora_layers, select_and_fold, set_plora_state_dict
from ..measure import LayerFactors
from ..state import A_SUFFIX, B_SUFFIX, State, head_keys, layer_names
from .base import ClientInfo, ClientTask, ClientUpdate, FederatedMethod
from .flora import export_dense
from .pairs import average_heads, leading_pairs

RESIDUAL_SUFFIX = ".fedex_residual"


def _pairs_and_heads(state: State) -> State:
    return {k: v for k, v in state.items() if not k.endswith(RESIDUAL_SUFFIX)}


class FedExLoRA(FederatedMethod):
    name = "fedexlora"
    server_opt_refusal = ("a server step on the mean factors would break what the residual makes exact: the global "
                          "model equal to the mean of the clients' models")
    space = "products"
    aggregators = ("mean",)
    aggregator_refusal = ("its residual is the mean of every client's product B_i A_i, which a robust rule over "
                          "factors does not give")
    dp_refusal = "its residual is a dense d_out x d_in mean of the clients' products, not a sum of pairs"
    secure_refusal = "its server needs each client's product B_i A_i for the residual, not the sum of its factors"

    def describe(self) -> str:
        return f"{self.name} (mean A, mean B, residual into the frozen weights; leading r_i pairs, the rest folded)"

    # ------------------------------------------------------------ server side
    def init_state(self, model: nn.Module) -> State:
        state = get_plora_state_dict(model)
        for name, layer in plora_layers(model):
            dtype = torch.promote_types(layer.plora_A.dtype, torch.float32)
            state[name + RESIDUAL_SUFFIX] = torch.zeros(layer.d_out, layer.d_in, dtype=dtype)
        return state

    def configure_client(self, state: State, client: ClientInfo, server_round: int) -> ClientTask:
        return ClientTask(arrays=dict(state), config={"rank": self.client_rank(client)})

    def full_factors(self, state: State, layer: str, update: ClientUpdate) -> tuple[torch.Tensor, torch.Tensor]:
        """A client's whole rank-R factors in float64: its trained leading pairs, the global values of the rest."""
        A, B = state[layer + A_SUFFIX].double().clone(), state[layer + B_SUFFIX].double().clone()
        r = update.arrays[layer + A_SUFFIX].shape[0]
        A[:r], B[:, :r] = update.arrays[layer + A_SUFFIX].double(), update.arrays[layer + B_SUFFIX].double()
        return A, B

    def combine(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate], aggregator) -> State:
        """A <- sum_i w_i A_i, B <- sum_i w_i B_i, residual += s (sum_i w_i B_i A_i - B A) (full factors)."""
        weights, s, new = self.client_weights(updates), self.plora.scale, {}
        for layer in layer_names(state):
            a, b, res = layer + A_SUFFIX, layer + B_SUFFIX, layer + RESIDUAL_SUFFIX
            A, B = torch.zeros_like(state[a], dtype=torch.float64), torch.zeros_like(state[b], dtype=torch.float64)
            product = torch.zeros_like(state[res], dtype=torch.float64)
            for w, u in zip(weights, updates):
                Ai, Bi = self.full_factors(state, layer, u)
                A += w * Ai
                B += w * Bi
                product += w * (Bi @ Ai)
            new[a], new[b] = A.to(state[a].dtype), B.to(state[b].dtype)
            stored = new[b].double() @ new[a].double()  # the factors as stored: their rounding goes to the residual
            new[res] = (state[res].double() + s * (product - stored)).to(state[res].dtype)
        new.update(average_heads(_pairs_and_heads(state), updates, weights))
        return {k: new[k] for k in state}

    # ------------------------------------------------------------ client side
    def client_setup(self, model: nn.Module, task: ClientTask) -> None:
        for name, layer in plora_layers(model):
            layer.set_base_offset(task.arrays[name + RESIDUAL_SUFFIX])
        set_plora_state_dict(model, _pairs_and_heads(task.arrays))
        select_and_fold(model, range(task.config["rank"]))  # the leading r_i pairs trained, the rest folded

    def client_update(self, model: nn.Module, task: ClientTask, num_samples: int) -> ClientUpdate:
        rank = task.config["rank"]
        return ClientUpdate(leading_pairs(get_plora_state_dict(model), rank), {"rank": rank}, num_samples)

    def expected_update_shapes(self, task: ClientTask, state: State) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in leading_pairs(_pairs_and_heads(state), task.config["rank"]).items()}

    def trained_pairs(self, task: ClientTask, update: ClientUpdate) -> dict[str, list[int]]:
        """The leading r_i pairs (for the history's update norm)."""
        return {layer: list(range(update.arrays[layer + A_SUFFIX].shape[0])) for layer in layer_names(update.arrays)}

    def update_delta(self, task: ClientTask, update: ClientUpdate) -> State:
        """What training changed: the trained pairs and the heads (the residual is the server's, never uploaded)."""
        return super().update_delta(ClientTask(_pairs_and_heads(task.arrays), task.config), update)

    # ------------------------------------------------------------ global model
    def load_global(self, model: nn.Module, state: State) -> None:
        for name, layer in plora_layers(model):
            layer.set_base_offset(state[name + RESIDUAL_SUFFIX])
        set_plora_state_dict(model, _pairs_and_heads(state))
        select_and_fold(model, range(self.rank))

    def dense_update(self, state: State) -> dict[str, torch.Tensor]:
        """Per layer the whole global change: the residual plus s B A."""
        s = self.plora.scale
        return {layer: (state[layer + RESIDUAL_SUFFIX].double()
                        + s * state[layer + B_SUFFIX].double() @ state[layer + A_SUFFIX].double()
                        ).to(state[layer + RESIDUAL_SUFFIX].dtype) for layer in layer_names(state)}

    def export_adapter(self, model: nn.Module, state: State, path, base_model_name_or_path: str | None = None):
        """The residual makes the global model other than a rank-R LoRA: export W0 + residual + s B A exactly, as a
        PEFT LoRA of its numerical rank (``flora.export_dense``)."""
        heads = {k: state[k] for k in head_keys(_pairs_and_heads(state))}
        return export_dense(model, self.dense_update(state), heads, path, base_model_name_or_path)

    # ------------------------------------------------------------ measurement
    def global_factors(self, state: State) -> LayerFactors:
        """(residual | s B) and (I ; A): their product is the whole global change."""
        s, out = self.plora.scale, {}
        for layer in layer_names(state):
            D = state[layer + RESIDUAL_SUFFIX]
            eye = torch.eye(D.shape[1], dtype=D.dtype)
            out[layer] = (torch.cat([D, s * state[layer + B_SUFFIX].to(D.dtype)], dim=1),
                          torch.cat([eye, state[layer + A_SUFFIX].to(D.dtype)], dim=0))
        return out

    def client_start_factors(self, task: ClientTask) -> LayerFactors:
        return self.global_factors(task.arrays)  # trained + folded pairs at their global values, and the residual

    def client_end_factors(self, task: ClientTask, update: ClientUpdate) -> LayerFactors:
        end = dict(task.arrays)
        for layer in layer_names(task.arrays):
            A, B = self.full_factors(task.arrays, layer, update)
            end[layer + A_SUFFIX], end[layer + B_SUFFIX] = A.to(task.arrays[layer + A_SUFFIX].dtype), \
                B.to(task.arrays[layer + B_SUFFIX].dtype)
        return self.global_factors(end)
