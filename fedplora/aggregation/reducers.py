"""How a round's contributions are combined: the one step that differs between plain, robust and private rounds.

Every reducer takes the round's ``Contribution``s (client-id order) and returns a ``Reduced`` in the one layout:

* ``Mean``: the element-wise sum of the contributions' ``sums``; the method's ``decode`` turns it into its own
  mean. SecAgg+ computes exactly this sum, masked, in Flower (``federation/secure.py``); the server then
  decodes it like a plain round.
* ``Robust``: a Byzantine-robust rule per unit (a pair ``[a_j ; b_j]`` over the clients that hold it, each
  head over every client) on the unweighted ``deltas`` (``fedplora.robust``): the aggregate change, applied as
  a step. Weights are ignored on purpose (a claimed sample count or a norm weight is what an attacker
  controls; docs/robustness.md).
* ``Private``: central differential privacy: each client's whole delta clipped to C, summed without weights per
  pair, Gaussian noise on every coordinate, divided by fixed expected counts (never the round's realised
  ones; ``fedplora.privacy``); applied as a step. Under SecAgg+ the clients clip and the server
  ``release``s the masked sum.

Product-space methods (FlexLoRA, FLoRA) have no pairs to sum; they take the ``aggregator`` of ``Mean`` or
``Robust`` into their own ``combine`` (``methods/flexlora.py``, ``methods/flora.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..privacy import CentralDP, clip_delta, noisy_pair_mean, pair_divisors
from ..robust import Aggregator, UnitDelta, combine
from ..state import A_SUFFIX, B_SUFFIX
from .contributions import (
    COUNT_SUFFIX,
    MEAN,
    STEPS,
    HEADS_COUNT,
    HEADS_WEIGHT,
    WEIGHT_SUFFIX,
    Contribution,
    Reduced,
    deltas_in_layout,
    layout_keys,
    zeros,
)


class Reducer(ABC):
    """One way of combining a round's contributions (module docstring)."""

    name: str

    @abstractmethod
    def reduce(self, contributions: list[Contribution], generator: torch.Generator | None = None) -> Reduced: ...

    @property
    def aggregator(self) -> Aggregator:
        """The robust rule this reducer applies (mean for the plain sum), for product-space methods."""
        return Aggregator()

    def describe(self) -> str:
        return self.name


def shapes_of(contribution: Contribution) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in contribution.sums.items()}


@dataclass(frozen=True)
class Mean(Reducer):
    """Every method's own mean: per pair sum_i (w_ij / W_j) value_ij over the clients that count for it, W_j their
    summed weight (FedAvg's arithmetic, in client order); the heads likewise over every client."""

    name: str = "mean"

    def reduce(self, contributions: list[Contribution], generator: torch.Generator | None = None) -> Reduced:
        shapes = shapes_of(contributions[0])
        out = zeros(shapes)
        _, _, weights, counts = layout_keys(shapes)
        for c in contributions:
            for key in weights + counts:
                out[key] += c.values[key]
        values = [k for k in shapes if k not in set(weights) | set(counts)]
        for c in contributions:
            for key in values:
                total = out[_weight_key(key)]
                coef = torch.where(total > 0, c.values[_weight_key(key)] / torch.where(total > 0, total, 1.0), 0.0)
                if key.endswith(A_SUFFIX):
                    coef = coef[:, None]
                elif key.endswith(B_SUFFIX):
                    coef = coef[None, :]
                out[key] += coef * c.values[key]
        return Reduced(out, MEAN)


@dataclass(frozen=True)
class Robust(Reducer):
    """A robust rule (median, trimmed mean, norm clipping, Krum) per unit over its holders; see ``fedplora.robust``."""

    rule: Aggregator = field(default_factory=Aggregator)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.rule.name

    @property
    def aggregator(self) -> Aggregator:
        return self.rule

    def describe(self) -> str:
        return self.rule.describe()

    def reduce(self, contributions: list[Contribution], generator: torch.Generator | None = None) -> Reduced:
        """The rule's step per unit; a pair's count is its trainers' (a client that only holds it with a zero
        change, as under aggregate_over="all", trained nothing there), and 0 where the rule kept no holder."""
        step = combine(self.rule, [UnitDelta(c.deltas) for c in contributions])
        shapes = shapes_of(contributions[0])
        out = deltas_in_layout(shapes, step)
        for layer in layout_keys(shapes)[0]:
            trained = sum(c.sums[layer + COUNT_SUFFIX] for c in contributions)
            out[layer + COUNT_SUFFIX] = out[layer + COUNT_SUFFIX] * trained
        return Reduced(out, STEPS)


