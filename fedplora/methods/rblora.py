"""RB-LoRA (Findings of EACL 2026): rank-bucketed averaging, each rank index over the clients whose rank covers it.

Clients train the leading r_i pairs of the global rank-R adapter (truncation, as in HetLoRA). Where HetLoRA
zero-pads every upload to R pairs and averages over all clients, so that a pair few clients trained is pulled
towards zero, RB-LoRA averages rank index j only over the clients whose rank covers it (r_i > j), with their
data sizes as weights, rescaled to sum to one over those clients: pair j <- sum_{i: r_i > j} n_i x_ij /
sum_{i: r_i > j} n_i. A pair nobody trained keeps its value. That is the pipeline's pair mean over the leading
pairs with sample weights, whatever ``weighting`` is: the data weights are the method's definition.

The authors' code (``seonha01/rb-lora``, ``aggregation.py``) defines these per-index weights
(``compute_column_weights_from_ranks``) but, in the version read, calls a data-weighted zero-padded mean
instead, then redistributes by an SVD whose factors do not reach the clients; we implement the rule the paper
and that helper state, and hand out truncations (docs/method.md, "RB-LoRA"). Every client shares the scale
alpha / R (a per-rank scale would make the fold inexact), so the code's rescaling of B by r_i / alpha is not needed.
"""

from __future__ import annotations

from .base import DEFAULT_WEIGHTING
from .pairs import LeadingPairsMethod


class RBLoRA(LeadingPairsMethod):
    name = "rblora"

    def __init__(self, plora, weighting: str = DEFAULT_WEIGHTING, seed: int = 0) -> None:
        super().__init__(plora, "samples", seed)  # the data weights are RB-LoRA's rule, whatever the run's weighting

    def describe(self) -> str:
        return f"{self.name} (rank index j over the clients whose rank covers it, data-weighted)"

    def dp_pair_counts(self, dp):
        """Central DP: pair j is trained by the clients whose budget covers it (leading pairs); unweighted."""
        return dp.pair_counts(self.rank, "leading")
