"""Byzantine-robust aggregation of client deltas, per pair index (docs/robustness.md, "Robust aggregation").

Why deltas: a client's delta is its uploaded value minus the global value it started from. The
coordinate-wise rules (median, trimmed mean) and Krum's distances do not change when every client's
value is shifted by the same global value, but a norm does: ``norm_clip`` must bound what a client
*changes*, not the size of the global model it was sent. Fed-PLoRA's ``aggregate_over="all"`` also
needs deltas: a client that did not train pair j contributes a zero delta for it.

Why per pair index: in Fed-PLoRA, pair j is trained by a subset Q_j of the round's clients, so every
rule is applied to j over Q_j only (a client that did not train j has no value for it; counting it
as a zero would pull j towards "no change", the aggregation noise Fed-PLoRA avoids). The unit of
aggregation is therefore one pair, ``[a_j ; b_j]`` (A's row and B's column together), or one head
tensor, which every client trains. A unit held by no client (or by no Krum-selected client) keeps its
global value; a unit held by one client takes that client's value under every rule.

Why unweighted: a client's claimed sample count is not evidence (an attacker may claim 10^6 examples),
and HetLoRA's norm weights grow with the update's norm, so they reward exactly what an attacker
controls. Every robust rule here weights clients uniformly, whatever ``weighting``; only ``mean`` (the
methods' own aggregation, untouched) uses ``weighting``.

This module is pure PyTorch: the statistics behind ``aggregation.Robust`` (pair methods) and the product-space
methods' ``combine``; which rules a method accepts is declared on its class (``aggregators``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from .measure import norm_of_sum

# the whole-client rules (defined for every method) first, then the coordinate-wise ones (per pair index only)
AGGREGATORS = ("mean", "norm_clip", "krum", "median", "trimmed_mean")

def trim_count(trim_fraction: float, n: int) -> int:
    """k = floor(trim_fraction * n) values dropped at each end (a 1e-9 guard against 0.29 * 100 = 28.999...)."""
    return int(math.floor(trim_fraction * n + 1e-9))


@dataclass(frozen=True)
class Aggregator:
    """The run's aggregation rule and its parameters (the settings of the same names, checked here too so that
    API use fails with the same one line as a config)."""

    name: str = "mean"
    trim_fraction: float = 0.2
    clip_multiplier: float = 2.0
    krum_f: int = 1
    krum_m: int = 1

    def __post_init__(self) -> None:
        if self.name not in AGGREGATORS:
            raise ValueError(f"aggregator: must be one of {', '.join(AGGREGATORS)}, got {self.name!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction: must be in [0, 0.5) (the share dropped at each end), "
                             f"got {self.trim_fraction!r}; lower --trim-fraction")
        if not self.clip_multiplier > 0:
            raise ValueError(f"clip_multiplier: must be > 0 (times the round's median update norm), "
                             f"got {self.clip_multiplier!r}; raise --clip-multiplier")
        if isinstance(self.krum_f, bool) or not isinstance(self.krum_f, int) or self.krum_f < 0:
            raise ValueError(f"krum_f: must be an integer >= 0 (assumed Byzantine clients), got {self.krum_f!r}")
        if isinstance(self.krum_m, bool) or not isinstance(self.krum_m, int) or self.krum_m < 1:
            raise ValueError(f"krum_m: must be an integer >= 1 (clients Krum selects), got {self.krum_m!r}")

    @classmethod
    def of(cls, value: "Aggregator | str | None") -> "Aggregator":
        """An Aggregator from a method's ``aggregator`` option: an Aggregator, a rule's name, or None (mean)."""
        if value is None:
            return cls()
        return value if isinstance(value, Aggregator) else cls(value)

    def describe(self) -> str:
        extra = {"trimmed_mean": f"trim_fraction {self.trim_fraction:g}",
                 "norm_clip": f"clip_multiplier {self.clip_multiplier:g}",
                 "krum": f"krum_f {self.krum_f}, krum_m {self.krum_m}"}.get(self.name)
        return self.name + (f" ({extra})" if extra else "")


def tolerates(aggregator: "Aggregator | str", n_clients: int, n_byzantine: int, **params) -> str | None:
    """Why ``aggregator`` cannot tolerate ``n_byzantine`` of ``n_clients`` updates in a round, or None.

    Round level only: with Fed-PLoRA a pair is aggregated over the clients that trained it, so a pair trained
    by few clients can still have a Byzantine majority among them (docs/robustness.md).
    """
    agg = aggregator if isinstance(aggregator, Aggregator) else Aggregator(aggregator, **params)
    n, b = n_clients, n_byzantine
    if b <= 0:
        return None
    if agg.name == "mean":
        return (f"aggregator mean tolerates no Byzantine client ({b} of {n}); "
                "use median, trimmed_mean, norm_clip or krum")
    if agg.name in ("median", "norm_clip") and not 2 * b < n:
        what = "the coordinate-wise median" if agg.name == "median" else "the clip bound (the median update norm)"
        return f"aggregator {agg.name} needs fewer than half the clients Byzantine ({b} of {n}): {what} is theirs"
    if agg.name == "trimmed_mean":
        k = trim_count(agg.trim_fraction, n)
        if b > k:
            return (f"aggregator trimmed_mean with trim_fraction={agg.trim_fraction:g} drops {k} value(s) at each end "
                    f"of {n}, fewer than the {b} Byzantine; raise --trim-fraction to at least {b}/{n} (below 0.5)")
    if agg.name == "krum":
        if not n > 2 * agg.krum_f + 2:
            return (f"aggregator krum with krum_f={agg.krum_f} needs more than 2*krum_f+2 = {2 * agg.krum_f + 2} "
                    f"clients per round, got {n}")
        if b > agg.krum_f:
            return f"aggregator krum assumes at most krum_f={agg.krum_f} Byzantine clients, got {b}; raise --krum-f"
    return None


# ------------------------------------------------------------------ coordinate-wise statistics
def median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over dim 0; for an even count the mean of the two middle values (torch.median
    would return the lower one, which is biased towards smaller values)."""
    n = x.shape[0]
    s = x.sort(dim=0).values
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(x: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise: drop the k = floor(trim_fraction * n) largest and k smallest values, mean of the rest.
    With k = 0 (too few values to trim, e.g. one or two clients at 0.2) this is the plain unweighted mean.
    trim_fraction < 0.5 leaves at least one value."""
    n = x.shape[0]
    k = trim_count(trim_fraction, n)
    if k == 0:
        return x.mean(dim=0)
    return x.sort(dim=0).values[k:n - k].mean(dim=0)


# ------------------------------------------------------------------ one client's delta
@dataclass
class UnitDelta:
    """One client's delta by unit: a pair as (layer, j) -> [a_j ; b_j], or a head as key -> its tensor (float64).

    Two clients are compared on the units both hold only (``sq_distance``)."""

    units: dict[Hashable, torch.Tensor]

    def sq_norm(self) -> float:
        return float(sum(float(t.pow(2).sum()) for t in self.units.values()))

    def sq_distance(self, other: "UnitDelta") -> tuple[float, int]:
        """(sum of squared differences, number of coordinates) over the units both hold."""
        total, count = 0.0, 0
        for key, t in self.units.items():
            if key in other.units:
                total += float((t - other.units[key]).pow(2).sum())
                count += t.numel()
        return total, count


@dataclass
class ProductDelta:
    """One client's delta in product space (FlexLoRA, FLoRA): per layer terms (c, B, A) with
    delta = sum c B @ A, never formed, and the heads' deltas. Every coordinate is shared by every client."""

    layers: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]]
    heads: dict[str, torch.Tensor]

    def _coords(self) -> int:
        return (sum(terms[0][1].shape[0] * terms[0][2].shape[1] for terms in self.layers.values() if terms)
                + sum(t.numel() for t in self.heads.values()))

    def sq_norm(self) -> float:
        return (sum(norm_of_sum(terms) ** 2 for terms in self.layers.values())
                + float(sum(float(t.pow(2).sum()) for t in self.heads.values())))

    def sq_distance(self, other: "ProductDelta") -> tuple[float, int]:
        total = sum(norm_of_sum(terms + [(-c, B, A) for c, B, A in other.layers[layer]]) ** 2
                    for layer, terms in self.layers.items())
        total += sum(float((t - other.heads[k]).pow(2).sum()) for k, t in self.heads.items())
        return total, self._coords()


