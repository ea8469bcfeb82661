"""FSLoRA (Federated Sketching LoRA, Fang et al., arXiv 2501.19389): each client trains a random sketch of the
global adapter, and the server averages the sketched changes over every sampled client.

Client i with budget m_i draws m_i of the R pair indices per adapted layer, uniformly without replacement, anew
every round (Fed-PLoRA's stream ``selection`` of (seed, round, client, layer)); A and B of one layer share it. Its local
model is the sketch W0 + s (R/m_i) sum_{j drawn} b_j a_j^T: the unselected pairs are left out (no fold) and the
selected ones scaled by R/m_i, so the sketch equals the global adapter in expectation. Only the drawn pairs are
sent down and up. The server moves pair j by the sum of the drawn clients' changes over the number of sampled
clients whose replies it accepted (``counts_everyone``: one that did not draw j adds a zero change; a client
that failed or was rejected is not in the round), uniform by default
(``weighting``); a server optimizer (``server_optimizer``) may then take that mean change as its pseudo-gradient,
as the authors' code does with AdamW.

Where we follow the code (``wenzhifang/Federated-Sketching-LoRA-Implementation``, ``src/LoRA_Sketching.py``) and
where not (docs/method.md, "FSLoRA"): the scale R/m_i sits on B, as there (the client trains B' = (R/m_i) B and
uploads B'/(R/m_i)); the code's extra (R/m_i)^2 factor on B's gradient is omitted, since under AdamW a constant
factor on a gradient cancels (up to eps); the draw is one per layer shared by A and B (the code draws once per
tensor, which its own comment ``(BS) * A`` contradicts); and the draw is seeded per (round, client, layer) rather
than from one global stream.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import get_plora_state_dict, select_and_fold, set_plora_state_dict
from ..measure import LayerFactors, LayerPairs
from ..state import A_SUFFIX, B_SUFFIX, State, head_keys, layer_names
from .base import ClientInfo, ClientTask, ClientUpdate, FederatedMethod
from .fedplora import select_indices
from .pairs import placed_pairs, selected_pairs


def sketch_indices(m: int, rank: int, seed: int, server_round: int, cid: int, layer: int) -> list[int]:
    """m distinct pair indices of R, uniformly at random: the draw Fed-PLoRA's per-layer selection makes (stream
    ``selection``), so that on the same seed the two methods differ only in what they do with the drawn pairs."""
    return select_indices(m, rank, seed, server_round, cid, layer)


class FSLoRA(FederatedMethod):
    name = "fslora"

    def describe(self) -> str:
        return f"{self.name} (sketch of m_i of R={self.rank} pairs scaled by R/m_i, mean over every sampled client)"

    def sketch_scale(self, task: ClientTask) -> float:
        return self.rank / task.config["rank"]

    # ------------------------------------------------------------ server side
    def configure_client(self, state: State, client: ClientInfo, server_round: int) -> ClientTask:
        m = self.client_rank(client)
        indices = {layer: sketch_indices(m, self.rank, self.seed, server_round, client.cid, k + 1)
                   for k, layer in enumerate(layer_names(state))}
        return ClientTask(arrays=selected_pairs(state, indices), config={"rank": m, "indices": indices})  # the drawn

    # aggregation: pair j's changes summed over the clients that drew it, over every sampled client's weight
    def trained_pairs(self, task: ClientTask, update: ClientUpdate) -> dict[str, list[int]]:
        return task.config["indices"]

    def start_pairs(self, task: ClientTask, held: dict[str, list[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The task holds exactly the drawn pairs, in the order of their indices."""
        return {layer: (task.arrays[layer + A_SUFFIX], task.arrays[layer + B_SUFFIX]) for layer in held}

    def counts_everyone(self) -> bool:
        return True

    def dp_pair_counts(self, dp) -> torch.Tensor:
        """Central DP: every sampled client counts for every pair (its change is zero where it did not draw it)."""
        return dp.pair_counts(self.rank, "everyone")

    # ------------------------------------------------------------ client side
    def sketch(self, task: ClientTask, arrays: State | None = None) -> State:
        """All R pairs of the client's local model: the drawn ones (B scaled by R/m_i), zeros elsewhere."""
        pairs = task.arrays if arrays is None else arrays
        out = placed_pairs({k: v for k, v in pairs.items() if k not in head_keys(pairs)}, task.config["indices"],
                           self.rank, self.sketch_scale(task))
        return out | {k: task.arrays[k] for k in head_keys(task.arrays)}

    def client_setup(self, model: nn.Module, task: ClientTask) -> None:
        set_plora_state_dict(model, self.sketch(task))
        select_and_fold(model, task.config["indices"])  # the undrawn pairs are zero: nothing is folded

    def client_update(self, model: nn.Module, task: ClientTask, num_samples: int) -> ClientUpdate:
        state, c, arrays = get_plora_state_dict(model), self.sketch_scale(task), {}
        for layer, idx in task.config["indices"].items():
            arrays[layer + A_SUFFIX] = state[layer + A_SUFFIX][idx]
            arrays[layer + B_SUFFIX] = state[layer + B_SUFFIX][:, idx] / c  # back to the global factor's scale
        arrays.update({k: state[k] for k in head_keys(state)})
        return ClientUpdate(arrays=arrays, config={"indices": task.config["indices"]}, num_samples=num_samples)

    # ------------------------------------------------------------ what an honest reply holds
    def expected_update_shapes(self, task: ClientTask, state: State) -> dict[str, tuple[int, ...]]:
        return {k: tuple(t.shape) for k, t in task.arrays.items()}  # the drawn pairs and the heads, as sent

    def expected_update_config(self, task: ClientTask) -> dict:
        return {"indices": task.config["indices"]}

    # ------------------------------------------------------------ measurement
    def client_start_factors(self, task: ClientTask) -> LayerFactors:
        return self.global_factors(self.sketch(task))

    def client_end_factors(self, task: ClientTask, update: ClientUpdate) -> LayerFactors:
        return self.global_factors(self.sketch(task, update.arrays))

    def client_start_pairs(self, task: ClientTask) -> LayerPairs:
        return self.global_pairs(self.sketch(task))
