"""HetLoRA (Cho et al., EMNLP 2024): truncate to each client's rank, zero-pad back, norm-weighted average."""

from __future__ import annotations

from ..adapters.model import A_SUFFIX, B_SUFFIX
from ..measure import norm_of_sum
from .base import (
    COUNT_SUFFIX,
    WEIGHT_SUFFIX,
    ClientTask,
    ClientUpdate,
    LeadingPairsMethod,
    State,
    average_heads,
    layer_names,
    padded_average,
)


class HetLoRA(LeadingPairsMethod):
    """The server keeps rank R; client i gets the first r_i pairs (truncation).

    Aggregation zero-pads every upload back to R pairs and averages A and B with
    per-layer weights proportional to ||B_i A_i||_F ("sparsity-weighted"), so a
    pair only some clients trained is pulled towards zero: the aggregation noise
    Fed-PLoRA avoids. The norms come from the factors (``norm_of_sum``), never from
    a materialised d_out x d_in product when the layer is large. If every norm is
    zero the sample weights are used.

    A pair that no sampled client trained would average to zero in both factors
    and could never train again (both of its gradients vanish), so by default it
    keeps its previous value; ``keep_untrained=False`` applies the literal rule.
    The heads are FedAvg'd with ``weighting``. The paper's optional local rank
    self-pruning is not implemented: it changes the client's training loss, which
    this interface leaves to the trainer.
    """

    name = "hetlora"

    def __init__(self, plora, weighting: str = "samples", seed: int = 0, keep_untrained: bool = True,
                 aggregator=None, dp=None) -> None:
        super().__init__(plora, weighting, seed, aggregator, dp)
        self.keep_untrained = keep_untrained
        if dp is not None and not keep_untrained:
            raise ValueError("central DP with keep_untrained=False is not defined for hetlora: zeroing the pairs "
                             "above the round's largest rank would reveal which clients were sampled")

    def dp_pair_counts(self):
        """Central DP: pair j is trained by the clients whose budget covers it (leading pairs); the norm weights
        and the zero-padding are dropped (a DP sum is unweighted, and a padded zero is not a trained value)."""
        return self.dp.pair_counts(self.rank, "leading")

    def secure_encode(self, task: ClientTask, update: ClientUpdate, weight_scale: float,
                      clip: float | None = None) -> State:
        """HetLoRA's zero-padded mean from sums: per layer the client sends n * pad(A_i), n * pad(B_i) (values, not
        deltas: a padded zero counts) with its own norm weight n = ||B_i A_i||_F on all R pairs, and ``.count`` 1 on
        the pairs it trained. Sum over clients / sum of n is the norm-weighted padded average. Central DP
        (``clip``) uses the base rule: clipped deltas on the trained pairs, as ``private_aggregate`` does."""
        if clip is not None:
            return super().secure_encode(task, update, weight_scale, clip)
        out = super().secure_encode(task, update, weight_scale)  # heads (weighted deltas) and the trained counts
        for layer in layer_names(task.arrays):
            a, b = layer + A_SUFFIX, layer + B_SUFFIX
            A, B = update.arrays[a].double(), update.arrays[b].double()
            n, r = norm_of_sum([(1.0, B, A)]), A.shape[0]
            out[a].zero_()
            out[b].zero_()
            out[a][:r], out[b][:, :r] = n * A, n * B
            out[layer + WEIGHT_SUFFIX][:] = n
        return out

    def secure_layer(self, state: State, layer: str, sums: State):
        """The norm-weighted zero-padded average over the pairs some client trained (``.count`` > 0: the leading
        pairs up to the round's largest rank); the rest keep their value (``keep_untrained``) or become zero.
        Deviation from ``aggregate``: a layer in which every client's product is zero (no norm to weight by)
        keeps its value; the plain path averages it with the sample weights, which the sums do not hold."""
        a, b = layer + A_SUFFIX, layer + B_SUFFIX
        A, B = state[a].double().clone(), state[b].double().clone()
        trained, total = sums[layer + COUNT_SUFFIX].round() > 0, float(sums[layer + WEIGHT_SUFFIX].max())
        if total > 0:
            A[trained], B[:, trained] = sums[a][trained] / total, sums[b][:, trained] / total
        if not self.keep_untrained:
            A[~trained], B[:, ~trained] = 0, 0
        return A, B

    def norm_weights(self, updates: list[ClientUpdate], layer: str) -> list[float]:
        norms = [norm_of_sum([(1.0, u.arrays[layer + B_SUFFIX], u.arrays[layer + A_SUFFIX])]) for u in updates]
        total = sum(norms)
        return [n / total for n in norms] if total > 0 else self.client_weights(updates)

    def aggregate(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate]) -> State:
        if not updates:
            return dict(state)
        if self.robust:
            return self.robust_hetlora(state, updates)
        weights = {layer: self.norm_weights(updates, layer) for layer in layer_names(state)}
        new = padded_average(state, updates, weights, self.keep_untrained)
        new.update(average_heads(state, updates, self.client_weights(updates)))
        return new

    def robust_hetlora(self, state: State, updates: list[ClientUpdate]) -> State:
        """A robust rule per pair index over the clients whose rank covers it, unweighted: the norm weights are
        dropped (they grow with the update's norm, which an attacker controls) and so is the zero-padding (a
        padded zero is not a trained value). ``keep_untrained=False`` still zeroes the pairs nobody trained."""
        new = self.robust_aggregate(state, updates)
        if not self.keep_untrained:
            for layer in layer_names(state):
                top = max(u.arrays[layer + A_SUFFIX].shape[0] for u in updates)
                new[layer + A_SUFFIX][top:] = 0
                new[layer + B_SUFFIX][:, top:] = 0
        return new
