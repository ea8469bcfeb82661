"""The contract every federated LoRA method implements: its maths, and nothing about how clients are combined.

The server side (``configure_client``; ``encode`` and ``decode``, or ``combine`` in product space) and the
client side (``client_setup``, ``client_update``) are pure PyTorch: Flower only carries the ``ClientTask`` and
``ClientUpdate`` between them. How a round's replies are combined (mean, robust, private, secure) is one shared
step, ``fedplora.aggregation``; a method declares which of those it defines (``aggregators``, ``dp_refusal``,
``secure_refusal``) and the run settings it reads (``config_options``). Because Fed-PLoRA and every baseline go
through the same calls, ``compare`` is fair by construction.

Global state is a flat ``dict[str, Tensor]``; aggregation returns a new dict and never edits the old one, so a
rejected update cannot half-update it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import PLoRAConfig, get_plora_state_dict, select_and_fold, set_plora_state_dict
from ..adapters.model import adapter_factors
from ..aggregation import MEAN, Contribution, Reduced, apply_mean, apply_sums, layout, pair_contribution, pipeline, validation
from ..errors import UpdateRejected
from ..measure import LayerFactors, LayerPairs, mean_of_products
from ..robust import AGGREGATORS
from ..state import A_SUFFIX, B_SUFFIX, State, head_keys, layer_names, upload_dtype

# the library's defaults are the run settings' (RunConfig); tests/test_config_cli.py keeps them equal
DEFAULT_WEIGHTING = "uniform"


@dataclass(frozen=True)
class ClientInfo:
    cid: int  # stable client id (the data partition id), not Flower's random node id
    budget: int  # the largest rank the client can train this round
    num_samples: int = 1


@dataclass
class ClientTask:
    """What the server sends one client for one round."""

    arrays: State
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What a client sends back."""

    arrays: State
    config: dict[str, Any]
    num_samples: int


