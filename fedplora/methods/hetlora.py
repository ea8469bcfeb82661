"""HetLoRA (Cho et al., EMNLP 2024): truncate to each client's rank, zero-pad back, norm-weighted average."""

from __future__ import annotations


from ..aggregation import COUNT_SUFFIX, MEAN, STEPS, WEIGHT_SUFFIX, Contribution, Reduced, apply_heads, apply_mean, apply_sums
from ..measure import norm_of_sum
from ..state import A_SUFFIX, B_SUFFIX, State, layer_names
from .base import DEFAULT_WEIGHTING, ClientTask, ClientUpdate
from .pairs import LeadingPairsMethod


class HetLoRA(LeadingPairsMethod):
    """The server keeps rank R; client i gets the first r_i pairs (truncation).

    Aggregation zero-pads every upload back to R pairs and averages A and B with per-layer weights proportional
    to ||B_i A_i||_F ("sparsity-weighted"), so a pair only some clients trained is pulled towards zero: the
    aggregation noise Fed-PLoRA avoids. The norms come from the factors (``norm_of_sum``), never from a
    materialised d_out x d_in product when the layer is large. If every norm of a layer is zero the clients'
    weights (``weighting``) are used.

    As a contribution, a client sends n_i * pad(A_i), n_i * pad(B_i) (values, not changes: a padded zero counts)
    with its weight n_i on all R pairs and count 1 on those it trained; the sum over clients over the sum of the
    n_i is the norm-weighted padded average (``decode``). Robust rules and central DP work on what the clients
    changed on the pairs they trained, unweighted: the norm weights grow with an update's norm, which an attacker
    controls, and a padded zero is not a trained value.

    A pair that no sampled client trained would average to zero in both factors and could never train again (both
    of its gradients vanish), so by default it keeps its previous value; ``keep_untrained=False`` applies the
    literal rule. The heads are FedAvg'd with ``weighting``. The paper's optional local rank self-pruning is not
    implemented: it changes the client's training loss, which this interface leaves to the trainer.
    """

    name = "hetlora"
    secure_weight_bound = None  # its weights are the clients' product norms, not shares in (0, 1]

    def __init__(self, plora, weighting: str = DEFAULT_WEIGHTING, seed: int = 0, keep_untrained: bool = True) -> None:
        super().__init__(plora, weighting, seed)
        self.keep_untrained = keep_untrained
        if not keep_untrained:
            self.dp_refusal = ("with keep_untrained=False, zeroing the pairs above the round's largest rank would "
                               "reveal which clients were sampled")

    def dp_pair_counts(self, dp):
        """Central DP: pair j is trained by the clients whose budget covers it (leading pairs)."""
        return dp.pair_counts(self.rank, "leading")

    def encode(self, task: ClientTask, update: ClientUpdate, weight_scale: float | None = None,
               state: State | None = None, norm_weights: dict[str, float] | None = None) -> Contribution:
        """Per layer its zero-padded values with weight n = ||B_i A_i||_F (or ``norm_weights[layer]``) on all R pairs
        (its SecAgg+ upload: n * pad(A_i), n * pad(B_i)); the heads and the trained pairs' unweighted changes as in
        every pair method."""
        out = super().encode(task, update, weight_scale, state)
        for layer in layer_names(task.arrays):
            a, b = layer + A_SUFFIX, layer + B_SUFFIX
            A, B = update.arrays[a].double(), update.arrays[b].double()
            n = norm_weights[layer] if norm_weights else norm_of_sum([(1.0, B, A)])
            r = A.shape[0]
            out.sums[a].zero_()
            out.sums[b].zero_()
            out.sums[a][:r], out.sums[b][:, :r] = n * A, n * B
            out.sums[layer + WEIGHT_SUFFIX][:] = n
            out.values[layer + WEIGHT_SUFFIX][:] = n  # a padded zero counts in the mean
        return out

    def contributions(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate]) -> list[Contribution]:
        """On the server a layer whose products are all zero (no norm to weight by) falls back to the clients'
        weights; a client under SecAgg+ cannot see the others' norms, so there such a layer keeps its value."""
        norms = {layer: [norm_of_sum([(1.0, u.arrays[layer + B_SUFFIX], u.arrays[layer + A_SUFFIX])])
                         for u in updates] for layer in layer_names(state)}
        fallback = self.client_weights(updates)
        out = []
        for i, (t, u) in enumerate(zip(tasks, updates)):
            weights = {layer: (n[i] if sum(n) > 0 else fallback[i]) for layer, n in norms.items()}
            out.append(self.encode(t, u, norm_weights=weights, state=state))
        return out

    def decode(self, state: State, reduced: Reduced) -> State:
        """The norm-weighted padded average of the pairs some client trained (count > 0: the leading pairs up to the
        round's largest rank); a robust or private step is applied as it is. The rest keep their value
        (``keep_untrained``) or become zero."""
        sums = reduced.sums
        if reduced.form == STEPS:
            new = apply_sums(state, sums)
        elif reduced.form == MEAN:
            new = apply_mean(state, sums, defined_by=COUNT_SUFFIX)
        else:  # SecAgg+'s sums of n * pad values
            new = {}
            for layer in layer_names(state):
                a, b = layer + A_SUFFIX, layer + B_SUFFIX
                A, B = state[a].double().clone(), state[b].double().clone()
                trained, total = sums[layer + COUNT_SUFFIX].round() > 0, float(sums[layer + WEIGHT_SUFFIX].max())
                if total > 0:
                    A[trained], B[:, trained] = sums[a][trained] / total, sums[b][:, trained] / total
                new[a], new[b] = A.to(state[a].dtype), B.to(state[b].dtype)
            new.update(apply_heads(state, sums))
            new = {k: new[k] for k in state}
        if not self.keep_untrained:
            for layer in layer_names(state):
                untrained = sums[layer + COUNT_SUFFIX].round() <= 0
                new[layer + A_SUFFIX][untrained] = 0
                new[layer + B_SUFFIX][:, untrained] = 0
        return new


__all__ = ["HetLoRA"]
