"""Server optimizers on the pair space: FedAvgM, FedAdam and FedYogi (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021; Hsu et al., 2019, for server momentum), after the round's aggregate.

The method's aggregate (its mean, a robust rule, central DP or SecAgg+'s sum, decoded) is x_bar; the
pseudo-gradient is its change delta = x_bar - x, per pair (A's row and B's column) and per head. The optimizer
then moves x instead of replacing it by x_bar:

* ``none``: x <- x_bar (the method's own rule, untouched).
* ``avgm``: b <- momentum b + delta; x <- x + lr b. With momentum 0 and lr 1 this is ``none``, exactly.
* ``adam``: m <- beta1 m + (1 - beta1) delta; v <- beta2 v + (1 - beta2) delta^2;
  x <- x + lr sqrt(1 - beta2^t) / (1 - beta1^t) m / (sqrt(v) + tau), t the steps taken so far (Flower's FedAdam
  writes the bias correction one step ahead, with the server round + 1; we count steps).
* ``yogi``: as adam with v <- v - (1 - beta2) delta^2 sign(v - delta^2) and no bias correction (Flower's FedYogi).

A pair nobody trained in a round (no contribution: its count is 0) is not stepped: it takes the method's own
value for such a pair (its value, or HetLoRA's literal zero), and its moments and step count wait for the next
round in which someone trains it (a "lazy" optimizer, as sparse
Adam): in Fed-PLoRA and FSLoRA most pairs are trained by only some clients, and a zero pseudo-gradient there is
"no information", not "stay". The heads, which every client trains, are stepped every round. Under central DP
every pair that some client could train is released with noise every round, so every such pair is stepped (to
skip the ones nobody trained would reveal who trained what). Everything is in
float64 and cast back; the state (moments, step counts) is checkpointed with the global state, so a resumed run
continues exactly (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..state import A_SUFFIX, B_SUFFIX, State, head_keys, layer_names
from .contributions import COUNT_SUFFIX

SERVER_OPTIMIZERS = ("none", "avgm", "adam", "yogi")
# the server rate each one uses when ``server_lr`` is not set: Flower's FedAvgM, FedAdam, FedYogi defaults
DEFAULT_LR = {"none": 1.0, "avgm": 1.0, "adam": 0.1, "yogi": 0.01}


@dataclass
class ServerOptimizer:
    name: str = "none"
    lr: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # "m/<key>", "v/<key>", "t/<layer>"

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer: must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.name!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.name]
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server_lr: must be a finite number > 0, got {self.lr!r}")

    def describe(self) -> str:
        extra = {"avgm": f", momentum {self.momentum:g}",
                 "adam": f", betas {self.beta1:g}/{self.beta2:g}, tau {self.tau:g}",
                 "yogi": f", betas {self.beta1:g}/{self.beta2:g}, tau {self.tau:g}"}.get(self.name, "")
        return "none" if self.name == "none" else f"{self.name} (lr {self.lr:g}{extra})"

    @property
    def identity(self) -> bool:
        return self.name == "none" or (self.name == "avgm" and self.momentum == 0 and self.lr == 1)

    def step(self, old: State, new: State, moved: dict[str, torch.Tensor]) -> State:
        """The next global state from the old one and the round's aggregate ``new``; ``moved[layer]``: (R,) bool,
        the pairs some client contributed to this round."""
        if self.identity:
            return new
        out = dict(new)
        for layer in layer_names(old):
            mask = moved[layer]
            if not bool(mask.any()):
                continue  # nothing trained: the method's own value for untrained pairs (kept, or HetLoRA's zero)
            t = self._counter(layer, mask.shape[0])
            t[mask] += 1
            for key, rows in ((layer + A_SUFFIX, True), (layer + B_SUFFIX, False)):
                out[key] = self._update(key, old[key], new[key], mask if rows else None, mask, t)
        for key in head_keys(old):
            t = self._counter(key, 1)
            t += 1
            out[key] = self._update(key, old[key], new[key], None, None, t)
        return {k: out[k] for k in old}

    def _counter(self, name: str, n: int) -> torch.Tensor:
        return self.buffers.setdefault("t/" + name, torch.zeros(n, dtype=torch.float64))

    def _update(self, key: str, old: torch.Tensor, new: torch.Tensor, row_mask, col_mask, t: torch.Tensor):
        """One tensor's step; a pair outside the mask takes the method's own value for a pair nobody trained (its
        aggregate: the old value, or HetLoRA's literal zero) and keeps its moments (A: rows, B: columns)."""
        x, delta, untouched = old.double(), new.double() - old.double(), new.double()
        if row_mask is not None:
            keep = row_mask[:, None].expand_as(x)
            steps = t[:, None].expand_as(x)
        elif col_mask is not None:
            keep = col_mask[None, :].expand_as(x)
            steps = t[None, :].expand_as(x)
        else:
            keep = torch.ones_like(x, dtype=torch.bool)
            steps = t.expand_as(x)
        m = self.buffers.setdefault("m/" + key, torch.zeros_like(x))
        if self.name == "avgm":
            m[keep] = self.momentum * m[keep] + delta[keep]
            x = torch.where(keep, x + self.lr * m, untouched)
        else:
            v = self.buffers.setdefault("v/" + key, torch.zeros_like(x))
            m[keep] = self.beta1 * m[keep] + (1 - self.beta1) * delta[keep]
            d2 = delta[keep] ** 2
            if self.name == "adam":
                v[keep] = self.beta2 * v[keep] + (1 - self.beta2) * d2
                rate = self.lr * torch.sqrt(1 - self.beta2 ** steps) / (1 - self.beta1 ** steps)
            else:  # yogi
                v[keep] = v[keep] - (1 - self.beta2) * d2 * torch.sign(v[keep] - d2)
                rate = torch.full_like(x, self.lr)
            x = torch.where(keep, x + rate * m / (torch.sqrt(v) + self.tau), untouched)
        return x.to(old.dtype)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in sorted(self.buffers.items())}

    def load_state_dict(self, buffers: dict[str, torch.Tensor]) -> None:
        self.buffers = {k: v.clone().to(torch.float64) for k, v in buffers.items()}


def moved_pairs(sums: State, state: State) -> dict[str, torch.Tensor]:
    """Per layer, the pairs some client contributed to (their trained count in the reduced sums is above 0)."""
    return {layer: sums[layer + COUNT_SUFFIX].round() > 0 for layer in layer_names(state)}