# ------------------------------------------------------------------ whole-client rules
def clip_scales(deltas: Sequence[UnitDelta | ProductDelta], clip_multiplier: float) -> list[float]:
    """c_i = min(1, bound / ||delta_i||), bound = clip_multiplier x the round's median client delta norm (whole
    client: all its pairs and heads; even count: mean of the two middle norms). A median of 0 (half the clients
    changed nothing) clips every other client to zero: the round changes nothing."""
    norms = [math.sqrt(d.sq_norm()) for d in deltas]
    middle = statistics.median(norms)
    bound = clip_multiplier * middle if middle > 0 else 0.0  # 0, not nan, for clip_multiplier = inf
    return [1.0 if norm <= bound else bound / norm for norm in norms]


def krum_check(n: int, krum_f: int, krum_m: int) -> None:
    """A round Krum cannot run raises (one line): RunConfig keeps min_replies above 2*krum_f+2, so only direct API
    use gets here, and silently averaging instead would hide that the guarantee is gone."""
    if not n > 2 * krum_f + 2:
        raise ValueError(f"aggregator krum: this round has {n} updates, and krum_f={krum_f} needs more than "
                         f"2*krum_f+2 = {2 * krum_f + 2}; lower --krum-f or raise --min-replies")
    if krum_m > n - krum_f:
        raise ValueError(f"aggregator krum: krum_m={krum_m} is more than the {n - krum_f} clients a round of {n} "
                         f"updates with krum_f={krum_f} can vouch for; lower --krum-m")