@dataclass(frozen=True)
class Private(Reducer):
    """Central DP with the method's fixed expected count of each pair index (``method.dp_pair_counts(dp)``)."""

    dp: CentralDP
    pair_counts: torch.Tensor
    name: str = "central_dp"

    def describe(self) -> str:
        return f"central DP (clip {self.dp.clip:g}, noise multiplier {self.dp.noise_multiplier:g})"

    def reduce(self, contributions: list[Contribution], generator: torch.Generator | None = None) -> Reduced:
        shapes = shapes_of(contributions[0])
        sums = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items() if k not in _extra(shapes)}
        for c in contributions:
            for key, d in clip_delta(c.deltas, self.dp.clip)[0].items():
                if isinstance(key, tuple):
                    layer, j = key
                    d_in = shapes[layer + A_SUFFIX][1]
                    sums[layer + A_SUFFIX][j] += d[:d_in]
                    sums[layer + B_SUFFIX][:, j] += d[d_in:]
                else:
                    sums[key] += d
        return self.release(shapes, sums, generator)

    def release(self, shapes: dict[str, tuple[int, ...]], sums: dict[str, torch.Tensor],
                generator: torch.Generator | None, residue: bool = False) -> Reduced:
        """(sums of clipped deltas + N(0, (sigma C)^2) per coordinate) / fixed counts, as steps. ``residue``: the sums
        came through SecAgg+'s quantization, so a coordinate no client can train (expected count 0) holds rounding
        residue instead of an exact 0: it is dropped."""
        sums = {k: v for k, v in sums.items() if k not in _extra(shapes)}
        counts = torch.as_tensor(self.pair_counts, dtype=torch.float64)
        if residue:
            none = counts == 0
            sums = {k: v.clone() for k, v in sums.items()}
            for key in sums:
                if key.endswith(A_SUFFIX):
                    sums[key][none] = 0
                elif key.endswith(B_SUFFIX):
                    sums[key][:, none] = 0
        mean = noisy_pair_mean(sums, pair_divisors(list(sums), counts, self.dp.clients_per_round),
                               self.dp.noise_std, generator)
        out = zeros(shapes)
        released = (counts > 0).to(torch.float64)
        layers, _, _, _ = layout_keys(shapes)
        out.update(mean)
        for layer in layers:
            out[layer + WEIGHT_SUFFIX], out[layer + COUNT_SUFFIX] = torch.ones_like(released), released.clone()
        if HEADS_COUNT in out:
            out[HEADS_WEIGHT][0], out[HEADS_COUNT][0] = 1.0, 1.0
        return Reduced(out, STEPS)


def dp_upload(contribution: Contribution, clip: float) -> dict[str, torch.Tensor]:
    """A client's upload under SecAgg+ with central DP: its whole delta (all its held pairs and heads) clipped to
    L2 norm ``clip`` in the layout, unweighted (a DP sum is), weight and count 1 on the pairs it trained."""
    shapes = shapes_of(contribution)
    out = deltas_in_layout(shapes, clip_delta(contribution.deltas, clip)[0])
    for layer in layout_keys(shapes)[0]:
        out[layer + COUNT_SUFFIX] = contribution.sums[layer + COUNT_SUFFIX].clone()
        out[layer + WEIGHT_SUFFIX] = contribution.sums[layer + COUNT_SUFFIX].clone()
    return out


def _weight_key(key: str) -> str:
    """The layout key of the weight a value key is averaged with."""
    for suffix in (A_SUFFIX, B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)] + WEIGHT_SUFFIX
    return HEADS_WEIGHT


def _extra(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """A layout's weight and count keys (the rest are values)."""
    _, _, weights, counts = layout_keys(shapes)
    return set(weights) | set(counts)
