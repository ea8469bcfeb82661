"""FedIT: homogeneous LoRA, FedAvg of A and B separately.

Every client trains the same leading pairs, so FedAvg of the factors is the
whole method; the only question is which rank every client can train.
"""

from __future__ import annotations

from torch import nn

from ..state import A_SUFFIX, B_SUFFIX, State, layer_names
from .base import DEFAULT_WEIGHTING, ClientInfo
from .pairs import LeadingPairsMethod


class FedIT(LeadingPairsMethod):
    """FedIT in two variants.

    ``variant="ideal"``: every client trains rank R whatever its budget. It ignores
    the budgets, so it is a reference point, not something the federation could run.

    ``variant="feasible"``: every client trains ``min_rank``, the smallest budget in the
    whole federation, which the caller must give: the server sees only the budgets
    of the clients it samples, and a rank that shrank mid-run would leave trained
    pairs that later clients cannot hold. The pairs beyond ``min_rank`` are zero from
    round 0 and never trained, so the global model is a rank-``min_rank`` LoRA
    (with the common scale s = alpha / R).
    """

    name = "fedit"

    def __init__(self, plora, weighting: str = DEFAULT_WEIGHTING, seed: int = 0, variant: str = "ideal",
                 min_rank: int | None = None) -> None:
        super().__init__(plora, weighting, seed)
        self.ignores_budgets = variant == "ideal"
        if variant == "ideal":
            if min_rank is not None:
                raise ValueError("min_rank belongs to FedIT's 'feasible' variant; 'ideal' trains rank R")
            self.train_rank = self.rank
        else:  # "feasible" (the run setting fedit_variant, checked by RunConfig)
            if min_rank is None or not 1 <= min_rank <= self.rank:
                raise ValueError(f"FedIT 'feasible' needs min_rank in [1, {self.rank}] (the smallest client "
                                 f"budget in the federation), got {min_rank!r}")
            self.train_rank = min_rank
        self.variant = variant

    @classmethod
    def config_options(cls, cfg) -> dict:
        """``fedit_variant``; "feasible" trains every client at the smallest budget of the profile (``ranks``)."""
        return {"variant": cfg.fedit_variant, "min_rank": min(cfg.ranks) if cfg.fedit_variant == "feasible" else None}

    def describe(self) -> str:
        if self.variant == "ideal":
            return f"fedit-ideal (every client at rank R={self.rank}, budgets ignored)"
        return f"fedit-feasible (every client at the smallest budget, rank {self.train_rank} of R={self.rank})"

    def init_state(self, model: nn.Module) -> State:
        state = super().init_state(model)
        for layer in layer_names(state):
            state[layer + A_SUFFIX][self.train_rank:] = 0
            state[layer + B_SUFFIX][:, self.train_rank:] = 0
        return state

    def client_rank(self, client: ClientInfo) -> int:
        if self.variant == "feasible" and client.budget < self.train_rank:
            raise ValueError(f"client {client.cid} has budget {client.budget} < min_rank {self.train_rank}: "
                             "min_rank must be the smallest budget in the federation")
        return self.train_rank

    # aggregation: FedAvg of A and B per pair (the base's pair mean; every client trains pairs 0..train_rank-1,
    # the pairs beyond are held by nobody and stay zero)
    def dp_pair_counts(self, dp):
        """Central DP: every sampled client trains pairs 0..train_rank-1 (R for "ideal"); nobody the rest."""
        return dp.pair_counts(self.rank, "leading", budgets=[self.train_rank])
