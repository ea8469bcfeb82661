"""Fed-PLoRA: parallel one-rank adaptation with Select-N-Fold.

Client i receives all R global pairs, draws r_i of them (seeded, anew each
round), folds the rest into its frozen weights and trains the r_i it drew, so
it starts exactly at the global model. The server averages each pair j over
the clients that trained it; a pair nobody trained keeps its value.

Options a researcher asks about (docs/method.md), each a run setting:

* ``selection``: ``per_layer`` (an independent draw per adapted layer), ``shared``
  (one draw for every layer) or ``fixed`` (always the first r_i pairs: the paper's
  "Fixed" ablation, which is HetLoRA's selection with Fed-PLoRA's fold).
* ``aggregate_over``: ``participants`` (pair j averaged over the clients that trained
  it, the paper's rule) or ``all`` (every sampled client counts for every pair; one
  that did not train j contributes its unchanged global value, a zero update).
* ``unselected``: ``fold`` (Select-N-Fold) or ``drop`` (Select-N-Drop, the paper's
  ablation: the unselected pairs are left out of the client's model, and only the selected ones are sent, so it does not
  start at the global model).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import rng
from ..adapters import get_plora_state_dict, select_and_fold, set_plora_state_dict
from ..adapters.model import A_SUFFIX, B_SUFFIX
from ..measure import LayerFactors, LayerPairs, per_pair_mean_of_products
from .base import DEFAULT_WEIGHTING, ClientInfo, ClientTask, ClientUpdate, FederatedMethod, State, head_keys, layer_names
from .pairs import placed_pairs, selected_pairs


def select_indices(budget: int, rank: int, seed: int, server_round: int, cid: int, layer: int = 0) -> list[int]:
    """r_i distinct pair indices, uniformly at random; one seed fixes every draw."""
    if not 1 <= budget <= rank:
        raise ValueError(f"a client's rank budget must be in [1, {rank}], got {budget}")
    draw = rng.generator("selection", seed, server_round, cid, layer)
    return sorted(int(i) for i in draw.choice(rank, size=budget, replace=False))


class FedPLoRA(FederatedMethod):
    name = "fedplora"

    def __init__(self, plora, weighting: str = DEFAULT_WEIGHTING, seed: int = 0, selection: str = "per_layer",
                 aggregate_over: str = "participants", unselected: str = "fold") -> None:
        super().__init__(plora, weighting, seed)
        # the three options of the module docstring; their values are checked by RunConfig
        self.selection, self.aggregate_over, self.unselected = selection, aggregate_over, unselected

    @classmethod
    def config_options(cls, cfg) -> dict:
        return {"selection": cfg.selection, "aggregate_over": cfg.aggregate_over, "unselected": cfg.unselected}

    def describe(self) -> str:
        return (f"{self.name} (selection {self.selection}, aggregate over {self.aggregate_over}, "
                f"unselected pairs {'folded' if self.unselected == 'fold' else 'dropped'})")

    # ------------------------------------------------------------ server side
    def configure_client(self, state: State, client: ClientInfo, server_round: int) -> ClientTask:
        budget = min(client.budget, self.rank)
        layers = layer_names(state)
        if self.selection == "fixed":
            indices = {name: list(range(budget)) for name in layers}
        elif self.selection == "shared":
            shared = select_indices(budget, self.rank, self.seed, server_round, client.cid)
            indices = {name: shared for name in layers}
        else:
            indices = {name: select_indices(budget, self.rank, self.seed, server_round, client.cid, k + 1)
                       for k, name in enumerate(layers)}
        if self.unselected == "fold":  # every pair: the selected to train, the rest to fold
            return ClientTask(arrays=dict(state), config={"rank": budget, "indices": indices})
        # drop: the client's model holds the selected pairs only, so only they go down
        return ClientTask(arrays=selected_pairs(state, indices), config={"rank": budget, "indices": indices})

    # ------------------------------------------------------------ aggregation: pair j over the clients in Q_j
    # The mean: pair j moves by the weighted mean of its trainers' changes (participants) or of every sampled
    # client's, one that did not draw j adding a zero change (all); a pair nobody drew keeps its value. Robust
    # rules per pair over the same clients. Central DP: pair j summed over those clients, divided by the count the
    # selection rule expects: m * sum_g p_g r_g / R for a random draw, the clients whose budget covers j for
    # "fixed", every sampled client with aggregate_over="all".
    def trained_pairs(self, task: ClientTask, update: ClientUpdate) -> dict[str, list[int]]:
        return task.config["indices"]

    def counts_everyone(self) -> bool:
        return self.aggregate_over == "all"

    def dp_pair_counts(self, dp) -> torch.Tensor:
        selection = ("everyone" if self.counts_everyone() else
                     "leading" if self.selection == "fixed" else "random")
        return dp.pair_counts(self.rank, selection)

    # ------------------------------------------------------------ client side
    def client_setup(self, model: nn.Module, task: ClientTask) -> None:
        set_plora_state_dict(model, self.start_arrays(task))
        select_and_fold(model, task.config["indices"])

    def start_arrays(self, task: ClientTask) -> State:
        """The R pairs the client's model starts from: all of them as sent (fold), or the selected ones, sent
        alone, at their indices and zeros elsewhere (drop)."""
        if self.unselected == "fold":
            return task.arrays
        return placed_pairs(task.arrays, task.config["indices"], self.rank)

    def start_pairs(self, task: ClientTask, held: dict[str, list[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.unselected == "fold":
            return super().start_pairs(task, held)
        return {layer: (task.arrays[layer + A_SUFFIX], task.arrays[layer + B_SUFFIX]) for layer in held}

    def client_update(self, model: nn.Module, task: ClientTask, num_samples: int) -> ClientUpdate:
        state = get_plora_state_dict(model)
        arrays: State = {}
        for layer, idx in task.config["indices"].items():
            arrays[layer + A_SUFFIX] = state[layer + A_SUFFIX][idx]
            arrays[layer + B_SUFFIX] = state[layer + B_SUFFIX][:, idx]
        for key in head_keys(state):
            arrays[key] = state[key]
        return ClientUpdate(arrays=arrays, config={"indices": task.config["indices"]}, num_samples=num_samples)

    # ------------------------------------------------------------ validation
    def expected_update_shapes(self, task: ClientTask, state: State) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for layer, idx in task.config["indices"].items():
            R, d_in = state[layer + A_SUFFIX].shape
            d_out = state[layer + B_SUFFIX].shape[0]
            shapes[layer + A_SUFFIX] = (len(idx), d_in)
            shapes[layer + B_SUFFIX] = (d_out, len(idx))
        for key in head_keys(state):
            shapes[key] = tuple(state[key].shape)
        return shapes

    def expected_update_config(self, task: ClientTask) -> dict:
        """A reply declares the pairs it was assigned (``client_update`` echoes them); the base checks them."""
        return {"indices": task.config["indices"]}

    # ------------------------------------------------------------ measurement
    def client_start_factors(self, task: ClientTask) -> LayerFactors:
        # fold: folded pairs + selected pairs = all R pairs at their global values; drop: the selected ones only
        return self.global_factors(self.start_arrays(task))

    def client_end_factors(self, task: ClientTask, update: ClientUpdate) -> LayerFactors:
        full = dict(self.start_arrays(task))
        for layer, idx in task.config["indices"].items():
            A = full[layer + A_SUFFIX].clone()
            B = full[layer + B_SUFFIX].clone()
            A[idx] = update.arrays[layer + A_SUFFIX]
            B[:, idx] = update.arrays[layer + B_SUFFIX]
            full[layer + A_SUFFIX], full[layer + B_SUFFIX] = A, B
        return self.global_factors(full)

    # the paper's noise definitions (docs/method.md, "Measurements")
    def client_start_pairs(self, task: ClientTask) -> LayerPairs:
        # all R pairs as the client holds them: its selected pairs at their global values, the others folded
        # at their global values (fold: no parameter-level noise) or zero (drop)
        return self.global_pairs(self.start_arrays(task))

    def paper_ideal_factors(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate]) -> LayerFactors:
        """The paper's dW* per pair over Q_j: sum_j (1/|Q_j|) sum_{i in Q_j} b_ij a_ij^T, uniform whatever
        ``weighting``. With ``aggregate_over="all"`` Q_j is every sampled client, one that did not train j
        counting with pair j at its global value (what that aggregation averages over)."""
        s, out = self.plora.scale, {}
        for layer in layer_names(state):
            A_old, B_old = state[layer + A_SUFFIX].double(), state[layer + B_SUFFIX].double()
            trained = []
            for task, u in zip(tasks, updates):
                idx = task.config["indices"][layer]
                A, B = u.arrays[layer + A_SUFFIX].double(), u.arrays[layer + B_SUFFIX].double()
                if self.aggregate_over == "all":
                    A_full, B_full = A_old.clone(), B_old.clone()
                    A_full[idx], B_full[:, idx] = A, B
                    idx, A, B = list(range(self.rank)), A_full, B_full
                trained.append((idx, s * B, A))
            out[layer] = per_pair_mean_of_products((s * B_old, A_old), trained)
        return out