def krum_select(deltas: Sequence[UnitDelta | ProductDelta], krum_f: int, krum_m: int) -> list[int]:
    """The ``krum_m`` clients with the lowest Krum scores, in client order (m = 1: Krum; more: multi-Krum).

    Distance between two clients: the mean squared difference of their deltas per coordinate they share (the
    pairs both trained, and the heads). Normalising per shared coordinate keeps two clients that share many pairs
    from looking farther apart than two that share few; when all clients share everything (FedIT, FlexLoRA,
    FLoRA) it is squared Euclidean distance over a constant, so the choice is Krum's. Two clients sharing no
    coordinate are at infinite distance (neither can vouch for the other). Score of i: the sum of its n - f - 2
    smallest distances; ties go to the earlier client.
    """
    n = len(deltas)
    krum_check(n, krum_f, krum_m)
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for k in range(i + 1, n):
            total, count = deltas[i].sq_distance(deltas[k])
            dist[i][k] = dist[k][i] = total / count if count else math.inf
    scores = [sum(sorted(dist[i][k] for k in range(n) if k != i)[: n - krum_f - 2]) for i in range(n)]
    return sorted(sorted(range(n), key=lambda i: (scores[i], i))[:krum_m])


def client_coefficients(agg: Aggregator, deltas: Sequence[UnitDelta | ProductDelta]) -> tuple[list[float], list[float]]:
    """For the whole-client rules: per client a weight u_i (summing to 1) and a delta scale c_i, so that the
    aggregate is global + sum_i u_i c_i delta_i (per unit: renormalised over the clients that hold it).

    norm_clip: u_i = 1/n, c_i = the clip scale. krum: u_i = 1/m for the m selected, else 0; c_i = 1.
    """
    n = len(deltas)
    if agg.name == "norm_clip":
        return [1.0 / n] * n, clip_scales(deltas, agg.clip_multiplier)
    if agg.name == "krum":
        chosen = set(krum_select(deltas, agg.krum_f, agg.krum_m))
        return [1.0 / len(chosen) if i in chosen else 0.0 for i in range(n)], [1.0] * n
    raise ValueError(f"aggregator {agg.name} is coordinate-wise, not a whole-client rule")


# ------------------------------------------------------------------ per unit
def combine(agg: Aggregator, deltas: Sequence[UnitDelta], weights: Sequence[float] | None = None
            ) -> dict[Hashable, torch.Tensor]:
    """Per unit, the aggregate delta over the clients that hold it (client order).

    mean: sum w_i delta_i / sum w_i over the holders (``weights``, default uniform). median / trimmed_mean:
    coordinate-wise over the holders, unweighted. norm_clip: the unweighted mean of the holders' clipped deltas.
    krum: the unweighted mean over the selected holders. A unit no client (no selected client) holds is absent
    from the result: its global value stays.
    """
    n = len(deltas)
    if agg.name in ("norm_clip", "krum"):
        u, c = client_coefficients(agg, deltas)
        u = [1.0 if ui > 0 else 0.0 for ui in u]  # uniform over the kept clients (exact sums for small integers)
    else:
        u, c = list(weights) if weights is not None else [1.0] * n, [1.0] * n
    holders: dict[Hashable, list[int]] = {}
    for i, d in enumerate(deltas):
        if u[i] > 0:
            for key in d.units:
                holders.setdefault(key, []).append(i)
    out: dict[Hashable, torch.Tensor] = {}
    for key, idx in holders.items():
        x = torch.stack([deltas[i].units[key] for i in idx])
        if agg.name == "median":
            out[key] = median(x)
        elif agg.name == "trimmed_mean":
            out[key] = trimmed_mean(x, agg.trim_fraction)
        else:
            w = torch.tensor([u[i] for i in idx], dtype=x.dtype)
            scale = torch.tensor([c[i] for i in idx], dtype=x.dtype)
            shape = (-1,) + (1,) * (x.dim() - 1)
            out[key] = ((w * scale).view(shape) * x).sum(dim=0) / w.sum()
    return out