class FederatedMethod(ABC):
    name: ClassVar[str]
    # "pairs": replies are encoded into per-pair sums (every reducer applies); "products": the server needs each
    # client's product B_i A_i, so the method combines the replies itself (``combine``)
    space: ClassVar[str] = "pairs"
    aggregators: ClassVar[tuple[str, ...]] = AGGREGATORS  # the combination rules defined for it
    aggregator_refusal: ClassVar[str] = ""  # why the others are not (one clause)
    dp_refusal: ClassVar[str | None] = None  # why central DP is not defined for it, or None
    secure_refusal: ClassVar[str | None] = None  # why secure aggregation is not defined for it, or None
    secure_weight_bound: ClassVar[float | None] = 1.0  # the largest weight one client uploads under SecAgg+
    server_opt_refusal: ClassVar[str | None] = None  # why a server optimizer is not defined for it, or None
    ignores_budgets: bool = False  # True only for a reference that trains rank R everywhere (FedIT ideal)

    def __init__(self, plora: PLoRAConfig, weighting: str = DEFAULT_WEIGHTING, seed: int = 0) -> None:
        """``weighting``: "uniform" (every client alike, the paper's) or "samples" (checked by RunConfig)."""
        self.plora, self.weighting, self.seed = plora, weighting, seed

    @classmethod
    def config_options(cls, cfg) -> dict[str, Any]:
        """The constructor's options from a validated RunConfig, beyond weighting and seed (the settings it reads)."""
        return {}

    @classmethod
    def from_config(cls, cfg, plora: PLoRAConfig) -> "FederatedMethod":
        return cls(plora, weighting=cfg.weighting, seed=cfg.seed, **cls.config_options(cfg))

    @property
    def rank(self) -> int:
        return self.plora.rank

    def describe(self) -> str:
        """One line naming the method and the options that change what it is, for logs and tables."""
        return self.name

    def client_rank(self, client: ClientInfo) -> int:
        """The rank client i trains: its budget, capped at the global rank R."""
        if client.budget < 1:
            raise ValueError(f"client {client.cid}: a rank budget must be >= 1, got {client.budget}")
        return min(client.budget, self.rank)

    # ------------------------------------------------------------ server side
    def init_state(self, model: nn.Module) -> State:
        """The round-0 global state, from a freshly wrapped model."""
        return get_plora_state_dict(model)

    @abstractmethod
    def configure_client(self, state: State, client: ClientInfo, server_round: int) -> ClientTask: ...

    def aggregate(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate], how=None,
                  generator: torch.Generator | None = None) -> State:
        """The library's one-call round: ``fedplora.aggregation.aggregate`` with this method (``how``: a robust
        rule, central DP settings or a reducer; None: the method's mean)."""
        return pipeline.aggregate(self, state, tasks, updates, how, generator)

    # ------------------------------------------------------------ aggregation maths (pair space)
    def trained_pairs(self, task: ClientTask, update: ClientUpdate) -> dict[str, list[int]]:
        """Per layer, the global pair indices the update's rows (A) and columns (B) hold, in order."""
        raise NotImplementedError(f"{self.name} uploads no pairs of the global adapter")

    def counts_everyone(self) -> bool:
        """True when every client counts for every pair in the mean (one that did not train j adds a zero change)."""
        return False

    def client_weight(self, update: ClientUpdate, weight_scale: float | None = None) -> float:
        """The client's weight in the mean: 1 (uniform) or its sample count; under SecAgg+ that count over the
        round's largest declared one (``weight_scale``), so every uploaded value stays in (0, 1] times a change."""
        if self.weighting != "samples":
            return 1.0
        if weight_scale is None:
            return float(update.num_samples)
        if not (math.isfinite(weight_scale) and weight_scale >= 1):
            raise ValueError(f"secure weight scale must be a sample count >= 1, got {weight_scale!r}")
        return min(1.0, float(update.num_samples) / float(weight_scale))

    def start_pairs(self, task: ClientTask, held: dict[str, list[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the rows of A and columns of B the client was sent for the pairs it trained (``held``, global
        indices): here the task holds the global indices; a method that sends only the selected pairs overrides."""
        out = {}
        for layer, idx in held.items():
            i = torch.tensor(idx, dtype=torch.long)
            out[layer] = (task.arrays[layer + A_SUFFIX][i], task.arrays[layer + B_SUFFIX][:, i])
        return out

    def encode(self, task: ClientTask, update: ClientUpdate, weight_scale: float | None = None,
               state: State | None = None) -> Contribution:
        """A reply as its contribution: per trained pair its value, its weighted change from the value it was sent,
        the weight and count 1; the heads likewise (``aggregation.pair_contribution``; ``state``: the server's)."""
        w, held = self.client_weight(update, weight_scale), self.trained_pairs(task, update)
        return pair_contribution(layout(task.arrays, self.rank), self.start_pairs(task, held), task.arrays,
                                 update.arrays, held, w, w, self.counts_everyone(), state)

    def contributions(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate]) -> list[Contribution]:
        """The round's contributions on the server (a method whose weights depend on the whole round overrides)."""
        return [self.encode(t, u, state=state) for t, u in zip(tasks, updates)]

    def decode(self, state: State, reduced: Reduced) -> State:
        """The new state from reduced contributions: the mean value of each pair some client counts for, or the
        old value moved by the summed weighted change over the summed weight (SecAgg+'s sums, a robust or private
        step); a pair nobody contributed to keeps its value (``aggregation.apply_mean``, ``apply_sums``)."""
        return apply_mean(state, reduced.sums) if reduced.form == MEAN else apply_sums(state, reduced.sums)

    def dp_pair_counts(self, dp) -> torch.Tensor:
        """Central DP: the fixed expected number of a round's clients that train each pair index."""
        raise NotImplementedError(f"{self.name} does not define central DP")

    def combine(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate], aggregator) -> State:
        """Product space only: the new state from the replies under ``aggregator`` (mean or a whole-client rule)."""
        raise NotImplementedError(f"{self.name} aggregates in pair space")

    def update_delta(self, task: ClientTask, update: ClientUpdate) -> State:
        """What training changed, float64, per uploaded key (each trained pair's rows and columns minus the global
        values they started from, each head minus its global value): its norm is the client's ``delta_norm``."""
        delta: State = {}
        held = self.trained_pairs(task, update)
        for layer, (A0, B0) in self.start_pairs(task, held).items():
            a, b = layer + A_SUFFIX, layer + B_SUFFIX
            delta[a] = update.arrays[a].double() - A0.double()
            delta[b] = update.arrays[b].double() - B0.double()
        for key in head_keys(task.arrays):
            delta[key] = update.arrays[key].double() - task.arrays[key].double()
        return delta

    def client_weights(self, updates: list[ClientUpdate]) -> list[float]:
        """Normalised weights of the clients (``weighting``): what measurement and product-space means use."""
        raw = [self.client_weight(u) for u in updates]
        total = sum(raw)
        return [w / total for w in raw]

    # ------------------------------------------------------------ client side
    @abstractmethod
    def client_setup(self, model: nn.Module, task: ClientTask) -> None:
        """Turn the received task into the local model to train (trainable = what is uploaded)."""

    @abstractmethod
    def client_update(self, model: nn.Module, task: ClientTask, num_samples: int) -> ClientUpdate: ...

    # ------------------------------------------------------------ global model
    def load_global(self, model: nn.Module, state: State) -> None:
        """Make ``model`` compute the global model (for evaluation and export)."""
        set_plora_state_dict(model, state)
        select_and_fold(model, range(self.rank))

    def export_adapter(self, model: nn.Module, state: State, path, base_model_name_or_path: str | None = None):
        """The global model as a standard PEFT LoRA folder (``PeftModel.from_pretrained(base, path)``)."""
        from ..adapters import export_peft_adapter

        self.load_global(model, state)
        return export_peft_adapter(model, path, base_model_name_or_path)

    # ------------------------------------------------------------ measurement (docs/method.md, "Measurements")
    def global_factors(self, state: State) -> LayerFactors:
        return adapter_factors(state, self.plora.scale)

    @abstractmethod
    def client_start_factors(self, task: ClientTask) -> LayerFactors:
        """The adapter the client starts training from, as it computes it."""

    @abstractmethod
    def client_end_factors(self, task: ClientTask, update: ClientUpdate) -> LayerFactors:
        """The client's whole local adapter after training."""

    def global_pairs(self, state: State) -> LayerPairs:
        """The paper's global "A, B": per layer the stored pairs (A, B), unscaled (R pairs a layer)."""
        return {layer: (state[layer + A_SUFFIX], state[layer + B_SUFFIX]) for layer in layer_names(state)}

    def client_start_pairs(self, task: ClientTask) -> LayerPairs:
        """The paper's "A_i, B_i": the pairs the client starts training from, unscaled (fewer than R pairs are
        compared rank-wise with the global ones, zero-padded: ``measure.padded_distance``)."""
        return self.global_pairs(task.arrays)

    def paper_ideal_factors(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate]) -> LayerFactors:
        """The paper's dW* = (1/v) sum_i B_i A_i (uniform over the v clients), from the clients' end adapters."""
        return mean_of_products([self.client_end_factors(t, u) for t, u in zip(tasks, updates)])

    # ------------------------------------------------------------ what an honest reply holds (aggregation.validation)
    @abstractmethod
    def expected_update_shapes(self, task: ClientTask, state: State) -> dict[str, tuple[int, ...]]: ...

    def expected_update_config(self, task: ClientTask) -> dict[str, Any]:
        """What an honest reply declares in its config (``client_update``): the rank it was given."""
        return {"rank": task.config["rank"]}

    def validate_update(self, task: ClientTask, update: ClientUpdate, state: State,
                        max_norm: float | None = None) -> None:
        """Raise UpdateRejected naming what is wrong (``aggregation.validate_update``: one rule for every method)."""
        validation.validate_update(self, task, update, state, max_norm)


__all__ = ["ClientInfo", "ClientTask", "ClientUpdate", "DEFAULT_WEIGHTING", "FederatedMethod", "State",
           "UpdateRejected", "head_keys", "layer_names", "upload_dtype"]
